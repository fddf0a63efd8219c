// Bit packing into int32 words on the CPU (layout: python/lowbit/reference/packing.py).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "core/check.h"
#include "cpu/common.h"

namespace lowbit::cpu {
namespace {

// Word wi of one column whose codes are contiguous (src[r] is code r): the codes whose
// bits overlap [32 wi, 32 wi + 32). Returns the OR of the codes read, for the range check.
template <int BITS>
inline uint32_t pack_word(const uint8_t* src, int64_t rows, int64_t wi, int64_t bits_rt, uint8_t* seen) {
  const int64_t bits = BITS ? BITS : bits_rt;
  const int64_t r0 = (32 * wi) / bits, r1 = std::min(rows, (32 * wi + 32 + bits - 1) / bits);
  uint32_t word = 0;
  uint8_t acc = 0;
  if (BITS && 32 % BITS == 0 && r1 - r0 == 32 / BITS) {
    // Whole word, no code straddles: a fixed-trip loop the compiler unrolls.
    for (int j = 0; j < 32 / (BITS ? BITS : 32); ++j) {
      word |= static_cast<uint32_t>(src[r0 + j]) << (j * BITS);
      acc |= src[r0 + j];
    }
  } else {
    for (int64_t ri = r0; ri < r1; ++ri) {
      const int64_t start = ri * bits - 32 * wi;   // negative: a code straddling in
      word |= start >= 0 ? static_cast<uint32_t>(src[ri]) << start : static_cast<uint32_t>(src[ri]) >> (-start);
      acc |= src[ri];
    }
  }
  *seen |= acc;
  return word;
}

// Codes laid out column by column (stride(0) == 1, e.g. codes.t() for GPTQ's qweight):
// each column is a contiguous run, packed without first copying the transpose.
template <int BITS>
void pack_columns(const uint8_t* base, int64_t col_stride, int64_t r, int64_t c, int64_t bits,
                  uint32_t* out, FirstBad& bad) {
  constexpr int64_t kCols = 16;   // columns per task step: 64-byte runs of output per word row
  const int64_t words = packed_rows(r, bits);
  at::parallel_for(0, (c + kCols - 1) / kCols, grain_for(r * kCols), [&](int64_t b, int64_t e) {
    for (int64_t cb = b; cb < e; ++cb) {
      const int64_t c0 = cb * kCols, c1 = std::min(c, c0 + kCols);
      for (int64_t col = c0; col < c1; ++col) {
        const uint8_t* src = base + col * col_stride;
        uint8_t seen = 0;
        for (int64_t wi = 0; wi < words; ++wi) out[wi * c + col] = pack_word<BITS>(src, r, wi, bits, &seen);
        if (bits < 8 && (seen >> bits) != 0) {
          for (int64_t ri = 0; ri < r; ++ri) {
            if (src[ri] >> bits) {
              bad.flag(ri);
              break;
            }
          }
        }
      }
    }
  });
}

// Codes laid out row by row: one task per output word row; the inner loops run along C,
// contiguous in both the codes and the words, so they vectorise.
void pack_rows(const uint8_t* cp, int64_t r, int64_t c, int64_t bits, uint32_t* out, FirstBad& bad) {
  const int64_t words = packed_rows(r, bits);
  at::parallel_for(0, words, grain_for(c * 32 / bits), [&](int64_t b, int64_t e) {
    for (int64_t wi = b; wi < e; ++wi) {
      uint32_t* dst = out + wi * c;
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
}

at::Tensor pack_int32_cpu(const at::Tensor& codes_, int64_t bits) {
  constexpr const char* op = "pack_int32";
  check_dtype(op, "codes", codes_, at::kByte);
  check_dim(op, "codes", codes_, 2);
  check_bits(op, bits);
  const int64_t r = codes_.size(0), c = codes_.size(1);
  at::Tensor out = at::empty({packed_rows(r, bits), c}, codes_.options().dtype(at::kInt));
  uint32_t* op_ = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  FirstBad bad;
  if (codes_.stride(0) == 1 && !codes_.is_contiguous()) {
    const uint8_t* base = codes_.const_data_ptr<uint8_t>();
    const int64_t cs = codes_.stride(1);
    switch (bits) {
      case 2: pack_columns<2>(base, cs, r, c, bits, op_, bad); break;
      case 4: pack_columns<4>(base, cs, r, c, bits, op_, bad); break;
      case 8: pack_columns<8>(base, cs, r, c, bits, op_, bad); break;
      default: pack_columns<0>(base, cs, r, c, bits, op_, bad); break;
    }
  } else {
    const at::Tensor codes = codes_.contiguous();
    pack_rows(codes.const_data_ptr<uint8_t>(), r, c, bits, op_, bad);
  }
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
