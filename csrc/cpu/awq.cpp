// AWQ's two searches on the CPU: awq_scale_search and awq_clip_search.
// Semantics: python/lowbit/reference/awq.py.
//
// Peers measure each candidate by a forward over the calibration tokens. Here a candidate
// costs one pass that scales, rounds, dequantizes, unscales and subtracts (fused, one
// group per task) and a product with the Gram matrix [K, K]: scale search batches many
// candidates' differences into one GEMM, chunked to bound memory; clip search evaluates
// small groups' quadratic forms d G_gg d^T in place, every ratio of a group in one task.
//
// The grid arithmetic is csrc/cpu/quant.cpp's (csrc/cpu/grid.h, -ffp-contract=off), so
// every rounded weight equals the reference's bit for bit; only the GEMM's summation
// order differs.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "core/awq.h"
#include "core/check.h"
#include "cpu/common.h"
#include "cpu/grid.h"

namespace lowbit::cpu {
namespace {

// Clip search computes a group's quadratic form directly up to this many columns; longer
// groups (per-channel) take a GEMM per group instead.
constexpr int64_t kDirectMax = 128;
constexpr double kInf = std::numeric_limits<double>::infinity();

// The RTN grid of reference/quant.py and the scale rounding of QuantLinear.from_linear.
struct Grid {
  bool symmetric;
  float qmax, maxq;
  int32_t sym_zero;
  at::ScalarType scale_dtype;

  Grid(int64_t bits, bool sym, at::ScalarType sd)
      : symmetric(sym),
        qmax(static_cast<float>((1 << (bits - 1)) - 1)),
        maxq(static_cast<float>((1 << bits) - 1)),
        sym_zero(1 << (bits - 1)),
        scale_dtype(sd) {}

  // quant_params' scale and zero of a group whose range, widened to hold 0, is [lo, hi].
  void params(float hi, float lo, float clip, float& scale, int32_t& zero) const {
    rtn_params(hi, lo, clip, symmetric, qmax, maxq, sym_zero, scale, zero);
  }

  // scale.clamp(min=finfo(scale_dtype).tiny).to(scale_dtype).float(): inf on overflow.
  float stored(float s) const {
    if (scale_dtype == at::kHalf) return to_f32(from_f32<c10::Half>(std::max(s, 6.103515625e-05f)));
    s = std::max(s, std::numeric_limits<float>::min());
    return scale_dtype == at::kBFloat16 ? to_f32(from_f32<c10::BFloat16>(s)) : s;
  }

