// GPTQ (Frantar et al., 2022, Algorithm 1), the parts shared by the CPU and CUDA kernels:
// argument checks, the Hessian preparation (dead inputs, act-order, dampening, Cholesky of
// the inverse) and the lazy-batch driver. Those are a handful of large ATen calls (LAPACK /
// cuSOLVER, BLAS / cuBLAS); only the per-column loop inside a block is device code, and it
// is passed in. Semantics: python/lowbit/reference/gptq.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/round.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>

#include <cstdint>
#include <limits>
#include <tuple>

#include "core/check.h"

namespace lowbit {

inline void check_hessian_args(const char* op, const at::Tensor& h, const at::Tensor& x) {
  check_dim(op, "hessian", h, 2);
  LOWBIT_CHECK_TYPE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble, op,
                    "argument 'hessian' must be float32 or float64, got ", dtype_name(h.scalar_type()));
  LOWBIT_CHECK(h.size(0) == h.size(1), op, "argument 'hessian' must be square [K, K], got shape ",
               h.sizes());
  LOWBIT_CHECK(h.is_contiguous(), op, "argument 'hessian' must be contiguous (it is updated in place)");
  LOWBIT_CHECK_TYPE(is_float_dtype(x.scalar_type()) || x.scalar_type() == at::kDouble, op,
                    "argument 'x' must be float32, float16, bfloat16 or float64, got ",
                    dtype_name(x.scalar_type()));
  check_min_dim(op, "x", x, 1);
  LOWBIT_CHECK(x.size(-1) == h.size(0), op, "argument 'x' must have last dimension K = ", h.size(0),
               " (the Hessian's size), got shape ", x.sizes());
  check_same_device(op, "x", x, "hessian", h);
}

// H <- (num_seen H + 2 X^T X) / (num_seen + m): one GEMM (SYRK-shaped) per batch, in the
// Hessian's dtype, so a million calibration tokens cost one pass over them.
inline void accumulate_hessian_impl(const char* op, at::Tensor& h, const at::Tensor& x, int64_t num_seen) {
  check_hessian_args(op, h, x);
  LOWBIT_CHECK(num_seen >= 0, op, "argument 'num_seen' must be >= 0, got ", num_seen);
  const int64_t k = h.size(0);
  if (k == 0) return;   // nothing to accumulate (and [-1, 0] is not a shape)
  const at::Tensor xf = x.reshape({-1, k}).to(h.scalar_type());
  const int64_t m = xf.size(0);
  if (m == 0) return;
  const double total = static_cast<double>(num_seen) + static_cast<double>(m);
  h.addmm_(xf.t(), xf, /*beta=*/static_cast<double>(num_seen) / total, /*alpha=*/2.0 / total);
}

struct GptqArgs {
  int64_t bits, group_size;
  bool symmetric;
  double damp;
  bool act_order, static_groups;
  int64_t block_size;
  double clip_ratio;
  at::ScalarType scale_dtype;
};

inline void check_gptq_args(const char* op, const at::Tensor& w, const at::Tensor& h, const GptqArgs& a) {
  check_dim(op, "w", w, 2);
  LOWBIT_CHECK_TYPE(is_float_dtype(w.scalar_type()) || w.scalar_type() == at::kDouble, op,
                    "argument 'w' must be float32, float16, bfloat16 or float64, got ",
                    dtype_name(w.scalar_type()));
  check_dim(op, "hessian", h, 2);
  LOWBIT_CHECK_TYPE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble, op,
                    "argument 'hessian' must be float32 or float64, got ", dtype_name(h.scalar_type()));
  LOWBIT_CHECK(h.size(0) == w.size(1) && h.size(1) == w.size(1), op,
               "argument 'hessian' must be [K, K] = [", w.size(1), ", ", w.size(1),
               "] for a weight of shape ", w.sizes(), ", got ", h.sizes());
  check_same_device(op, "hessian", h, "w", w);
  check_bits(op, a.bits);
  check_group_size(op, a.group_size);
  LOWBIT_CHECK(a.damp >= 0.0 && std::isfinite(a.damp), op,
               "argument 'damp' must be a finite fraction >= 0 of the mean diagonal, got ", a.damp);
  LOWBIT_CHECK(a.block_size > 0, op, "argument 'block_size' must be positive, got ", a.block_size);
  LOWBIT_CHECK(a.clip_ratio > 0.0 && a.clip_ratio <= 1.0, op,
               "argument 'clip_ratio' must be in (0, 1], got ", a.clip_ratio);
  LOWBIT_CHECK_TYPE(a.scale_dtype == at::kFloat || a.scale_dtype == at::kHalf ||
                        a.scale_dtype == at::kBFloat16,
                    op, "argument 'scale_dtype' must be torch.float32, torch.float16 or torch.bfloat16, got ",
                    dtype_name(a.scale_dtype));
}

