// FP8 (e4m3fn, e5m2) quantize / dequantize on the CPU: python/lowbit/reference/fp8.py.
#include <ATen/ops/empty.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "cpu/common.h"

namespace lowbit::cpu {
namespace {

template <typename F8>
constexpr float fp8_max() {
  return std::is_same_v<F8, c10::Float8_e4m3fn> ? 448.f : 57344.f;
}

// Saturate at the format's maximum (comparisons keep NaN), then round to nearest even.
template <typename T, typename F8>
inline void quantize_row(const T* src, F8* dst_, int64_t len, float s) {
  constexpr float fmax = fp8_max<F8>();
  constexpr bool e4m3 = std::is_same_v<F8, c10::Float8_e4m3fn>;
  uint8_t* dst = reinterpret_cast<uint8_t*>(dst_);
  float buf[kBlock];
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t m = std::min(kBlock, len - b);
    const float* f = as_f32(src + b, buf, m);
    if (e4m3) {
      encode_fp8<3, 7>(f, s, fmax, dst + b, m);
    } else {
      encode_fp8<2, 15>(f, s, fmax, dst + b, m);
    }
  }
}

at::Tensor quantize_fp8_cpu(const at::Tensor& x_, const at::Tensor& scale_, at::ScalarType dtype) {
  constexpr const char* op = "quantize_fp8";
  check_float(op, "x", x_);
  check_min_dim(op, "x", x_, 1);
  check_fp8_dtype_arg(op, "dtype", dtype);
  const bool per_row = check_row_scale(op, x_, scale_);
  const at::Tensor x = x_.contiguous();
  const at::Tensor scale = scale_.contiguous();
  const int64_t k = x.size(-1), rows = leading_rows(x);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  const float* sp = scale.const_data_ptr<float>();
  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "quantize_fp8_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_fp8(dtype, [&](auto tag) {
      using F8 = decltype(tag);
      F8* dst = static_cast<F8*>(out.data_ptr());
      at::parallel_for(0, rows, grain_for(k), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) quantize_row(xp + r * k, dst + r * k, k, sp[per_row ? r : 0]);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_dynamic_cpu(const at::Tensor& x_, at::ScalarType dtype,
                                                            bool per_row) {
  constexpr const char* op = "quantize_fp8_dynamic";
  check_float(op, "x", x_);
  check_min_dim(op, "x", x_, 1);
  check_fp8_dtype_arg(op, "dtype", dtype);
  const at::Tensor x = x_.contiguous();
  const int64_t k = x.size(-1), rows = leading_rows(x);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  at::Tensor row_amax = at::empty({rows}, x.options().dtype(at::kFloat));
  float* ap = row_amax.data_ptr<float>();
  FirstBad bad;
  const float fmax = dtype == at::ScalarType::Float8_e4m3fn ? 448.f : 57344.f;
  at::Tensor scale = per_row ? at::empty(row_scale_shape(x), x.options().dtype(at::kFloat))
                             : at::empty({}, x.options().dtype(at::kFloat));
  float* sp = scale.data_ptr<float>();

  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "quantize_fp8_dynamic_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(k), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        RangeAcc acc;
        acc.add(xp + r * k, k);
        ap[r] = acc.absmax();
        if (!acc.finite()) bad.flag(r);
      }
    });
    LOWBIT_CHECK(bad.get() < 0, op, "argument 'x' holds NaN or Inf (row ", bad.get(),
                 "), which would poison the dynamic scale");
    auto to_scale = [&](float amax) {
      const float s = amax / fmax;
      return s == 0.f ? 1.f : s;
    };
    if (per_row) {
      for (int64_t r = 0; r < rows; ++r) sp[r] = to_scale(ap[r]);
    } else {
      float m = 0.f;
      for (int64_t r = 0; r < rows; ++r) m = ap[r] > m ? ap[r] : m;
      sp[0] = to_scale(m);
    }
    dispatch_fp8(dtype, [&](auto tag) {
      using F8 = decltype(tag);
      F8* dst = static_cast<F8*>(out.data_ptr());
      at::parallel_for(0, rows, grain_for(k), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) quantize_row(xp + r * k, dst + r * k, k, sp[per_row ? r : 0]);
      });
    });
  });
  return {out, scale};
}

// fp8 -> float32 through a 256-entry table: exact, and a gather beats c10's bit fiddling.
template <typename F8>
const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(F8(static_cast<uint8_t>(i), F8::from_bits()));
    return t;
  }();
  return table;
}

at::Tensor dequantize_fp8_cpu(const at::Tensor& q_, const at::Tensor& scale_, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_fp8";
  LOWBIT_CHECK_TYPE(is_fp8_dtype(q_.scalar_type()), op,
                    "argument 'q' must be torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype_name(q_.scalar_type()));
  check_min_dim(op, "q", q_, 1);
  check_float_dtype_arg(op, "dtype", dtype);
  const bool per_row = check_row_scale(op, q_, scale_);
  const at::Tensor q = q_.contiguous();
  const at::Tensor scale = scale_.contiguous();
  const int64_t k = q.size(-1), rows = leading_rows(q);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  const float* sp = scale.const_data_ptr<float>();
  const uint8_t* qp = static_cast<const uint8_t*>(q.const_data_ptr());
  const std::array<float, 256>& table = q.scalar_type() == at::ScalarType::Float8_e4m3fn
                                            ? fp8_table<c10::Float8_e4m3fn>()
                                            : fp8_table<c10::Float8_e5m2>();
  LOWBIT_DISPATCH_FLOATS(dtype, "dequantize_fp8_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(k), [&](int64_t b, int64_t e) {
      float buf[kBlock];
      for (int64_t r = b; r < e; ++r) {
        const float s = sp[per_row ? r : 0];
        for (int64_t b0 = 0; b0 < k; b0 += kBlock) {
          const int64_t m = std::min(kBlock, k - b0);
          const uint8_t* src = qp + r * k + b0;
          for (int64_t j = 0; j < m; ++j) buf[j] = table[src[j]] * s;
          store_f32(buf, dst + r * k + b0, m);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quantize_fp8", &quantize_fp8_cpu);
  m.impl("quantize_fp8_dynamic", &quantize_fp8_dynamic_cpu);
  m.impl("dequantize_fp8", &dequantize_fp8_cpu);
}

}  // namespace lowbit::cpu
