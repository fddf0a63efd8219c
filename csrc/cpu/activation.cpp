// Activations on the CPU: dynamic per-token and static per-tensor int8 quantization, and
// the calibration statistics (per-channel max |x|, sum |x|). Semantics:
// python/lowbit/reference/activation.py.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/activation.h"
#include "core/check.h"
#include "core/dispatch.h"
#include "cpu/common.h"

namespace lowbit::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cpu(const at::Tensor& x_) {
  constexpr const char* op = "quantize_per_token_int8";
  check_float(op, "x", x_);
  check_min_dim(op, "x", x_, 1);
  const at::Tensor x = x_.contiguous();
  const int64_t k = x.size(-1), rows = leading_rows(x);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty(row_scale_shape(x), x.options().dtype(at::kFloat));
  int8_t* cp = codes.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  FirstBad bad;

  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "quantize_per_token_int8_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(k), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* src = xp + r * k;
        RangeAcc acc;
        acc.add(src, k);
        if (!acc.finite()) {
          bad.flag(r);
          continue;
        }
        float s = acc.absmax() / 127.f;
        if (s == 0.f) s = 1.f;
        sp[r] = s;
        float buf[kBlock];
        for (int64_t b0 = 0; b0 < k; b0 += kBlock) {
          const int64_t m = std::min(kBlock, k - b0);
          const float* f = as_f32(src + b0, buf, m);
          int8_t* dst = cp + r * k + b0;
          for (int64_t j = 0; j < m; ++j) {
            float q = std::nearbyint(f[j] / s);
            q = q < -128.f ? -128.f : (q > 127.f ? 127.f : q);
            dst[j] = static_cast<int8_t>(static_cast<int32_t>(q));
          }
        }
      }
    });
  });
  LOWBIT_CHECK(bad.get() < 0, op, "argument 'x' holds NaN or Inf (row ", bad.get(),
               "), which would poison the dynamic scale");
  return {codes, scales};
}

// -- activation_stats -------------------------------------------------------------------

// Columns per task: each task owns a slice of K, so no two threads touch one column, and
// its running max / sum / finiteness (5 KiB) stay in L1 while it walks down the rows.
constexpr int64_t kStatCols = 256;

// Statistics of columns [c0, c0 + n) over all rows into new_max / new_sum (already
// combined with the old values), or flags the first row of the slice holding NaN or Inf.
template <typename T>
void column_stats(const T* x, int64_t rows, int64_t k, int64_t c0, int64_t n, const float* old_max,
                  const double* old_sum, float* new_max, double* new_sum, FirstBad& bad) {
  float m[kStatCols] = {}, poison[kStatCols] = {}, buf[kStatCols];
  double s[kStatCols] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const float* f = as_f32(x + r * k + c0, buf, n);
    for (int64_t j = 0; j < n; ++j) {
      const float a = std::fabs(f[j]);
      m[j] = a > m[j] ? a : m[j];
      s[j] += static_cast<double>(a);
      poison[j] += f[j] * 0.f;   // NaN once any element is NaN or Inf
    }
  }
  float p = 0.f;
  for (int64_t j = 0; j < n; ++j) p += poison[j];
  if (p != 0.f) {
    // Error path only: find the first bad row of this slice (FirstBad keeps the least
    // over all slices).
    for (int64_t r = 0; r < rows; ++r) {
      const float* f = as_f32(x + r * k + c0, buf, n);
      for (int64_t j = 0; j < n; ++j) {
        if (!std::isfinite(f[j])) {
          bad.flag(r);
          return;
        }
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const float a0 = old_max[c0 + j];
    new_max[c0 + j] = m[j] > a0 ? m[j] : a0;
    new_sum[c0 + j] = old_sum[c0 + j] + s[j];
  }
}

void activation_stats_cpu(at::Tensor& absmax, at::Tensor& abssum, const at::Tensor& x_) {
  constexpr const char* op = "activation_stats";
  check_activation_stats(op, absmax, abssum, x_);
  const int64_t k = x_.size(-1), rows = leading_rows(x_);
  if (rows == 0 || k == 0) return;
  const at::Tensor x = x_.contiguous();
  // Results go to scratch first: on NaN / Inf the outputs are left as they were.
  std::vector<float> new_max(k);
  std::vector<double> new_sum(k);
  const float* old_max = absmax.const_data_ptr<float>();
  const double* old_sum = abssum.const_data_ptr<double>();
  FirstBad bad;
  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "activation_stats_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t slices = (k + kStatCols - 1) / kStatCols;
    at::parallel_for(0, slices, grain_for(rows * kStatCols), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t c0 = i * kStatCols;
        column_stats(xp, rows, k, c0, std::min(kStatCols, k - c0), old_max, old_sum, new_max.data(),
                     new_sum.data(), bad);
      }
    });
  });
  LOWBIT_CHECK(bad.get() < 0, op, "argument 'x' holds NaN or Inf (row ", bad.get(), ")");
  std::memcpy(absmax.data_ptr<float>(), new_max.data(), sizeof(float) * k);
  std::memcpy(abssum.data_ptr<double>(), new_sum.data(), sizeof(double) * k);
}

// -- quantize_per_tensor_int8 -----------------------------------------------------------

at::Tensor quantize_per_tensor_int8_cpu(const at::Tensor& x_, const at::Tensor& scale) {
  constexpr const char* op = "quantize_per_tensor_int8";
  check_quantize_per_tensor_int8(op, x_, scale);
  const float s = *scale.const_data_ptr<float>();
  check_tensor_scale_value(op, s);
  const at::Tensor x = x_.contiguous();
  const int64_t k = x.size(-1), total = x.numel();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kChar));
  if (total == 0) return codes;
  int8_t* cp = codes.data_ptr<int8_t>();
  FirstBad bad;

  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "quantize_per_tensor_int8_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // Flat blocks, not rows: one long row or many short ones spread alike.
    const int64_t blocks = (total + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, grain_for(kBlock), [&](int64_t b, int64_t e) {
      float buf[kBlock];
      for (int64_t i = b; i < e; ++i) {
        const int64_t e0 = i * kBlock, n = std::min(kBlock, total - e0);
        const float* f = as_f32(xp + e0, buf, n);
        int8_t* dst = cp + e0;
        bool nan = false;
        for (int64_t j = 0; j < n; ++j) {
          const float v = f[j];
          float q = std::nearbyint(v / s);   // IEEE division, as the reference's true_div
          q = q < -128.f ? -128.f : (q > 127.f ? 127.f : q);
          nan = nan || v != v;
          // NaN is an error (raised below); 0 keeps the int conversion defined meanwhile.
          dst[j] = static_cast<int8_t>(static_cast<int32_t>(v == v ? q : 0.f));
        }
        if (nan) {
          int64_t j = 0;
          while (f[j] == f[j]) ++j;
          bad.flag((e0 + j) / k);
        }
      }
    });
  });
  LOWBIT_CHECK(bad.get() < 0, op, "argument 'x' holds NaN (row ", bad.get(), ")");
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quantize_per_token_int8", &quantize_per_token_int8_cpu);
  m.impl("activation_stats", &activation_stats_cpu);
  m.impl("quantize_per_tensor_int8", &quantize_per_tensor_int8_cpu);
}

}  // namespace lowbit::cpu
