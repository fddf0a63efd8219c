// Argument checks of the scaled quantized matmuls (int8_matmul, fp8_matmul), shared by
// their CPU and CUDA kernels. The fake kernels in python/lowbit/ops.py
// (_check_scaled_matmul) make the same checks, in this order, with these words.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "core/check.h"

namespace lowbit {

// M rows of x (product of its leading dims), N output channels, K input features.
struct ScaledMatmulSizes {
  int64_t m, n, k;
};

// y = (x @ w^T) * x_scale * w_scale + bias with x [..., K] and w [N, K] of dtype qdtype,
// x_scale per-tensor or per row of x, w_scale per-tensor or per output channel.
inline ScaledMatmulSizes check_scaled_matmul(const char* op, const at::Tensor& x, const at::Tensor& x_scale,
                                             const at::Tensor& w, const at::Tensor& w_scale,
                                             const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                                             at::ScalarType qdtype) {
  check_dtype(op, "x", x, qdtype);
  check_min_dim(op, "x", x, 1);
  check_dtype(op, "w", w, qdtype);
  check_dim(op, "w", w, 2);
  check_dtype(op, "x_scale", x_scale, at::kFloat);
  check_dtype(op, "w_scale", w_scale, at::kFloat);
  check_float_dtype_arg(op, "out_dtype", out_dtype);
  check_same_device(op, "w", w, "x", x);
  check_same_device(op, "x_scale", x_scale, "x", x);
  check_same_device(op, "w_scale", w_scale, "x", x);
  const int64_t n = w.size(0), k = w.size(1), rows = leading_rows(x);
  LOWBIT_CHECK(x.size(-1) == k, op, "argument 'x' must have last dimension K = ", k, " (the columns of 'w' ",
               w.sizes(), "), got shape ", x.sizes());
  const std::vector<int64_t> row_shape = row_scale_shape(x);
  const bool xs_ok = x_scale.numel() == 1 || x_scale.sizes() == at::IntArrayRef(row_shape) ||
                     (x_scale.dim() == 1 && x_scale.size(0) == rows);
  LOWBIT_CHECK(xs_ok, op, "argument 'x_scale' must hold one value (per-tensor) or one per row of 'x', shape ",
               at::IntArrayRef(row_shape), "; got ", x_scale.sizes());
  LOWBIT_CHECK(w_scale.numel() == 1 || (w_scale.dim() == 1 && w_scale.size(0) == n), op,
               "argument 'w_scale' must hold one value (per-tensor) or one per output channel, shape [", n,
               "]; got ", w_scale.sizes());
  if (bias.has_value()) {
    check_float(op, "bias", *bias);
    check_same_device(op, "bias", *bias, "x", x);
    LOWBIT_CHECK(bias->dim() == 1 && bias->size(0) == n, op, "argument 'bias' must have shape [", n, "], got ",
                 bias->sizes());
  }
  return {rows, n, k};
}

// The largest K whose int32 accumulator cannot overflow: 128 * 128 * K < 2^31.
constexpr int64_t kInt8MatmulMaxK = (int64_t{1} << 31) / (128 * 128) - 1;

// int8_matmul's checks: the scaled-matmul ones, then K's bound (int8 only).
inline ScaledMatmulSizes check_int8_matmul(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                           at::ScalarType out_dtype) {
  constexpr const char* op = "int8_matmul";
  const ScaledMatmulSizes sz = check_scaled_matmul(op, x, x_scale, w, w_scale, bias, out_dtype, at::kChar);
  LOWBIT_CHECK(sz.k <= kInt8MatmulMaxK, op, "K = ", sz.k, " is too large: the int32 accumulator is exact only for K <= ",
               kInt8MatmulMaxK, " (|sum_k x*w| <= 128 * 128 * K < 2^31)");
  return sz;
}

}  // namespace lowbit
