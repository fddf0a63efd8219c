// Argument checks shared by the CPU and CUDA kernels of every op: one macro set, one
// wording. Messages name the op and the argument, say what was expected and what came.
// The fake kernels in python/lowbit/ops.py make the same checks with the same words.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

// Value errors (ValueError in Python) and type errors (TypeError).
#define LOWBIT_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, "lowbit.", op, ": ", __VA_ARGS__)
#define LOWBIT_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "lowbit.", op, ": ", __VA_ARGS__)

namespace lowbit {

// "torch.float16", as Python prints a dtype, so C++ and fake-kernel messages read alike.
inline std::string dtype_name(at::ScalarType t) {
  return std::string("torch.") + std::string(c10::getDtypeNames(t).first);
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_fp8_dtype(at::ScalarType t) {
  return t == at::ScalarType::Float8_e4m3fn || t == at::ScalarType::Float8_e5m2;
}

inline void check_float(const char* op, const char* arg, const at::Tensor& t) {
  LOWBIT_CHECK_TYPE(is_float_dtype(t.scalar_type()), op, "argument '", arg,
                    "' must be float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

inline void check_float_dtype_arg(const char* op, const char* arg, at::ScalarType t) {
  LOWBIT_CHECK_TYPE(is_float_dtype(t), op, "argument '", arg,
                    "' must be torch.float32, torch.float16 or torch.bfloat16, got ", dtype_name(t));
}

inline void check_fp8_dtype_arg(const char* op, const char* arg, at::ScalarType t) {
  LOWBIT_CHECK_TYPE(is_fp8_dtype(t), op, "argument '", arg,
                    "' must be torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype_name(t));
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  LOWBIT_CHECK_TYPE(t.scalar_type() == want, op, "argument '", arg, "' must be ", dtype_name(want),
                    ", got ", dtype_name(t.scalar_type()));
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  LOWBIT_CHECK(t.dim() == dim, op, "argument '", arg, "' must be ", dim, "-D, got shape ",
               t.sizes());
}

inline void check_min_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  LOWBIT_CHECK(t.dim() >= dim, op, "argument '", arg, "' must have at least ", dim,
               " dimension(s), got shape ", t.sizes());
}

inline void check_bits(const char* op, int64_t bits) {
  LOWBIT_CHECK(bits >= 2 && bits <= 8, op, "argument 'bits' must be in [2, 8], got ", bits);
}

inline void check_group_size(const char* op, int64_t group_size) {
  LOWBIT_CHECK(group_size > 0, op, "argument 'group_size' must be a positive number of columns ",
               "(use group_size = K for per-channel), got ", group_size);
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                              const char* ref_arg, const at::Tensor& ref) {
  LOWBIT_CHECK(t.device() == ref.device(), op, "argument '", arg, "' is on ", t.device(),
               " but '", ref_arg, "' is on ", ref.device(), "; move them to one device");
}

// Written so that a huge group_size cannot overflow (the fake kernels use Python ints).
inline int64_t num_groups(int64_t k, int64_t group_size) { return k == 0 ? 0 : (k - 1) / group_size + 1; }

inline int64_t packed_rows(int64_t rows, int64_t bits) { return (rows * bits + 31) / 32; }

// scales float [N, G] and zeros int32 [N, G] matching a weight or codes [N, K].
inline void check_grid(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group_size) {
  check_group_size(op, group_size);
  check_dim(op, arg, t, 2);
  check_float(op, "scales", scales);
  check_dtype(op, "zeros", zeros, at::kInt);
  check_same_device(op, "scales", scales, arg, t);
  check_same_device(op, "zeros", zeros, arg, t);
  const int64_t n = t.size(0), g = num_groups(t.size(1), group_size);
  LOWBIT_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == g, op,
               "argument 'scales' must have shape [", n, ", ", g, "] for '", arg, "' of shape ",
               t.sizes(), " and group_size ", group_size, ", got ", scales.sizes());
  LOWBIT_CHECK(zeros.sizes() == scales.sizes(), op, "argument 'zeros' must have the shape of 'scales' ",
               scales.sizes(), ", got ", zeros.sizes());
}

// Rows of x [..., K]: the product of its leading dims (tokens, or output channels).
inline int64_t leading_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

// Shape of a per-row scale for x [..., K]: x.shape[:-1] + (1,).
inline std::vector<int64_t> row_scale_shape(const at::Tensor& x) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = 1;
  return s;
}

// A static scale for x [..., K]: one value (per-tensor) or one per row, of shape
// x.shape[:-1] + (1,) or [rows]. Returns true when it is per-row.
inline bool check_row_scale(const char* op, const at::Tensor& x, const at::Tensor& scale) {
  check_dtype(op, "scale", scale, at::kFloat);
  check_same_device(op, "scale", scale, "x", x);
  if (scale.numel() == 1) return false;
  const std::vector<int64_t> row_shape = row_scale_shape(x);
  const bool ok = scale.sizes() == at::IntArrayRef(row_shape) ||
                  (scale.dim() == 1 && scale.size(0) == leading_rows(x));
  LOWBIT_CHECK(ok, op, "argument 'scale' must hold one value (per-tensor) or one per row, shape ",
               at::IntArrayRef(row_shape), ", for 'x' of shape ", x.sizes(), "; got ", scale.sizes());
  return true;
}

}  // namespace lowbit
