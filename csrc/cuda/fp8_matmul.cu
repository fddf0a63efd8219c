// FP8 (e4m3fn) linear on CUDA: y = (x @ w^T) * x_scale * w_scale + bias, float32
// accumulation, one rounding to out_dtype. Mirrors csrc/cpu/fp8_matmul.cpp (checks,
// messages); semantics: python/lowbit/reference/fp8.py (fp8_matmul).
//
// Paths, by device and shape:
// * FP8 tensor cores (compute capability >= 8.9, K and N multiples of 16, as cuBLASLt
//   requires) through torch's _scaled_mm:
//   - per-tensor x_scale and w_scale, no bias or a bias of out_dtype (not float32: the
//     cuBLASLt bias epilogue's limits): one call, scales and bias applied by cuBLASLt;
//   - on sm_90 with a bfloat16 output and no bias, any other scale mix: one row-wise
//     scaled call (per-tensor scales expanded to vectors), the recipe torch supports on
//     every version and path (CUTLASS or cuBLASLt) there;
//   - anything else: an unscaled call into a float32 accumulator and lowbit's epilogue.
// * Otherwise (older GPUs, other shapes): emulation. FP8 values are exact in bfloat16
//   (4 significant bits, exponents well inside its range), so a bfloat16 tensor-core GEMM
//   with float32 output (torch >= 2.8; float32 GEMM before) gives the float32-accumulated
//   products, then the epilogue.
// The epilogue computes (acc * x_scale) * w_scale + bias.float() with IEEE float32
// operations in the reference's order (no FMA contraction) and rounds once.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <optional>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/scaled_matmul.h"
#include "cuda/common.cuh"

// _scaled_mm(self, mat2, scale_a, scale_b, bias, scale_result, out_dtype, use_fast_accum),
// scales required, since torch 2.5 (unchanged through 2.13). mm.dtype: common.cuh's
// LOWBIT_HAS_MM_DTYPE.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
#define LOWBIT_HAS_SCALED_MM 1
#include <ATen/ops/_scaled_mm.h>
#else
#define LOWBIT_HAS_SCALED_MM 0
#endif

namespace lowbit::cuda {
namespace {

// out[m, n] = rnd((acc[m, n] * xs[m or 0]) * ws[n or 0] + bias[n]) over flat runs of the
// row-major [rows, n] arrays (a run may cross rows: its row and column are tracked).
template <typename Out>
__global__ void __launch_bounds__(kThreads)
fp8_epilogue_kernel(const float* __restrict__ acc, const float* __restrict__ xs, bool xs_row,
                    const float* __restrict__ ws, bool ws_col, const float* __restrict__ bias,
                    Out* __restrict__ out, int64_t rows, int64_t n, bool aligned) {
  const int64_t total = rows * n, runs = (total + kVec - 1) / kVec;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < runs;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = r * kVec;
    float in[kVec];
    Out o[kVec];
    load_run(acc, e0, total, aligned, in);
    int64_t row = e0 / n, col = e0 - row * n;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      o[j] = Out{};
      if (e0 + j >= total) continue;
      float v = __fmul_rn(in[j], xs[xs_row ? row : 0]);
      v = __fmul_rn(v, ws[ws_col ? col : 0]);
      if (bias != nullptr) v = __fadd_rn(v, bias[col]);
      o[j] = from_f32<Out>(v);
      if (++col == n) {
        col = 0;
        ++row;
      }
    }
    store_run(out, e0, total, aligned, o);
  }
}

bool aligned16(const at::Tensor& t) { return is_aligned(t.const_data_ptr(), 16); }

at::Tensor fp8_matmul_cuda(const at::Tensor& x_, const at::Tensor& x_scale, const at::Tensor& w_,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           at::ScalarType out_dtype) {
  constexpr const char* op = "fp8_matmul";
  const int64_t m = check_scaled_matmul(op, x_, x_scale, w_, w_scale, bias, out_dtype, at::ScalarType::Float8_e4m3fn).m;
  check_cuda(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t n = w_.size(0), k = w_.size(1);
  std::vector<int64_t> out_shape(x_.sizes().begin(), x_.sizes().end());
  out_shape.back() = n;
  if (m == 0 || n == 0) return at::empty(out_shape, x_.options().dtype(out_dtype));

  const at::Tensor xs = x_scale.contiguous(), ws = w_scale.contiguous();
  const bool xs_row = xs.numel() != 1, ws_col = ws.numel() != 1;
  at::Tensor acc;

#if LOWBIT_HAS_SCALED_MM
  int dev = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  const bool fp8_cores = major > 8 || (major == 8 && minor >= 9);
  if (fp8_cores && k > 0 && k % 16 == 0 && n % 16 == 0) {
    // cuBLASLt's FP8 layout: x row-major, w^T column-major (w row-major), 16-byte aligned.
    at::Tensor x = x_.reshape({m, k}).contiguous(), w = w_.contiguous();
    if (!aligned16(x)) x = x.clone();
    if (!aligned16(w)) w = w.clone();
    const bool bias_fused = !bias.has_value() || (bias->scalar_type() == out_dtype && out_dtype != at::kFloat);
    std::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->contiguous();
    if (!xs_row && !ws_col && bias_fused) {
      return at::_scaled_mm(x, w.t(), xs, ws, b, std::nullopt, out_dtype, false).view(out_shape);
    }
    if (major == 9 && out_dtype == at::kBFloat16 && !bias.has_value()) {
      const at::Tensor a = xs_row ? xs.view({m, 1}) : xs.reshape({1, 1}).expand({m, 1}).contiguous();
      const at::Tensor c = ws_col ? ws.view({1, n}) : ws.reshape({1, 1}).expand({1, n}).contiguous();
      return at::_scaled_mm(x, w.t(), a, c, std::nullopt, std::nullopt, out_dtype, false).view(out_shape);
    }
    const at::Tensor one = at::ones({}, xs.options());
    acc = at::_scaled_mm(x, w.t(), one, one, std::nullopt, std::nullopt, at::kFloat, false);
  }
#endif
  if (!acc.defined()) {
    if (k == 0) {
      acc = at::zeros({m, n}, xs.options());
    } else {
      const at::Tensor x = x_.reshape({m, k});
#if LOWBIT_HAS_MM_DTYPE
      acc = at::mm(x.to(at::kBFloat16), w_.to(at::kBFloat16).t(), at::kFloat);
#else
      acc = at::mm(x.to(at::kFloat), w_.to(at::kFloat).t());
#endif
    }
  }

  const at::Tensor a = acc.contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty(out_shape, x_.options().dtype(out_dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LOWBIT_DISPATCH_FLOATS(out_dtype, "fp8_matmul_cuda", [&] {
    const float* ap = a.const_data_ptr<float>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    const bool aligned = is_aligned(ap, sizeof(Run<float>)) && is_aligned(yp, sizeof(Run<scalar_t>));
    fp8_epilogue_kernel<scalar_t><<<grid_for((m * n + kVec - 1) / kVec, kThreads), kThreads, 0, stream>>>(
        ap, xs.const_data_ptr<float>(), xs_row, ws.const_data_ptr<float>(), ws_col,
        bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr, yp, m, n, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("fp8_matmul", &fp8_matmul_cuda);
}

}  // namespace lowbit::cuda