  // dequantize(quantize(v)) on the grid (st, z).
  float round(float v, float st, float z) const { return (rtn_code(v, st, z, maxq) - z) * st; }
};

// sum a[j] * b[j] in float64 (products of float32 values are exact there), kLanes
// partial sums so that GCC vectorises it.
inline double dot_f64(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(a[j + l]) * static_cast<double>(b[j + l]);
  }
  for (; j < n; ++j) acc[0] += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// -- scale search -----------------------------------------------------------------------

// Rows [r0, r0 + rows) of the virtual [valid * N, K] matrix of differences
// W_hat / s - W (row v: candidate cand[v / N], weight row v % N) into d [rows, K], one
// group per task. A group whose stored scale overflows marks its candidate and leaves
// zeros (the candidate's loss becomes inf).
void scaled_diff(const float* w, const float* cands, const int64_t* cand, float* d, int64_t r0, int64_t rows,
                 int64_t n, int64_t k, int64_t gs, int64_t g, const Grid& grid, std::atomic<bool>* overflow) {
  at::parallel_for(0, rows * g, grain_for(std::min(gs, k)), [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t lr = item / g, gi = item - lr * g, v = r0 + lr, c = cand[v / n], row = v % n;
      const int64_t k0 = gi * gs, len = std::min(k, k0 + gs) - k0;
      const float* __restrict__ wr = w + row * k + k0;
      const float* __restrict__ sr = cands + c * k + k0;
      float* __restrict__ dr = d + lr * k + k0;
      for (int64_t j = 0; j < len; ++j) dr[j] = wr[j] * sr[j];   // the scaled weight, scratch
      RangeAcc acc;
      acc.add(dr, len);
      float scale;
      int32_t zero;
      grid.params(acc.max(), acc.min(), 1.f, scale, zero);
      const float st = grid.stored(scale);
      if (!std::isfinite(st)) {
        overflow[c].store(true, std::memory_order_relaxed);
        std::fill(dr, dr + len, 0.f);
        continue;
      }
      const float z = static_cast<float>(zero);
      for (int64_t j = 0; j < len; ++j) dr[j] = grid.round(dr[j], st, z) / sr[j] - wr[j];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> awq_scale_search_cpu(const at::Tensor& w_, const at::Tensor& gram_,
                                                        const at::Tensor& act_mean_, int64_t bits, int64_t group_size,
                                                        bool symmetric, int64_t n_grid, at::ScalarType scale_dtype,
                                                        double max_value) {
  constexpr const char* op = "awq_scale_search";
  check_awq_scale_search(op, w_, gram_, act_mean_, bits, group_size, n_grid, scale_dtype, max_value);
  const at::Tensor w = w_.contiguous(), gram = gram_.contiguous(), act_mean = act_mean_.contiguous();
  check_awq_scale_search_values(op, w, gram, act_mean);

  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor losses = at::zeros({n_grid}, w.options().dtype(at::kDouble));
  const at::Tensor cands = awq_scale_candidates(act_mean, n_grid);
  if (k == 0) return {losses, cands.select(0, 0).clone()};

  const std::vector<int64_t> cand = awq_valid_candidates(w, cands, max_value);
  const int64_t nv = static_cast<int64_t>(cand.size()), total = nv * n;
  std::vector<double> row_loss(total);
  std::unique_ptr<std::atomic<bool>[]> overflow(new std::atomic<bool>[n_grid]);
  for (int64_t i = 0; i < n_grid; ++i) overflow[i].store(false);
  if (total > 0) {
    const Grid grid(bits, symmetric, scale_dtype);
    const int64_t gs = std::min(group_size, k), g = num_groups(k, group_size);
    const int64_t chunk = awq_chunk_rows(total, k);
    at::Tensor d = at::empty({chunk, k}, w.options()), dg = at::empty({chunk, k}, w.options());
    for (int64_t r0 = 0; r0 < total; r0 += chunk) {
      const int64_t rows = std::min(chunk, total - r0);
      scaled_diff(w.const_data_ptr<float>(), cands.const_data_ptr<float>(), cand.data(), d.data_ptr<float>(), r0,
                  rows, n, k, gs, g, grid, overflow.get());
      at::Tensor dgv = dg.narrow(0, 0, rows);
      at::mm_out(dgv, d.narrow(0, 0, rows), gram);
      const float* dp = d.const_data_ptr<float>();
      const float* gp = dg.const_data_ptr<float>();
      at::parallel_for(0, rows, grain_for(k), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) row_loss[r0 + r] = dot_f64(gp + r * k, dp + r * k, k);
      });
    }
  }

  double* lp = losses.data_ptr<double>();
  std::fill(lp, lp + n_grid, kInf);
  for (int64_t j = 0; j < nv; ++j) {
    double sum = 0.0;
    for (int64_t r = 0; r < n; ++r) sum += row_loss[j * n + r];
    lp[cand[j]] = overflow[cand[j]].load() || std::isnan(sum) ? kInf : sum;
  }
  return {losses, cands.select(0, awq_best_candidate(lp, n_grid)).clone()};
}

// -- clip search ------------------------------------------------------------------------

// Groups of at most kDirectMax columns: each task takes one (row, group), finds its range
// once and tries every ratio, evaluating d G_gg d^T in float64 from the gram block.
void clip_direct(const float* w, const float* gram, int64_t n, int64_t k, int64_t gs, int64_t g, const Grid& grid,
                 const std::vector<float>& clips, float* out_scale, int32_t* out_zero, float* out_ratio) {
  const int64_t n_ratio = static_cast<int64_t>(clips.size());
  at::parallel_for(0, n * g, grain_for(gs * gs * n_ratio), [&](int64_t b, int64_t e) {
    double d[kDirectMax], t[kDirectMax];
    for (int64_t item = b; item < e; ++item) {
      const int64_t row = item / g, gi = item - row * g;
      const int64_t k0 = gi * gs, len = std::min(k, k0 + gs) - k0;
      const float* __restrict__ wr = w + row * k + k0;
      const float* gb = gram + k0 * k + k0;
      RangeAcc acc;
      acc.add(wr, len);
      const float hi = acc.max(), lo = acc.min();
      double best_err = kInf;
      for (int64_t i = 0; i < n_ratio; ++i) {
        float scale;
        int32_t zero;
        grid.params(hi, lo, clips[i], scale, zero);
        const float st = grid.stored(scale);
        double err = kInf;
        if (std::isfinite(st)) {
          const float z = static_cast<float>(zero);
          for (int64_t j = 0; j < len; ++j) d[j] = static_cast<double>(grid.round(wr[j], st, z) - wr[j]);
          std::fill(t, t + len, 0.0);
          // t = G_gg^T d, a row of the block at a time (contiguous, vectorised over columns).
          for (int64_t j = 0; j < len; ++j) {
            const double dj = d[j];
            const float* __restrict__ gj = gb + j * k;
            for (int64_t c = 0; c < len; ++c) t[c] += static_cast<double>(gj[c]) * dj;
          }
          err = 0.0;
          for (int64_t c = 0; c < len; ++c) err += d[c] * t[c];
          if (std::isnan(err)) err = kInf;
        }
        if (i == 0 || err < best_err) {   // strict: equal errors keep the larger ratio
          best_err = err;
          out_scale[item] = st;
          out_zero[item] = zero;
          out_ratio[item] = clips[i];
        }
      }
    }
  });
}

// Longer groups: per chunk of rows and ratio, the fused difference pass, one GEMM per
// group against its gram block (float32), the per-group dot products in float64.
void clip_gemm(const at::Tensor& w, const at::Tensor& gram, int64_t gs, int64_t g, const Grid& grid,
               const std::vector<float>& clips, float* out_scale, int32_t* out_zero, float* out_ratio) {
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t chunk = awq_chunk_rows(n, k);
  at::Tensor d = at::empty({chunk, k}, w.options()), e = at::empty({chunk, k}, w.options());
  std::vector<float> cs(chunk * g);
  std::vector<int32_t> cz(chunk * g);
  std::vector<double> best_err(chunk * g);
  const float* wp = w.const_data_ptr<float>();
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    for (size_t i = 0; i < clips.size(); ++i) {
      float* dp = d.data_ptr<float>();
      at::parallel_for(0, rows * g, grain_for(gs), [&](int64_t b, int64_t end) {
        for (int64_t item = b; item < end; ++item) {
          const int64_t lr = item / g, gi = item - lr * g;
          const int64_t k0 = gi * gs, len = std::min(k, k0 + gs) - k0;
          const float* __restrict__ wr = wp + (r0 + lr) * k + k0;
          float* __restrict__ dr = dp + lr * k + k0;
          RangeAcc acc;
          acc.add(wr, len);
          float scale;
          int32_t zero;
          grid.params(acc.max(), acc.min(), clips[i], scale, zero);
          const float st = grid.stored(scale);
          cs[item] = st;
          cz[item] = zero;
          if (!std::isfinite(st)) {
            std::fill(dr, dr + len, 0.f);
            continue;
          }
          const float z = static_cast<float>(zero);
          for (int64_t j = 0; j < len; ++j) dr[j] = grid.round(wr[j], st, z) - wr[j];
        }
      });
      awq_group_gemms(e, d, gram, rows, gs, g);
      const float* ep = e.const_data_ptr<float>();
      at::parallel_for(0, rows * g, grain_for(gs), [&](int64_t b, int64_t end) {
        for (int64_t item = b; item < end; ++item) {
          const int64_t lr = item / g, gi = item - lr * g;
          const int64_t k0 = gi * gs, len = std::min(k, k0 + gs) - k0;
          double err = kInf;
          if (std::isfinite(cs[item])) {
            err = dot_f64(ep + lr * k + k0, dp + lr * k + k0, len);
            if (std::isnan(err)) err = kInf;
          }
          const int64_t o = r0 * g + item;
          if (i == 0 || err < best_err[item]) {
            best_err[item] = err;
            out_scale[o] = cs[item];
            out_zero[o] = cz[item];
            out_ratio[o] = clips[i];
          }
        }
      });
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> awq_clip_search_cpu(const at::Tensor& w_, const at::Tensor& gram_,
                                                                   int64_t bits, int64_t group_size, bool symmetric,
                                                                   int64_t n_grid, double max_shrink,
                                                                   at::ScalarType scale_dtype) {
  constexpr const char* op = "awq_clip_search";
  check_awq_clip_search(op, w_, gram_, bits, group_size, n_grid, max_shrink, scale_dtype);
  const at::Tensor w = w_.contiguous(), gram = gram_.contiguous();
  check_finite_w_gram(op, w, gram);
  const int64_t n = w.size(0), k = w.size(1), g = num_groups(k, group_size);
  const auto [scales, zeros, ratios] = awq_clip_outputs(w, g);
  if (n * g == 0) return {scales, zeros, ratios};

  const std::vector<float> clips = awq_clip_ratios(max_shrink, n_grid);
  const Grid grid(bits, symmetric, scale_dtype);
  const int64_t gs = std::min(group_size, k);
  if (gs <= kDirectMax) {
    clip_direct(w.const_data_ptr<float>(), gram.const_data_ptr<float>(), n, k, gs, g, grid, clips,
                scales.data_ptr<float>(), zeros.data_ptr<int32_t>(), ratios.data_ptr<float>());
  } else {
    clip_gemm(w, gram, gs, g, grid, clips, scales.data_ptr<float>(), zeros.data_ptr<int32_t>(),
              ratios.data_ptr<float>());
  }
  return {scales, zeros, ratios};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("awq_scale_search", &awq_scale_search_cpu);
  m.impl("awq_clip_search", &awq_clip_search_cpu);
}

}  // namespace lowbit::cpu
