// Argument checks of the activation ops (activation_stats, quantize_per_tensor_int8),
// shared by their CPU and CUDA kernels. The fake kernels in python/lowbit/ops.py
// (_check_activation_stats, _quantize_per_tensor_int8_fake) make the same checks, in
// this order, with these words.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "core/check.h"

namespace lowbit {

inline void check_activation_stats(const char* op, const at::Tensor& absmax, const at::Tensor& abssum,
                                   const at::Tensor& x) {
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_dim(op, "absmax", absmax, 1);
  check_dtype(op, "abssum", abssum, at::kDouble);
  check_dim(op, "abssum", abssum, 1);
  check_float(op, "x", x);
  check_min_dim(op, "x", x, 1);
  const int64_t k = absmax.size(0);
  LOWBIT_CHECK(abssum.size(0) == k, op, "argument 'abssum' must have shape [", k, "] like 'absmax', got ",
               abssum.sizes());
  LOWBIT_CHECK(x.size(-1) == k, op, "argument 'x' must have last dimension K = ", k,
               " (the length of 'absmax'), got shape ", x.sizes());
  LOWBIT_CHECK(absmax.is_contiguous() && abssum.is_contiguous(), op,
               "arguments 'absmax' and 'abssum' must be contiguous (they are updated in place)");
  check_same_device(op, "abssum", abssum, "absmax", absmax);
  check_same_device(op, "x", x, "absmax", absmax);
}

inline void check_quantize_per_tensor_int8(const char* op, const at::Tensor& x, const at::Tensor& scale) {
  check_float(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_dtype(op, "scale", scale, at::kFloat);
  LOWBIT_CHECK(scale.numel() == 1, op, "argument 'scale' must hold exactly one value (per-tensor), got shape ",
               scale.sizes());
  check_same_device(op, "scale", scale, "x", x);
}

// The scale's value: data-dependent, so the fake kernel cannot check it.
inline void check_tensor_scale_value(const char* op, float s) {
  LOWBIT_CHECK(std::isfinite(s) && s > 0.f, op, "argument 'scale' must be positive and finite, got ", s);
}

}  // namespace lowbit
