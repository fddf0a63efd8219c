// Integer grids on the CPU: quant_params, quantize, dequantize.
// Semantics and the rounding rule: python/lowbit/reference/quant.py.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "cpu/common.h"
#include "cpu/grid.h"

namespace lowbit::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> quant_params_cpu(const at::Tensor& w_, int64_t bits,
                                                    int64_t group_size, bool symmetric,
                                                    double clip_ratio) {
  constexpr const char* op = "quant_params";
  check_dim(op, "w", w_, 2);
  check_float(op, "w", w_);
  check_bits(op, bits);
  check_group_size(op, group_size);
  LOWBIT_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, op,
               "argument 'clip_ratio' must be in (0, 1], got ", clip_ratio);
  const at::Tensor w = w_.contiguous();
  const int64_t n = w.size(0), k = w.size(1), g = num_groups(k, group_size);
  at::Tensor scales = at::empty({n, g}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({n, g}, w.options().dtype(at::kInt));
  float* sp = scales.data_ptr<float>();
  int32_t* zp = zeros.data_ptr<int32_t>();
  const float clip = static_cast<float>(clip_ratio);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float maxq = static_cast<float>((1 << bits) - 1);
  const int32_t sym_zero = 1 << (bits - 1);
  FirstBad bad;

  const GroupTiles tiles(k, group_size);
  auto params = [&](int64_t i, const RangeAcc& r) {
    if (!r.finite()) bad.flag(i / g);
    float scale;
    int32_t zero;
    rtn_params(r.max(), r.min(), clip, symmetric, qmax, maxq, sym_zero, scale, zero);
    sp[i] = scale;
    zp[i] = zero;
  };

  LOWBIT_DISPATCH_FLOATS(w.scalar_type(), "quant_params_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    auto range_of = [&](int64_t item, RangeAcc& r) {
      const int64_t len = tiles.length(item);
      if (len > 0) r.add(wp + (tiles.group(item) / g) * k + tiles.begin(item), len);
    };
    if (tiles.tiles == 1) {
      at::parallel_for(0, n * g, tiles.grain(), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          RangeAcc r;
          range_of(i, r);
          params(i, r);
        }
      });
    } else {
      // Groups longer than a tile: ranges per tile in parallel, then merged per group
      // (max and min are exact in any order; the NaN check only needs every tile).
      std::vector<RangeAcc> parts(tiles.items(n));
      at::parallel_for(0, tiles.items(n), 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) range_of(i, parts[i]);
      });
      for (int64_t i = 0; i < n * g; ++i) {
        for (int64_t t = 1; t < tiles.tiles; ++t) parts[i * tiles.tiles].merge(parts[i * tiles.tiles + t]);
        params(i, parts[i * tiles.tiles]);
      }
    }
  });
  LOWBIT_CHECK(bad.get() < 0, op, "argument 'w' holds NaN or Inf (row ", bad.get(),
               "), which would poison the scales; clean the weight first");
  return {scales, zeros};
}

// Scales as float32 contiguous, checked positive and finite (a zero or negative scale
// silently maps the whole group to one code).
at::Tensor checked_scales(const char* op, const at::Tensor& scales) {
  at::Tensor s = scales.to(at::kFloat).contiguous();
  const float* p = s.const_data_ptr<float>();
  for (int64_t i = 0; i < s.numel(); ++i) {
    LOWBIT_CHECK(std::isfinite(p[i]) && p[i] > 0.f, op,
                 "argument 'scales' must be positive and finite, got ", p[i], " at row ",
                 i / std::max<int64_t>(s.size(1), 1), ", group ", i % std::max<int64_t>(s.size(1), 1));
  }
  return s;
}

at::Tensor quantize_cpu(const at::Tensor& w_, const at::Tensor& scales_, const at::Tensor& zeros_,
                        int64_t bits, int64_t group_size) {
  constexpr const char* op = "quantize";
  check_float(op, "w", w_);
  check_bits(op, bits);
  check_grid(op, "w", w_, scales_, zeros_, group_size);
  const at::Tensor w = w_.contiguous();
  const at::Tensor scales = checked_scales(op, scales_);
  const at::Tensor zeros = zeros_.contiguous();
  const int64_t n = w.size(0), k = w.size(1), g = num_groups(k, group_size);
  at::Tensor codes = at::empty({n, k}, w.options().dtype(at::kByte));
  const float* sp = scales.const_data_ptr<float>();
  const int32_t* zp = zeros.const_data_ptr<int32_t>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  const float maxq = static_cast<float>((1 << bits) - 1);
  FirstBad bad;

  const GroupTiles tiles(k, group_size);

  LOWBIT_DISPATCH_FLOATS(w.scalar_type(), "quantize_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, tiles.items(n), tiles.grain(), [&](int64_t b, int64_t e) {
      float buf[kBlock];
      for (int64_t i = b; i < e; ++i) {
        const int64_t len = tiles.length(i);
        if (len <= 0) continue;
        const int64_t grp = tiles.group(i), row = grp / g, off = row * k + tiles.begin(i);
        const float s = sp[grp], z = static_cast<float>(zp[grp]);
        RangeAcc seen;
        for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
          const int64_t m = std::min(kBlock, len - b0);
          const float* f = as_f32(wp + off + b0, buf, m);
          uint8_t* dst = cp + off + b0;
          for (int64_t j = 0; j < m; ++j) {
            dst[j] = static_cast<uint8_t>(static_cast<int32_t>(rtn_code(f[j], s, z, maxq)));
          }
          seen.add(f, m);
        }
        if (!seen.finite()) bad.flag(row);
      }
    });
  });
  LOWBIT_CHECK(bad.get() < 0, op, "argument 'w' holds NaN or Inf (row ", bad.get(),
               "), which has no code; clean the weight first");
  return codes;
}

at::Tensor dequantize_cpu(const at::Tensor& codes_, const at::Tensor& scales_, const at::Tensor& zeros_,
                          int64_t group_size, at::ScalarType dtype) {
  constexpr const char* op = "dequantize";
  check_dtype(op, "codes", codes_, at::kByte);
  check_float_dtype_arg(op, "dtype", dtype);
  check_grid(op, "codes", codes_, scales_, zeros_, group_size);
  const at::Tensor codes = codes_.contiguous();
  const at::Tensor scales = scales_.to(at::kFloat).contiguous();
  const at::Tensor zeros = zeros_.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1), g = num_groups(k, group_size);
  at::Tensor out = at::empty({n, k}, codes.options().dtype(dtype));
  const float* sp = scales.const_data_ptr<float>();
  const int32_t* zp = zeros.const_data_ptr<int32_t>();
  const uint8_t* cp = codes.const_data_ptr<uint8_t>();

  const GroupTiles tiles(k, group_size);

  LOWBIT_DISPATCH_FLOATS(dtype, "dequantize_cpu", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, tiles.items(n), tiles.grain(), [&](int64_t b, int64_t e) {
      float buf[kBlock];
      for (int64_t i = b; i < e; ++i) {
        const int64_t len = tiles.length(i);
        if (len <= 0) continue;
        const int64_t grp = tiles.group(i), off = (grp / g) * k + tiles.begin(i);
        const float s = sp[grp], z = static_cast<float>(zp[grp]);
        for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
          const int64_t m = std::min(kBlock, len - b0);
          const uint8_t* src = cp + off + b0;
          for (int64_t j = 0; j < m; ++j) buf[j] = (static_cast<float>(src[j]) - z) * s;
          store_f32(buf, op_ + off + b0, m);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quant_params", &quant_params_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace lowbit::cpu