// Everything the column loop needs, in the work dtype (float64 if w or H is, else float32).
struct GptqPlan {
  at::Tensor wt;        // [K, N] contiguous: row p = column p (processing order) of W
  at::Tensor u;         // [K, K] upper Cholesky factor of the damped H^-1 (processing order)
  at::Tensor perm;      // int64 [K]: processing position -> input column
  at::Tensor group_of;  // int32 [K]: processing position -> group index
  at::Tensor scales;    // [G, N] work dtype: filled here (static, per-channel) or by the loop
  at::Tensor zeros;     // int32 [G, N]
  bool params_in_loop;  // groups computed when the loop reaches them
  int64_t gs, groups, block;
};

// Per-row scale (rounded through scale_dtype) and zero point of wg [N, G, g] groups, the
// formulas of reference.quant.quant_params computed in wg's dtype.
inline std::tuple<at::Tensor, at::Tensor> gptq_group_params(const at::Tensor& wg, const GptqArgs& a) {
  at::Tensor scale, zero;
  if (a.symmetric) {
    scale = wg.abs().amax(-1).mul(a.clip_ratio).div(static_cast<double>((1 << (a.bits - 1)) - 1));
    scale.masked_fill_(scale.eq(0), 1.0);
    zero = at::full_like(scale, static_cast<double>(1 << (a.bits - 1)));
  } else {
    const double maxq = static_cast<double>((1 << a.bits) - 1);
    const at::Tensor hi = wg.amax(-1).clamp_min(0).mul(a.clip_ratio);
    const at::Tensor lo = wg.amin(-1).clamp_max(0).mul(a.clip_ratio);
    scale = hi.sub(lo).div(maxq);
    scale.masked_fill_(scale.eq(0), 1.0);
    zero = at::round(lo.neg().div(scale)).clamp(0, maxq);
  }
  const double tiny = a.scale_dtype == at::kHalf ? 6.103515625e-05 : 1.1754943508222875e-38;
  const at::Tensor stored = scale.clamp_min(tiny).to(a.scale_dtype).to(wg.scalar_type());
  return {stored, zero.to(at::kInt)};
}

// out <- inverse of the lower-triangular l [n, n] (out: an [n, n] view whose upper
// triangle is already zero). Recursive 2x2 blocks, so most of the work is two GEMMs per
// level (the BLAS's fastest path) rather than a triangular solve with an identity.
inline void lower_triangular_inverse(const at::Tensor& l, at::Tensor out) {
  const int64_t n = l.size(0);
  if (n <= 256) {
    out.copy_(at::linalg_solve_triangular(l, at::eye(n, l.options()), /*upper=*/false));
    return;
  }
  const int64_t h = n / 2;
  at::Tensor ai = out.narrow(0, 0, h).narrow(1, 0, h);
  at::Tensor ci = out.narrow(0, h, n - h).narrow(1, h, n - h);
  lower_triangular_inverse(l.narrow(0, 0, h).narrow(1, 0, h), ai);
  lower_triangular_inverse(l.narrow(0, h, n - h).narrow(1, h, n - h), ci);
  at::Tensor lower_left = out.narrow(0, h, n - h).narrow(1, 0, h);
  lower_left.addmm_(at::matmul(ci, l.narrow(0, h, n - h).narrow(1, 0, h)), ai, /*beta=*/0.0, /*alpha=*/-1.0);
}

// NaN or Inf anywhere: a float64 sum is NaN/Inf exactly then (a float32 tensor cannot
// overflow it), one pass instead of isfinite's temporaries.
inline bool all_finite(const at::Tensor& t) {
  return t.numel() == 0 || std::isfinite(t.sum(at::kDouble).item<double>());
}

