// Argument checks of weight_only_matmul, shared by its CPU and CUDA kernels. The fake
// kernel in python/lowbit/ops.py makes the same checks, in this order, with these words.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "core/check.h"

namespace lowbit {

// Sizes of a weight-only matmul: M rows of x (product of its leading dims), N output
// features, K input features, G groups per row of the weight.
struct MatmulSizes {
  int64_t m, n, k, g;
};

inline MatmulSizes check_weight_only_matmul(const at::Tensor& x, const at::Tensor& qweight,
                                            const at::Tensor& scales, const at::Tensor& zeros,
                                            int64_t bits, int64_t group_size,
                                            const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "weight_only_matmul";
  check_float(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_dtype(op, "qweight", qweight, at::kInt);
  check_dim(op, "qweight", qweight, 2);
  check_float(op, "scales", scales);
  LOWBIT_CHECK_TYPE(zeros.scalar_type() == at::kInt || zeros.scalar_type() == at::kByte, op,
                    "argument 'zeros' must be torch.int32 or torch.uint8, got ",
                    dtype_name(zeros.scalar_type()));
  check_bits(op, bits);
  check_group_size(op, group_size);
  check_same_device(op, "qweight", qweight, "x", x);
  check_same_device(op, "scales", scales, "x", x);
  check_same_device(op, "zeros", zeros, "x", x);
  const int64_t k = x.size(-1), n = qweight.size(1), g = num_groups(k, group_size);
  LOWBIT_CHECK(qweight.size(0) == packed_rows(k, bits), op, "argument 'qweight' must have ",
               packed_rows(k, bits), " rows of words for K=", k, " (the last dim of 'x') and bits=",
               bits, ", got shape ", qweight.sizes());
  LOWBIT_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == g, op,
               "argument 'scales' must have shape [", n, ", ", g, "] for 'qweight' of shape ",
               qweight.sizes(), ", K=", k, " and group_size ", group_size, ", got ", scales.sizes());
  LOWBIT_CHECK(zeros.sizes() == scales.sizes(), op, "argument 'zeros' must have the shape of 'scales' ",
               scales.sizes(), ", got ", zeros.sizes());
  if (bias.has_value()) {
    check_float(op, "bias", *bias);
    check_same_device(op, "bias", *bias, "x", x);
    LOWBIT_CHECK(bias->dim() == 1 && bias->size(0) == n, op, "argument 'bias' must have shape [", n,
                 "], got ", bias->sizes());
  }
  return {leading_rows(x), n, k, g};
}

}  // namespace lowbit
