// AWQ's two searches (awq_scale_search, awq_clip_search), the host parts shared by the
// CPU and CUDA kernels: argument checks (ops.py's _check_awq_common and the fake kernels,
// in their order and words), the value checks the fake kernels cannot make, and the
// candidates, built by the reference's torch ops on the input's device so that torch
// rounds them as the reference does. Semantics: python/lowbit/reference/awq.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "core/check.h"

namespace lowbit {

// Bytes of each [rows, K] float32 temporary (differences, their products with the Gram
// matrix): 128 MiB, whatever N and n_grid are.
constexpr int64_t kAwqChunkBytes = int64_t{128} << 20;

// Rows of a [rows, K] float32 temporary of at most kAwqChunkBytes, for `total` rows.
inline int64_t awq_chunk_rows(int64_t total, int64_t k) {
  return std::min(total, std::max<int64_t>(1, kAwqChunkBytes / (4 * k)));
}

inline void check_awq_common(const char* op, const at::Tensor& w, const at::Tensor& gram, int64_t bits,
                             int64_t group_size, at::ScalarType scale_dtype) {
  check_dtype(op, "w", w, at::kFloat);
  check_dim(op, "w", w, 2);
  check_dtype(op, "gram", gram, at::kFloat);
  const int64_t k = w.size(1);
  LOWBIT_CHECK(gram.dim() == 2 && gram.size(0) == k && gram.size(1) == k, op, "argument 'gram' must be [K, K] = [",
               k, ", ", k, "] for 'w' of shape ", w.sizes(), ", got ", gram.sizes());
  check_same_device(op, "gram", gram, "w", w);
  check_bits(op, bits);
  check_group_size(op, group_size);
  check_float_dtype_arg(op, "scale_dtype", scale_dtype);
}

inline void check_awq_scale_search(const char* op, const at::Tensor& w, const at::Tensor& gram,
                                   const at::Tensor& act_mean, int64_t bits, int64_t group_size, int64_t n_grid,
                                   at::ScalarType scale_dtype, double max_value) {
  check_awq_common(op, w, gram, bits, group_size, scale_dtype);
  check_dtype(op, "act_mean", act_mean, at::kFloat);
  const int64_t k = w.size(1);
  LOWBIT_CHECK(act_mean.dim() == 1 && act_mean.size(0) == k, op, "argument 'act_mean' must have shape [", k,
               "] (K of 'w'), got ", act_mean.sizes());
  check_same_device(op, "act_mean", act_mean, "w", w);
  LOWBIT_CHECK(n_grid >= 1, op, "argument 'n_grid' must be >= 1, got ", n_grid);
  LOWBIT_CHECK(max_value > 0, op, "argument 'max_value' must be positive, got ", max_value);
}

inline void check_awq_clip_search(const char* op, const at::Tensor& w, const at::Tensor& gram, int64_t bits,
                                  int64_t group_size, int64_t n_grid, double max_shrink,
                                  at::ScalarType scale_dtype) {
  check_awq_common(op, w, gram, bits, group_size, scale_dtype);
  LOWBIT_CHECK(n_grid >= 1, op, "argument 'n_grid' must be >= 1, got ", n_grid);
  LOWBIT_CHECK(max_shrink >= 0 && max_shrink < 1, op, "argument 'max_shrink' must be in [0, 1), got ", max_shrink);
}

// Index of the first row (1-D: element) of t holding NaN or Inf, or -1. One float64 sum
// in the common case: it is finite exactly when every element is (float32 values cannot
// overflow it).
inline int64_t first_nonfinite_row(const at::Tensor& t) {
  if (t.numel() == 0 || std::isfinite(t.sum(at::kDouble).item<double>())) return -1;
  const at::Tensor bad = (t.dim() == 2 ? t.isfinite().all(1) : t.isfinite()).logical_not().cpu();
  const bool* p = bad.const_data_ptr<bool>();
  for (int64_t i = 0; i < bad.numel(); ++i) {
    if (p[i]) return i;
  }
  return -1;
}

inline void check_finite_w_gram(const char* op, const at::Tensor& w, const at::Tensor& gram) {
  const int64_t bad_w = first_nonfinite_row(w);
  LOWBIT_CHECK(bad_w < 0, op, "argument 'w' holds NaN or Inf (row ", bad_w, "); clean the weight first");
  const int64_t bad_g = first_nonfinite_row(gram);
  LOWBIT_CHECK(bad_g < 0, op, "argument 'gram' holds NaN or Inf (row ", bad_g,
               "): the calibration activations had NaN or Inf; check the model's outputs on the "
               "calibration data in full precision");
}

// The values awq_scale_search's fake kernel cannot check, on contiguous w, gram, act_mean.
inline void check_awq_scale_search_values(const char* op, const at::Tensor& w, const at::Tensor& gram,
                                          const at::Tensor& act_mean) {
  check_finite_w_gram(op, w, gram);
  const int64_t bad_a = first_nonfinite_row(act_mean);
  LOWBIT_CHECK(bad_a < 0, op, "argument 'act_mean' holds NaN or Inf (channel ", bad_a, ")");
  const int64_t k = act_mean.size(0);
  if (k > 0 && act_mean.lt(0).any().item<bool>()) {   // error path only: find the channel
    const at::Tensor a = act_mean.cpu();
    const float* ap = a.const_data_ptr<float>();
    for (int64_t i = 0; i < k; ++i) {
      LOWBIT_CHECK(ap[i] >= 0.f, op, "argument 'act_mean' must be >= 0 (a mean of |x|), got ", ap[i],
                   " at channel ", i);
    }
  }
}

// The candidates' s [n_grid, K], by the reference's torch ops on act_mean's device.
inline at::Tensor awq_scale_candidates(const at::Tensor& act_mean, int64_t n_grid) {
  const int64_t k = act_mean.size(0);
  at::Tensor out = at::empty({n_grid, k}, act_mean.options());
  if (k == 0) return out;
  const at::Tensor x = act_mean.clamp(at::Scalar(1e-4), std::nullopt);
  for (int64_t i = 0; i < n_grid; ++i) {
    const at::Tensor s = x.pow(at::Scalar(static_cast<double>(i) / static_cast<double>(n_grid)));
    out.select(0, i).copy_(s.div(s.max().mul(s.min()).sqrt()));
  }
  return out;
}

// reference.awq.candidate_is_valid for every candidate at once: the indices of the valid
// ones. |w * s| is checked through max_n |w[n, k]| * s[k]: rounding is monotonic, so that
// product is exactly the largest |w[n, k] * s[k]|.
inline std::vector<int64_t> awq_valid_candidates(const at::Tensor& w, const at::Tensor& cands, double max_value) {
  const int64_t n_grid = cands.size(0);
  std::vector<int64_t> valid;
  if (cands.size(1) == 0) {
    for (int64_t i = 0; i < n_grid; ++i) valid.push_back(i);
    return valid;
  }
  const at::Tensor inv = cands.reciprocal();
  at::Tensor ok = cands.isfinite().all(1).logical_and(inv.isfinite().all(1)).logical_and(inv.le(max_value).all(1));
  if (w.size(0) > 0) {
    const at::Tensor ws = w.abs().amax(0).unsqueeze(0).mul(cands);
    ok = ok.logical_and(ws.isfinite().all(1)).logical_and(ws.le(max_value).all(1));
  }
  const at::Tensor ok_cpu = ok.cpu();
  const bool* p = ok_cpu.const_data_ptr<bool>();
  for (int64_t i = 0; i < n_grid; ++i) {
    if (p[i]) valid.push_back(i);
  }
  return valid;
}

// The first candidate of least loss (losses[0, n_grid), n_grid >= 1).
inline int64_t awq_best_candidate(const double* losses, int64_t n_grid) {
  int64_t best = 0;
  for (int64_t i = 1; i < n_grid; ++i) {
    if (losses[i] < losses[best]) best = i;
  }
  return best;
}

// Clip search's ratios, largest first: 1 - i / n_grid for i < max(1, max_shrink * n_grid).
inline std::vector<float> awq_clip_ratios(double max_shrink, int64_t n_grid) {
  const int64_t n_ratio = std::max<int64_t>(1, static_cast<int64_t>(max_shrink * static_cast<double>(n_grid)));
  std::vector<float> clips(n_ratio);
  for (int64_t i = 0; i < n_ratio; ++i) {
    clips[i] = static_cast<float>(1.0 - static_cast<double>(i) / static_cast<double>(n_grid));
  }
  return clips;
}

// awq_clip_search's outputs for w [N, K] in G groups: scales (float32), zeros (int32)
// and ratios (float32), each [N, G].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> awq_clip_outputs(const at::Tensor& w, int64_t g) {
  const int64_t n = w.size(0);
  return {at::empty({n, g}, w.options()), at::empty({n, g}, w.options().dtype(at::kInt)),
          at::empty({n, g}, w.options())};
}

// Clip search's per-group products: e[:rows, group] = d[:rows, group] G_gg for each of
// the g groups of gs columns (the last one shorter), G_gg gram's diagonal block.
inline void awq_group_gemms(at::Tensor& e, const at::Tensor& d, const at::Tensor& gram, int64_t rows, int64_t gs,
                            int64_t g) {
  const int64_t k = d.size(1);
  for (int64_t gi = 0; gi < g; ++gi) {
    const int64_t k0 = gi * gs, len = std::min(k, k0 + gs) - k0;
    at::Tensor ev = e.narrow(0, 0, rows).narrow(1, k0, len);
    at::mm_out(ev, d.narrow(0, 0, rows).narrow(1, k0, len), gram.narrow(0, k0, len).narrow(1, k0, len));
  }
}

}  // namespace lowbit
