// Dynamic per-token int8 activation quantization on the CPU:
// python/lowbit/reference/activation.py.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

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

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quantize_per_token_int8", &quantize_per_token_int8_cpu);
}

}  // namespace lowbit::cpu
