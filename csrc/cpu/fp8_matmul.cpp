// FP8 (e4m3fn) linear on the CPU, by emulation: y = (x @ w^T) * x_scale * w_scale + bias.
// Semantics: python/lowbit/reference/fp8.py (fp8_matmul).
//
// Every e4m3fn value is exact in float32 (a 256-entry table converts them), and so is
// every product of two, so a float32 GEMM of the converted operands is the reference's
// accumulator up to summation order. x is converted once; w in tiles of kTileCols output
// channels, each multiplied with at::mm (BLAS) into a float32 [M, tile] accumulator that
// the epilogue scales, biases and rounds once into the output. (Any float32 matmul
// precision setting keeps the products exact: e4m3 values fit TF32 and bfloat16 too.)
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/scaled_matmul.h"
#include "cpu/common.h"

namespace lowbit::cpu {
namespace {

// Output channels per converted tile of w ([kTileCols, K] float32: 4 MiB at K = 4096),
// wide enough for BLAS to run near its peak, small enough that the tile is reused from
// cache while at::mm walks over x.
constexpr int64_t kTileCols = 256;

// float32 value of every e4m3fn bit pattern (NaN included), from c10's conversion.
const float* fp8_e4m3fn_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) {
      t[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
    }
    return t;
  }();
  return table.data();
}

// dst[i] = float(src[i]) for i < n, in parallel.
void fp8_to_f32(const uint8_t* src, float* dst, int64_t n) {
  const float* table = fp8_e4m3fn_table();
  at::parallel_for(0, n, int64_t{1} << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = table[src[i]];
  });
}

at::Tensor fp8_matmul_cpu(const at::Tensor& x_, const at::Tensor& x_scale, const at::Tensor& w_,
                          const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype) {
  constexpr const char* op = "fp8_matmul";
  const int64_t m = check_scaled_matmul(op, x_, x_scale, w_, w_scale, bias, out_dtype, at::ScalarType::Float8_e4m3fn).m;
  const int64_t n = w_.size(0), k = w_.size(1);
  std::vector<int64_t> out_shape(x_.sizes().begin(), x_.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x_.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;

  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const at::Tensor xs = x_scale.contiguous(), ws = w_scale.contiguous();
  const bool xs_row = xs.numel() != 1, ws_col = ws.numel() != 1;
  const float* xsp = xs.const_data_ptr<float>();
  const float* wsp = ws.const_data_ptr<float>();
  // The bias in float32 once: the epilogue adds bias.float(), whatever its dtype.
  std::vector<float> bias_f;
  if (bias.has_value()) {
    const at::Tensor b = bias->contiguous();
    bias_f.resize(n);
    LOWBIT_DISPATCH_FLOATS(b.scalar_type(), "fp8_matmul_cpu_bias", [&] {
      const scalar_t* bp = b.const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < n; ++j) bias_f[j] = to_f32(bp[j]);
    });
  }
  const float* bp = bias_f.empty() ? nullptr : bias_f.data();

  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor xf = at::empty({m, k}, f32);
  fp8_to_f32(static_cast<const uint8_t*>(x.const_data_ptr()), xf.data_ptr<float>(), m * k);
  const int64_t cols_max = std::min(kTileCols, n);
  at::Tensor wf = at::empty({cols_max, k}, f32);
  const uint8_t* wp = static_cast<const uint8_t*>(w.const_data_ptr());

  LOWBIT_DISPATCH_FLOATS(out_dtype, "fp8_matmul_cpu", [&] {
    scalar_t* yp = out.data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < n; n0 += kTileCols) {
      const int64_t cols = std::min(kTileCols, n - n0);
      const at::Tensor wt = wf.narrow(0, 0, cols);   // the first rows: contiguous
      fp8_to_f32(wp + n0 * k, wt.data_ptr<float>(), cols * k);
      at::Tensor acc = at::mm(xf, wt.t());            // [M, cols], contiguous
      float* ap = acc.data_ptr<float>();
      // Epilogue, in the reference's order: (acc * x_scale) * w_scale + bias, rounded once.
      at::parallel_for(0, m, grain_for(cols), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          float* a = ap + r * cols;
          const float sx = xsp[xs_row ? r : 0];
          for (int64_t j = 0; j < cols; ++j) {
            float v = a[j] * sx;
            v = v * wsp[ws_col ? n0 + j : 0];
            if (bp != nullptr) v = v + bp[n0 + j];
            a[j] = v;
          }
          store_f32(a, yp + r * n + n0, cols);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("fp8_matmul", &fp8_matmul_cpu);
}

}  // namespace lowbit::cpu
