// Bit packing into int32 words on the CPU (layout: python/lowbit/reference/packing.py).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "core/check.h"
#include "cpu/common.h"

namespace lowbit::cpu {
namespace {

at::Tensor pack_int32_cpu(const at::Tensor& codes_, int64_t bits) {
  constexpr const char* op = "pack_int32";
  check_dtype(op, "codes", codes_, at::kByte);
  check_dim(op, "codes", codes_, 2);
  check_bits(op, bits);
  const at::Tensor codes = codes_.contiguous();
  const int64_t r = codes.size(0), c = codes.size(1), words = packed_rows(r, bits);
  at::Tensor out = at::empty({words, c}, codes.options().dtype(at::kInt));
  const uint8_t* cp = codes.const_data_ptr<uint8_t>();
  uint32_t* op_ = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  FirstBad bad;

  // One task per output word row; the inner loops run along C, contiguous in both the
  // codes and the words, so they vectorise.
  at::parallel_for(0, words, grain_for(c * 32 / bits), [&](int64_t b, int64_t e) {
    for (int64_t wi = b; wi < e; ++wi) {
      uint32_t* dst = op_ + wi * c;
      std::memset(dst, 0, sizeof(uint32_t) * c);
      const int64_t r0 = (32 * wi) / bits, r1 = std::min(r, (32 * wi + 32 + bits - 1) / bits);
      for (int64_t ri = r0; ri < r1; ++ri) {
        const uint8_t* src = cp + ri * c;
        const int64_t start = ri * bits - 32 * wi;   // may be negative: a code straddling in
        uint8_t seen = 0;
        if (start >= 0) {
          for (int64_t j = 0; j < c; ++j) {
            dst[j] |= static_cast<uint32_t>(src[j]) << start;
            seen |= src[j];
          }
        } else {
          for (int64_t j = 0; j < c; ++j) {
            dst[j] |= static_cast<uint32_t>(src[j]) >> (-start);
            seen |= src[j];
          }
        }
        if (bits < 8 && (seen >> bits) != 0) bad.flag(ri);
      }
    }
  });
  LOWBIT_CHECK(bad.get() < 0, op, "argument 'codes' holds a value >= 2**bits = ", 1 << bits,
               " (row ", bad.get(), "); codes must be unsigned ", bits, "-bit values");
  return out;
}

at::Tensor unpack_int32_cpu(const at::Tensor& packed_, int64_t bits, int64_t rows) {
  constexpr const char* op = "unpack_int32";
  check_dtype(op, "packed", packed_, at::kInt);
  check_dim(op, "packed", packed_, 2);
  check_bits(op, bits);
  LOWBIT_CHECK(rows >= 0, op, "argument 'rows' must be >= 0, got ", rows);
  LOWBIT_CHECK(packed_.size(0) == packed_rows(rows, bits), op, "argument 'packed' must have ",
               packed_rows(rows, bits), " rows of words for rows=", rows, " and bits=", bits,
               ", got shape ", packed_.sizes());
  const at::Tensor packed = packed_.contiguous();
  const int64_t c = packed.size(1);
  at::Tensor out = at::empty({rows, c}, packed.options().dtype(at::kByte));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint32_t mask = (1u << bits) - 1u;

  at::parallel_for(0, rows, grain_for(c), [&](int64_t b, int64_t e) {
    for (int64_t ri = b; ri < e; ++ri) {
      const int64_t pos = ri * bits, wi = pos / 32, sh = pos % 32;
      const uint32_t* w0 = src + wi * c;
      uint8_t* o = dst + ri * c;
      if (sh + bits <= 32) {
        for (int64_t j = 0; j < c; ++j) o[j] = static_cast<uint8_t>((w0[j] >> sh) & mask);
      } else {
        const uint32_t* w1 = w0 + c;
        for (int64_t j = 0; j < c; ++j) {
          o[j] = static_cast<uint8_t>(((w0[j] >> sh) | (w1[j] << (32 - sh))) & mask);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("pack_int32", &pack_int32_cpu);
  m.impl("unpack_int32", &unpack_int32_cpu);
}

}  // namespace lowbit::cpu
