// pack_mma and mma_matmul on the CPU (semantics: python/lowbit/reference/mma.py; the
// layout: csrc/core/mma.h).
//
// The mma layout exists for the CUDA tensor-core kernel; the CPU gets it because a model
// packed for the GPU must still load, run and round-trip on the CPU (tests, export,
// machines without a GPU). So these kernels aim at being obviously right, not fast:
//  * pack_mma walks the output words and, for each code, asks mma_code_position where it
//    comes from. Every word is written by one task and the source reads are in-place
//    GPTQ words, so the loop parallelises with no synchronisation; it runs once per
//    layer, at load time.
//  * mma_matmul dequantizes W once per call into a float32 [K, N] buffer and calls at::mm,
//    the same dequantize + GEMM path the CUDA kernel takes for long inputs. Each k16 row
//    of packed words fills 16 whole rows of the buffer, so tasks over k16 rows write
//    disjoint, contiguous memory. W is rounded to x.dtype before the GEMM (the value a
//    tensor core would multiply), so the CPU and the tensor-core kernel compute the same
//    product up to summation order. There is no tensor-core path, so max_mma_rows, which
//    only picks between the CUDA paths, is accepted and ignored.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/mma.h"
#include "cpu/common.h"

namespace lowbit::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_mma_cpu(const at::Tensor& qweight_, const at::Tensor& scales,
                                                             const at::Tensor& zeros, int64_t bits,
                                                             int64_t group_size) {
  const int64_t k = check_pack_mma(qweight_, scales, zeros, bits, group_size);
  const int64_t n = qweight_.size(1), rows = k / 16, words = n * bits / 2;
  auto [scales_p, zeros_p] = mma_permute_params(scales, zeros);
  if (scales_p.numel() == 0) {
    // Empty views of the inputs would alias them (an op's outputs must not).
    scales_p = at::empty(scales.sizes(), scales.options());
    zeros_p = at::empty(zeros.sizes(), zeros.options().dtype(at::kByte));
  }
  at::Tensor packed = at::empty({rows, words}, qweight_.options());
  if (packed.numel() == 0) return {packed, scales_p, zeros_p};

  const at::Tensor qweight = qweight_.contiguous();
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(qweight.const_data_ptr<int32_t>());
  uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const int per_word = mma_codes_per_word(static_cast<int>(bits));
  const uint32_t mask = (1u << bits) - 1u;
  at::parallel_for(0, rows * words, grain_for(per_word * 4), [&](int64_t b, int64_t e) {
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t kb = idx / words, index = idx % words;
      uint32_t word = 0;
      for (int i = 0; i < per_word; ++i) {
        int64_t kk, nn;
        mma_code_position(static_cast<int>(bits), kb, index, i, kk, nn);
        // GPTQ: code (k, n) is bits (k bits) % 32 .. of word row k bits / 32, column n
        // (never split across words at 4 or 8 bits).
        const int64_t bit = kk * bits;
        const uint32_t code = (qw[(bit / 32) * n + nn] >> (bit % 32)) & mask;
        word |= code << (bits * i);
      }
      out[idx] = word;
    }
  });
  return {packed, scales_p, zeros_p};
}

// wt [K, N] float32 = W^T, W = (q - zero) * scale rounded to x.dtype (scalar_t). s: the
// scales already rounded to x.dtype, as float32; s and z [G, N], columns permuted.
template <typename scalar_t>
void dequantize_mma(const uint32_t* packed, const float* s, const uint8_t* z, int64_t bits, int64_t k, int64_t n,
                    int64_t group_size, float* wt) {
  const int64_t words = n * bits / 2;
  const int per_word = mma_codes_per_word(static_cast<int>(bits));
  const uint32_t mask = (1u << bits) - 1u;
  at::parallel_for(0, k / 16, grain_for(16 * n), [&](int64_t b, int64_t e) {
    for (int64_t kb = b; kb < e; ++kb) {
      const uint32_t* row = packed + kb * words;
      for (int64_t index = 0; index < words; ++index) {
        const uint32_t word = row[index];
        for (int i = 0; i < per_word; ++i) {
          int64_t kk, nn;
          mma_code_position(static_cast<int>(bits), kb, index, i, kk, nn);
          const int64_t p = (kk / group_size) * n + mma_param_position(nn);
          const float q = static_cast<float>((word >> (bits * i)) & mask);
          const float w = (q - static_cast<float>(z[p])) * s[p];
          wt[kk * n + nn] = to_f32(from_f32<scalar_t>(w));
        }
      }
    }
  });
}

at::Tensor mma_matmul_cpu(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& scales_,
                          const at::Tensor& zeros_, int64_t bits, int64_t group_size,
                          const std::optional<at::Tensor>& bias, int64_t /*max_mma_rows: CUDA only*/) {
  // The op has no autograd formula; at::mm must not record a graph for an input that
  // requires grad (a model called outside torch.no_grad).
  const c10::NoGradGuard no_grad;
  const MmaSizes sz = check_mma_matmul(x_, packed_, scales_, zeros_, bits, group_size, bias);
  const int64_t m = sz.m, n = sz.n, k = sz.k;
  std::vector<int64_t> out_shape(x_.sizes().begin(), x_.sizes().end());
  out_shape.back() = n;
  const at::ScalarType dtype = x_.scalar_type();
  if (m == 0 || n == 0) return at::empty(out_shape, x_.options());
  if (k == 0) {   // the empty sum: y = bias, or zeros
    at::Tensor y = bias.has_value() ? bias->to(at::kFloat).to(dtype).expand({m, n}).contiguous()
                                    : at::zeros({m, n}, x_.options());
    return y.view(out_shape);
  }

  // Scales rounded to x.dtype, as float32; zeros as uint8: both [G, N], still permuted.
  const at::Tensor s = scales_.to(dtype).to(at::kFloat).contiguous();
  const at::Tensor z = zeros_.contiguous();
  const at::Tensor packed = packed_.contiguous();
  at::Tensor wt = at::empty({k, n}, x_.options().dtype(at::kFloat));
  LOWBIT_DISPATCH_FLOATS(dtype, "mma_matmul_cpu", [&] {
    dequantize_mma<scalar_t>(reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>()),
                             s.const_data_ptr<float>(), z.const_data_ptr<uint8_t>(), bits, k, n, group_size,
                             wt.data_ptr<float>());
  });
  at::Tensor y = at::mm(x_.reshape({m, k}).to(at::kFloat), wt);
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(dtype).view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("pack_mma", &pack_mma_cpu);
  m.impl("mma_matmul", &mma_matmul_cpu);
}

}  // namespace lowbit::cpu
