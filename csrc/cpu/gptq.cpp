// GPTQ on the CPU: accumulate_hessian and gptq_solve. The Hessian preparation and the
// lazy-batch GEMMs are shared ATen calls (core/gptq.h); this file holds the per-column
// loop of one block, the part that peers run as one framework call per column.
// Semantics: python/lowbit/reference/gptq.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/check.h"
#include "core/gptq.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace lowbit::cpu {
namespace {

void accumulate_hessian_cpu(at::Tensor& hessian, const at::Tensor& x, int64_t num_seen) {
  accumulate_hessian_impl("accumulate_hessian", hessian, x, num_seen);
}

// Output channels are independent in GPTQ (H is shared, each row of W has its own
// errors), so the block's column loop runs over slices of N in parallel. A slice of
// kSlice channels x a 128-column block is 32 KiB of float: it stays in L1/L2 while the
// block's ~B^2/2 row updates sweep over it.
constexpr int64_t kSlice = 64;

// A scale as the layer will store it: raised to scale_dtype's smallest normal value, then
// rounded to it (via float32, as torch casts float64), in the work dtype.
template <typename T>
T round_scale(T s, at::ScalarType dt) {
  if (dt == at::kHalf) {
    return static_cast<T>(static_cast<float>(c10::Half(static_cast<float>(std::max(s, T(6.103515625e-05))))));
  }
  const T tiny = static_cast<T>(std::numeric_limits<float>::min());
  const float f = static_cast<float>(std::max(s, tiny));
  return dt == at::kBFloat16 ? static_cast<T>(static_cast<float>(c10::BFloat16(f))) : static_cast<T>(f);
}

template <typename T>
void block_loop(const GptqPlan& p, const GptqArgs& a, int64_t b0, int64_t b1, T* wt, const T* u,
                T* err, uint8_t* codes, T* scales, int32_t* zeros, const int32_t* group_of,
                std::vector<double>& loss_parts) {
  const int64_t k = p.wt.size(0), n = p.wt.size(1);
  const T maxq = static_cast<T>((1 << a.bits) - 1);
  const int64_t slices = (n + kSlice - 1) / kSlice;
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = s * kSlice, n1 = std::min(n0 + kSlice, n), len = n1 - n0;
      double loss = 0.0;
      for (int64_t q = b0; q < b1; ++q) {
        const int64_t g = group_of[q];
        if (p.params_in_loop && q % p.gs == 0) {
          // The group's columns are all in this block and up to date (core/gptq.h).
          const int64_t r1 = std::min(q + p.gs, k);
          T hi[kSlice], lo[kSlice];
          for (int64_t j = 0; j < len; ++j) hi[j] = lo[j] = T(0);
          for (int64_t r = q; r < r1; ++r) {
            const T* row = wt + r * n + n0;
            if (a.symmetric) {
              for (int64_t j = 0; j < len; ++j) hi[j] = std::max(hi[j], std::abs(row[j]));
            } else {
              for (int64_t j = 0; j < len; ++j) {
                hi[j] = std::max(hi[j], row[j]);
                lo[j] = std::min(lo[j], row[j]);
              }
            }
          }
          const T clip = static_cast<T>(a.clip_ratio);
          for (int64_t j = 0; j < len; ++j) {
            T scale;
            int32_t zero;
            if (a.symmetric) {
              scale = (hi[j] * clip) / static_cast<T>((1 << (a.bits - 1)) - 1);
              if (scale == T(0)) scale = T(1);
              zero = 1 << (a.bits - 1);
            } else {
              scale = (hi[j] * clip - lo[j] * clip) / maxq;
              if (scale == T(0)) scale = T(1);
              zero = static_cast<int32_t>(std::clamp(std::nearbyint(-(lo[j] * clip) / scale), T(0), maxq));
            }
            scales[g * n + n0 + j] = round_scale(scale, a.scale_dtype);
            zeros[g * n + n0 + j] = zero;
          }
        }
        const T* sc = scales + g * n + n0;
        const int32_t* zr = zeros + g * n + n0;
        const T d = u[q * k + q];
        T* row = wt + q * n + n0;
        T* e = err + (q - b0) * n + n0;
        uint8_t* c = codes + q * n + n0;
        for (int64_t j = 0; j < len; ++j) {
          const T z = static_cast<T>(zr[j]);
          const T code = std::clamp(std::nearbyint(row[j] / sc[j]) + z, T(0), maxq);
          const T diff = row[j] - (code - z) * sc[j];
          c[j] = static_cast<uint8_t>(code);
          e[j] = diff / d;
          loss += static_cast<double>(diff) * static_cast<double>(diff);
        }
        const double dd = static_cast<double>(d);
        loss_parts[s] += loss / (dd * dd) / 2.0;
        loss = 0.0;
        // Rank-1 update of the block's later columns; the trailing ones wait for the GEMM.
        for (int64_t r = q + 1; r < b1; ++r) {
          const T ur = u[q * k + r];
          T* dst = wt + r * n + n0;
          for (int64_t j = 0; j < len; ++j) dst[j] -= e[j] * ur;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gptq_solve_cpu(
    const at::Tensor& w, const at::Tensor& hessian, int64_t bits, int64_t group_size, bool symmetric,
    double damp, bool act_order, bool static_groups, int64_t block_size, double clip_ratio,
    at::ScalarType scale_dtype) {
  constexpr const char* op = "gptq_solve";
  const GptqArgs a{bits, group_size, symmetric, damp, act_order, static_groups, block_size, clip_ratio,
                   scale_dtype};
  GptqPlan p = gptq_prepare(op, w, hessian, a);
  const int64_t k = p.wt.size(0), n = p.wt.size(1);
  at::Tensor codes_t = at::empty({k, n}, w.options().dtype(at::kByte));
  std::vector<double> loss_parts((n + kSlice - 1) / kSlice, 0.0);
  const at::Tensor group_of = p.group_of.contiguous();
  auto result = AT_DISPATCH_FLOATING_TYPES(p.wt.scalar_type(), "gptq_solve_cpu", [&] {
    return gptq_run(p, codes_t, [&](int64_t b0, int64_t b1, at::Tensor& e) {
      block_loop<scalar_t>(p, a, b0, b1, p.wt.data_ptr<scalar_t>(), p.u.const_data_ptr<scalar_t>(),
                           e.data_ptr<scalar_t>(), codes_t.data_ptr<uint8_t>(), p.scales.data_ptr<scalar_t>(),
                           p.zeros.data_ptr<int32_t>(), group_of.const_data_ptr<int32_t>(), loss_parts);
    });
  });
  double loss = 0.0;
  for (double v : loss_parts) loss += v;
  auto [codes, scales, zeros, g_idx] = result;
  return {codes, scales, zeros, g_idx, at::scalar_tensor(loss, w.options().dtype(at::kDouble))};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("accumulate_hessian", &accumulate_hessian_cpu);
  m.impl("gptq_solve", &gptq_solve_cpu);
}

}  // namespace lowbit::cpu