inline GptqPlan gptq_prepare(const char* op, const at::Tensor& w_, const at::Tensor& h_, const GptqArgs& a) {
  check_gptq_args(op, w_, h_, a);
  const at::ScalarType wt_dtype =
      (w_.scalar_type() == at::kDouble || h_.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const int64_t n = w_.size(0), k = w_.size(1);
  GptqPlan p;
  p.gs = k > 0 ? std::min(a.group_size, k) : a.group_size;
  p.groups = num_groups(k, p.gs);
  LOWBIT_CHECK(all_finite(w_), op,
               "argument 'w' has NaN or Inf; GPTQ needs a finite weight");
  LOWBIT_CHECK(all_finite(h_), op,
               "argument 'hessian' has NaN or Inf (the calibration activations had NaN or Inf); "
               "check the model's outputs on the calibration data in full precision");
  at::Tensor w = w_.to(wt_dtype).clone(at::MemoryFormat::Contiguous);
  at::Tensor h = h_.to(wt_dtype).clone(at::MemoryFormat::Contiguous);
  at::Tensor diag = h.diagonal();
  const at::Tensor dead = diag.eq(0);
  diag.masked_fill_(dead, 1.0);
  w.masked_fill_(dead.unsqueeze(0), 0.0);

  const auto idx = at::TensorOptions().device(w.device());
  p.params_in_loop = !a.static_groups && p.gs < k;
  if (p.params_in_loop) {
    p.scales = at::ones({p.groups, n}, w.options());
    p.zeros = at::zeros({p.groups, n}, w.options().dtype(at::kInt));
  } else {
    // Static groups from the original weight in natural order; per-channel is one group
    // whose statistics no column order changes.
    const int64_t pad = p.groups * p.gs - k;
    const at::Tensor wg = at::constant_pad_nd(w, {0, pad}, 0.0).view({n, p.groups, p.gs});
    auto [s, z] = gptq_group_params(wg, a);
    p.scales = s.t().contiguous();
    p.zeros = z.t().contiguous();
  }

  if (a.act_order) {
    p.perm = at::argsort(h.diagonal(), /*stable=*/true, /*dim=*/0, /*descending=*/true);
    w = w.index_select(1, p.perm);
    h = h.index_select(0, p.perm).index_select(1, p.perm).contiguous();
  } else {
    p.perm = at::arange(k, idx.dtype(at::kLong));
  }
  if (a.static_groups) {
    p.group_of = at::div(p.perm, p.gs, "floor").to(at::kInt);
  } else {
    p.group_of = at::div(at::arange(k, idx.dtype(at::kLong)), p.gs, "floor").to(at::kInt);
  }
  if (k > 0) {
    at::Tensor d = h.diagonal();
    d.add_(d.mean().mul(a.damp));
  }
  // U, the upper Cholesky factor of H^-1, from one factorization: with J the reversal,
  // J H J = M M^T gives H = V V^T for the upper V = J M J, so H^-1 = V^-T V^-1 and
  // U = V^-1 = J M^-1 J. One Cholesky plus a triangular inverse (GEMM-rich) instead of
  // Cholesky, cholesky_inverse and a second Cholesky: half the LAPACK time.
  auto [m, info] = at::linalg_cholesky_ex(h.flip({0, 1}), /*upper=*/false, /*check_errors=*/false);
  LOWBIT_CHECK(info.item<int64_t>() == 0, op, "the damped Hessian is not positive definite (damp = ",
               a.damp, "); raise 'damp' or calibrate on more samples");
  diag.reset();
  h.reset();          // K x K buffers are the memory peak at large K: drop each when done
  at::Tensor m_inv = at::zeros_like(m);
  lower_triangular_inverse(m, m_inv);
  m.reset();
  const at::Tensor u = m_inv.flip({0, 1});
  m_inv.reset();
  p.u = u.contiguous();
  p.wt = w.t().contiguous();
  // Without static groups every block holds whole groups, so a group's scale sees every
  // update from the columns before it (the lazy batch would otherwise leave it stale).
  p.block = p.params_in_loop ? p.gs * std::max<int64_t>(1, a.block_size / p.gs) : a.block_size;
  return p;
}

// Runs the lazy batches: block(b0, b1, err) quantizes columns [b0, b1) of plan.wt in place
// (each row's in-block updates included) and fills err [b1 - b0, N] with the scaled
// errors; the trailing columns then take all of the block's updates in one GEMM.
// Returns codes uint8 [N, K] (original order), scales float32 [N, G], zeros int32 [N, G],
// g_idx int32 [K].
template <typename Block>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gptq_run(GptqPlan& p, at::Tensor& codes_t,
                                                                   Block&& block) {
  const int64_t k = p.wt.size(0), n = p.wt.size(1);
  at::Tensor err = at::empty({std::min(p.block, k), n}, p.wt.options());
  for (int64_t b0 = 0; b0 < k; b0 += p.block) {
    const int64_t b1 = std::min(b0 + p.block, k);
    at::Tensor e = err.narrow(0, 0, b1 - b0);
    block(b0, b1, e);
    if (b1 < k) {
      at::Tensor tail = p.wt.narrow(0, b1, k - b1);
      tail.addmm_(p.u.narrow(0, b0, b1 - b0).narrow(1, b1, k - b1).t(), e, /*beta=*/1.0, /*alpha=*/-1.0);
    }
  }
  at::Tensor codes = at::empty({n, k}, codes_t.options());
  codes.index_copy_(1, p.perm, codes_t.t());
  at::Tensor g_idx = at::empty({k}, p.group_of.options());
  g_idx.index_copy_(0, p.perm, p.group_of);
  return {codes, p.scales.t().to(at::kFloat).contiguous(), p.zeros.t().contiguous(), g_idx};
}

}  // namespace lowbit
