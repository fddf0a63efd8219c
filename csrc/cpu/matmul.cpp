// Weight-only quantized matmul on the CPU: y = x @ W^T + bias, W = (q - zero) * scale
// read from a GPTQ qweight (semantics: python/lowbit/reference/matmul.py).
//
// Two paths:
//  * direct (2, 4 and 8 bits with word-aligned groups, M below blas_rows()): the packed
//    words are read in place, never dequantized to memory. A word of qweight [P, N] holds
//    32 / bits consecutive k of one column n, so eight adjacent words are eight columns:
//    one AVX2 register. Code j of a word is converted as float(word & (mask << bits*j)),
//    which is code * 2^(bits*j) exactly, and x[k] is pre-scaled by 2^-(bits*j) (the top
//    code is shifted down instead): one AND, one convert and one FMA per 8 multiply-adds,
//    the products exact as with a shift (unless |x| < 2^-102, which turns subnormal).
//    Each group is factored as scale * (sum_k x*q - zero * sum_k x), so scales and zeros
//    are read once per tile of k, not per element. K is cut into tiles of kTileWords word
//    rows (never across a group); a thread owns a range of columns and, for each tile,
//    sweeps its columns in blocks of 8 * NC (64 at M = 1), prefetching the next block's
//    words; MR rows of x share each converted code (register blocking). With few column
//    blocks (small N) K is split across threads as well and the partial sums added.
//  * BLAS (3, 5, 6, 7 bits, groups that split a word, or M >= blas_rows()): W is
//    dequantized to float32 (the reference's values exactly) in tiles of columns [K, nb]
//    and multiplied with at::mm, so prefill runs at BLAS speed.
// Accumulation is float32 throughout; the output is rounded to x.dtype once, after the bias.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/matmul.h"
#include "cpu/common.h"

namespace lowbit::cpu {
namespace {

// Rows of x from which the BLAS path is faster than the direct one. The direct kernel is
// AVX2; fp32 BLAS (MKL, oneDNN) runs twice as many FMAs per cycle with AVX-512, which
// brings the crossover down to 16-20 rows (measured on a 2-core Xeon: 4096x4096 and
// 11008x4096, int4 g128/g32 and int8, 2 threads); without it, 32 is an estimate from
// the same measurements with BLAS at half the speed.
int64_t blas_rows() {
  static const int64_t rows = [] {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    return __builtin_cpu_supports("avx512f") ? int64_t{20} : int64_t{32};
#else
    return int64_t{32};
#endif
  }();
  return rows;
}
// Columns per dequantized tile of the BLAS path ([K, nb] float32): narrow while the
// matmul is short (the tile is rewritten for every few rows of x, better in L2), wider
// for long ones (BLAS nearer its peak). Measured on 4096x11008 and 11008x4096 at M = 32
// to 256: 64 costs up to 20%, 128..512 are within 10% of each other.
int64_t blas_tile_cols(int64_t m) { return m < 128 ? 128 : 256; }
// Word rows per tile of K in the direct path: the number of concurrent read streams.
constexpr int64_t kTileWords = 16;

// -- 8-lane float / uint32 vectors: AVX2 or plain arrays (LOWBIT_CPU_ARCH=generic) -----------

#ifdef LOWBIT_X86_SIMD
using VF = __m256;
using VI = __m256i;
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }     // a * b + c
inline VF vfnma(VF a, VF b, VF c) { return _mm256_fnmadd_ps(a, b, c); }   // c - a * b
inline VI iload(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// float(w & MASK), MASK below bit 31: the code times 2^(its shift), exactly.
template <uint32_t MASK>
inline VF code_masked(VI w) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(MASK))));
}
// float(w >> SH): the top code of a word.
template <int SH>
inline VF code_top(VI w) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(w, SH)); }
// float((w >> SH) & MASK): a code as is.
template <int SH, uint32_t MASK>
inline VF code_at(VI w) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, SH), _mm256_set1_epi32(static_cast<int>(MASK))));
}
inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
#else
struct VF { float v[8]; };
struct VI { uint32_t v[8]; };
inline VF vzero() { return VF{}; }
inline VF vload(const float* p) { VF r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
inline void vstore(float* p, VF a) { for (int i = 0; i < 8; ++i) p[i] = a.v[i]; }
inline VF vbcast(const float* p) { VF r; for (int i = 0; i < 8; ++i) r.v[i] = *p; return r; }
inline VF vfma(VF a, VF b, VF c) { for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline VF vfnma(VF a, VF b, VF c) { for (int i = 0; i < 8; ++i) c.v[i] -= a.v[i] * b.v[i]; return c; }
inline VI iload(const uint32_t* p) { VI r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
template <uint32_t MASK>
inline VF code_masked(VI w) {
  VF r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(static_cast<int32_t>(w.v[i] & MASK));
  return r;
}
template <int SH>
inline VF code_top(VI w) {
  VF r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(static_cast<int32_t>(w.v[i] >> SH));
  return r;
}
template <int SH, uint32_t MASK>
inline VF code_at(VI w) {
  VF r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(static_cast<int32_t>((w.v[i] >> SH) & MASK));
  return r;
}
inline VF vsub(VF a, VF b) { for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i]; return a; }
inline VF vmul(VF a, VF b) { for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i]; return a; }
#endif

// -- direct path ----------------------------------------------------------------------

// Code J of every word of one word row, times x[J] (pre-scaled) of MR rows of x, into acc.
template <int BITS, int J, int MR, int NC>
inline void fma_code(const uint32_t* wp, const float* xp, int64_t ldx, VF (&acc)[MR][NC]) {
  constexpr int kPerWord = 32 / BITS;
#if defined(__GNUC__)
  // Hide wp's value from the optimiser: it would otherwise load each word once for all J
  // and keep NC words in registers, spilling the accumulators. Reloading from L1 is free
  // (the AND takes it as a memory operand).
  asm volatile("" : "+r"(wp));
#endif
  VF xb[MR];
  for (int r = 0; r < MR; ++r) xb[r] = vbcast(xp + r * ldx + J);
  for (int c = 0; c < NC; ++c) {
    const VI w = iload(wp + 8 * c);
    VF q;
    if constexpr (J + 1 < kPerWord) {
      q = code_masked<((1u << BITS) - 1u) << (BITS * J)>(w);
    } else {
      q = code_top<BITS * J>(w);
    }
    for (int r = 0; r < MR; ++r) acc[r][c] = vfma(q, xb[r], acc[r][c]);
  }
}

template <int BITS, int MR, int NC, int... J>
inline void fma_word(const uint32_t* wp, const float* xp, int64_t ldx, VF (&acc)[MR][NC],
                     std::integer_sequence<int, J...>) {
  (fma_code<BITS, J, MR, NC>(wp, xp, ldx, acc), ...);
}

// One tile of K for MR rows of x and 8 * NC columns: acc = sum_k x*q over the tile's
// `rows` word rows, then out += scale * (acc - zero * sum_k x). w: the tile's first word
// row at these columns (row stride ldw); xs: pre-scaled x at the tile's first k (row
// stride ldx); xsum: the tile's plain sums of x (row stride ldsum); sf, zf: scale and
// zero of the tile's group per column; out: float32 (row stride ldo).
template <int BITS, int MR, int NC>
void direct_tile(const uint32_t* w, int64_t ldw, int64_t rows, const float* xs, int64_t ldx,
                 const float* xsum, int64_t ldsum, const float* sf, const float* zf, float* out,
                 int64_t ldo) {
  constexpr int kPerWord = 32 / BITS;
  VF acc[MR][NC];
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NC; ++c) acc[r][c] = vzero();
  }
  for (int64_t p = 0; p < rows; ++p) {
    fma_word<BITS>(w + p * ldw, xs + p * kPerWord, ldx, acc, std::make_integer_sequence<int, kPerWord>());
  }
  for (int c = 0; c < NC; ++c) {
    const VF s = vload(sf + 8 * c), z = vload(zf + 8 * c);
    for (int r = 0; r < MR; ++r) {
      float* o = out + r * ldo + 8 * c;
      vstore(o, vfma(s, vfnma(z, vbcast(xsum + r * ldsum), acc[r][c]), vload(o)));
    }
  }
}

// A tile of K within one group: [k0, k1), words from word row k0 / per_word.
struct Tile {
  int64_t k0, k1, g;
};

// dst[0, n) = float(src[off + i]) for a float or integer tensor's data; dst[n, pad) = 0.
void load_row_f32(const void* base, at::ScalarType t, int64_t off, int64_t n, int64_t pad, float* dst) {
  switch (t) {
    case at::kFloat:
      std::memcpy(dst, static_cast<const float*>(base) + off, sizeof(float) * n);
      break;
    case at::kHalf: {
      const float* f = as_f32(static_cast<const c10::Half*>(base) + off, dst, n);
      (void)f;
      break;
    }
    case at::kBFloat16: {
      const float* f = as_f32(static_cast<const c10::BFloat16*>(base) + off, dst, n);
      (void)f;
      break;
    }
    case at::kInt: {
      const int32_t* p = static_cast<const int32_t*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
    default: {   // uint8
      const uint8_t* p = static_cast<const uint8_t*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
  }
  for (int64_t i = n; i < pad; ++i) dst[i] = 0.f;
}

// scales or zeros [N, G] as a group-major view [G, N] with unit column stride (the
// transpose of the layout GPTQ stores), copied only when the input is laid out otherwise.
at::Tensor group_major(const at::Tensor& t) {
  at::Tensor gm = t.t();
  if (gm.size(1) > 1 && gm.stride(1) != 1) gm = gm.contiguous();
  return gm;
}

// Everything the kernels read, as raw pointers.
struct Problem {
  int64_t m, n, k, g, bits, group_size;
  const uint32_t* qw;                       // [P, N]
  const void* s;                            // [G, N] group-major, row stride lds
  const void* z;
  at::ScalarType s_type, z_type;
  int64_t lds, ldz;
};

// x as float32 rows for the direct path: xs [M, Kp] pre-scaled per code position
// (zero past K), and the plain float32 sum of x over each tile, xsum [M, T].
template <int BITS, typename scalar_t>
void prepare_x(const scalar_t* xp, int64_t ldx_in, int64_t m, int64_t k, int64_t kp,
               const std::vector<Tile>& tiles, float* xs, float* xsum) {
  constexpr int kPerWord = 32 / BITS;
  float factor[kPerWord];
  for (int j = 0; j < kPerWord; ++j) factor[j] = j + 1 < kPerWord ? std::ldexp(1.f, -BITS * j) : 1.f;
  const int64_t nt = static_cast<int64_t>(tiles.size());
  at::parallel_for(0, m, grain_for(k), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* row = xs + r * kp;
      for (int64_t b0 = 0; b0 < k; b0 += kBlock) {
        const int64_t len = std::min(kBlock, k - b0);
        const float* f = as_f32(xp + r * ldx_in + b0, row + b0, len);
        if (f != row + b0) std::memcpy(row + b0, f, sizeof(float) * len);
      }
      for (int64_t i = k; i < kp; ++i) row[i] = 0.f;
      for (int64_t t = 0; t < nt; ++t) {
        float acc = 0.f;
        for (int64_t i = tiles[t].k0; i < tiles[t].k1; ++i) acc += row[i];
        xsum[r * nt + t] = acc;
      }
      for (int64_t i = 0; i < kp; i += kPerWord) {
        for (int j = 0; j < kPerWord; ++j) row[i + j] *= factor[j];
      }
    }
  });
}

// out [nsplit, M, Npad] float32, zeroed by the caller; Npad a multiple of 8 * NC.
template <int BITS, int NC, typename scalar_t>
void run_direct(const Problem& pb, const scalar_t* xp, int64_t ldx_in, float* out, int64_t npad,
                int64_t nsplit_max) {
  constexpr int64_t kPerWord = 32 / BITS;
  constexpr int64_t kNB = 8 * NC;
  const int64_t m = pb.m, n = pb.n, k = pb.k;
  const int64_t kp = packed_rows(k, BITS) * kPerWord;

  std::vector<Tile> tiles;
  for (int64_t g = 0; g < pb.g; ++g) {
    const int64_t gk1 = std::min(k, (g + 1) * pb.group_size);
    for (int64_t k0 = g * pb.group_size; k0 < gk1; k0 += kTileWords * kPerWord) {
      tiles.push_back({k0, std::min(gk1, k0 + kTileWords * kPerWord), g});
    }
  }
  const int64_t nt = static_cast<int64_t>(tiles.size());
  std::vector<float> xs(m * kp), xsum(m * nt);
  prepare_x<BITS>(xp, ldx_in, m, k, kp, tiles, xs.data(), xsum.data());

  // Column blocks of kNB; with few of them (small N), K is split too and the partial
  // outputs summed by the caller.
  const int64_t nblocks = (n + kNB - 1) / kNB;
  const int64_t threads = at::get_num_threads();
  const int64_t nsplit = std::clamp<int64_t>((4 * threads + nblocks - 1) / nblocks, 1, std::min(nt, nsplit_max));
  // Columns per slice so that the slice's outputs (M rows) stay within 64 KiB.
  const int64_t slice_blocks = std::max<int64_t>(1, (16384 / kNB) / m);

  at::parallel_for(0, nsplit * nblocks, grain_for(k / nsplit * kNB * m), [&](int64_t b, int64_t e) {
    alignas(32) float sf[kNB], zf[kNB];
    alignas(32) uint32_t wtmp[kTileWords * kNB];
    while (b < e) {
      const int64_t split = b / nblocks;
      const int64_t b0 = b % nblocks, b1 = std::min(nblocks, b0 + (e - b));
      b += b1 - b0;
      const int64_t t0 = split * nt / nsplit, t1 = (split + 1) * nt / nsplit;
      float* outs = out + split * m * npad;
      for (int64_t sb = b0; sb < b1; sb += slice_blocks) {
        const int64_t se = std::min(b1, sb + slice_blocks);
        for (int64_t t = t0; t < t1; ++t) {
          const Tile& tile = tiles[t];
          const int64_t rows = (tile.k1 - tile.k0 + kPerWord - 1) / kPerWord;
          const uint32_t* wrow = pb.qw + (tile.k0 / kPerWord) * n;
          for (int64_t blk = sb; blk < se; ++blk) {
            const int64_t c0 = blk * kNB, cols = std::min(kNB, n - c0);
            load_row_f32(pb.s, pb.s_type, tile.g * pb.lds + c0, cols, kNB, sf);
            load_row_f32(pb.z, pb.z_type, tile.g * pb.ldz + c0, cols, kNB, zf);
            const uint32_t* w = wrow + c0;
#ifdef LOWBIT_X86_SIMD
            if (blk + 1 < se && c0 + 2 * kNB <= n) {
              // The next block's words of this tile into L2. Each row is a stream of short
              // runs (4 * kNB bytes per block) that the hardware prefetcher follows late;
              // one block ahead hides the memory latency (measured: -20% time when the
              // weights come from DRAM, neutral when they are cached).
              const char* nw = reinterpret_cast<const char*>(w + kNB);
              for (int64_t p = 0; p < rows; ++p) {
                for (int64_t off = 0; off < kNB * 4; off += 64) _mm_prefetch(nw + p * n * 4 + off, _MM_HINT_T1);
              }
            }
#endif
            int64_t ldw = n;
            if (cols < kNB) {   // the ragged last block: a zero-padded copy
              for (int64_t p = 0; p < rows; ++p) {
                for (int64_t c = 0; c < kNB; ++c) wtmp[p * kNB + c] = c < cols ? w[p * n + c] : 0u;
              }
              w = wtmp;
              ldw = kNB;
            }
            const float* xt = xs.data() + tile.k0;
            const float* st = xsum.data() + t;
            float* o = outs + c0;
            int64_t r = 0;
            if constexpr (NC == 2) {
              for (; r + 4 <= m; r += 4) {
                direct_tile<BITS, 4, NC>(w, ldw, rows, xt + r * kp, kp, st + r * nt, nt, sf, zf, o + r * npad, npad);
              }
              switch (m - r) {
                case 3: direct_tile<BITS, 3, NC>(w, ldw, rows, xt + r * kp, kp, st + r * nt, nt, sf, zf, o + r * npad, npad); break;
                case 2: direct_tile<BITS, 2, NC>(w, ldw, rows, xt + r * kp, kp, st + r * nt, nt, sf, zf, o + r * npad, npad); break;
                case 1: direct_tile<BITS, 1, NC>(w, ldw, rows, xt + r * kp, kp, st + r * nt, nt, sf, zf, o + r * npad, npad); break;
                default: break;
              }
            } else {
              constexpr int MR = NC == 8 ? 1 : 2;   // M == 1 or M == 2
              direct_tile<BITS, MR, NC>(w, ldw, rows, xt, kp, st, nt, sf, zf, o, npad);
            }
          }
        }
      }
    }
  });
}

// -- BLAS path ------------------------------------------------------------------------

// Word rows [p0, p1) of a column tile dequantized: dst[k][c] = (q - zero) * scale for the
// 32 / BITS codes k of each word (k < K), c < cols; sf, zf: [G, ld] float32 per group.
template <int BITS, int... J>
void dequant_words(const uint32_t* qw, int64_t n, int64_t k, int64_t group_size, int64_t p0, int64_t p1,
                   int64_t cols, const float* sf, const float* zf, int64_t ld, float* dst,
                   std::integer_sequence<int, J...>) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t full = cols / 8 * 8;
  for (int64_t p = p0; p < p1; ++p) {
    const uint32_t* w = qw + p * n;
    const int64_t k0 = p * kPerWord;
    if (k0 + kPerWord <= k) {
      int64_t g[kPerWord];
      for (int j = 0; j < kPerWord; ++j) g[j] = (k0 + j) / group_size;
      for (int64_t c = 0; c < full; c += 8) {
        const VI wv = iload(w + c);
        ((vstore(dst + (k0 + J) * ld + c,
                 vmul(vsub(code_at<BITS * J, kMask>(wv), vload(zf + g[J] * ld + c)), vload(sf + g[J] * ld + c)))),
         ...);
      }
    }
    for (int j = 0; j < kPerWord && k0 + j < k; ++j) {   // the tail columns; the last word's codes
      const int64_t kk = k0 + j, g = kk / group_size;
      const int64_t c0 = k0 + kPerWord <= k ? full : 0;
      for (int64_t c = c0; c < cols; ++c) {
        const float q = static_cast<float>(static_cast<int32_t>((w[c] >> (BITS * j)) & kMask));
        dst[kk * ld + c] = (q - zf[g * ld + c]) * sf[g * ld + c];
      }
    }
  }
}

// Rows [k0, k1) of a column tile for any bits (codes may straddle two words).
void dequant_rows(const uint32_t* qw, int64_t n, int64_t bits, int64_t group_size, int64_t k0, int64_t k1,
                  int64_t cols, const float* sf, const float* zf, int64_t ld, float* dst) {
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t kk = k0; kk < k1; ++kk) {
    const int64_t g = kk / group_size, pos = kk * bits, wi = pos / 32, sh = pos % 32;
    const uint32_t* w0 = qw + wi * n;
    const float* s = sf + g * ld;
    const float* z = zf + g * ld;
    float* d = dst + kk * ld;
    if (sh + bits <= 32) {
      for (int64_t c = 0; c < cols; ++c) {
        d[c] = (static_cast<float>(static_cast<int32_t>((w0[c] >> sh) & mask)) - z[c]) * s[c];
      }
    } else {
      const uint32_t* w1 = w0 + n;
      for (int64_t c = 0; c < cols; ++c) {
        const uint32_t q = ((w0[c] >> sh) | (w1[c] << (32 - sh))) & mask;
        d[c] = (static_cast<float>(static_cast<int32_t>(q)) - z[c]) * s[c];
      }
    }
  }
}

// out [M, N] float32 = x32 [M, K] @ W^T: W dequantized to float32 (exactly the
// reference's values) in tiles of columns [K, nb], each multiplied with at::mm into its
// slice of out.
void run_blas(const Problem& pb, const at::Tensor& x32, const at::Tensor& out) {
  const int64_t n = pb.n, k = pb.k, g = pb.g, bits = pb.bits;
  const int64_t nb = std::min(blas_tile_cols(pb.m), (n + 7) / 8 * 8);
  at::Tensor wt = at::empty({k, nb}, x32.options());
  float* wp = wt.data_ptr<float>();
  std::vector<float> sf(g * nb), zf(g * nb);
  const int64_t words = packed_rows(k, bits), per_word = 32 / bits;
  for (int64_t n0 = 0; n0 < n; n0 += nb) {
    const int64_t cols = std::min(nb, n - n0);
    for (int64_t gi = 0; gi < g; ++gi) {
      load_row_f32(pb.s, pb.s_type, gi * pb.lds + n0, cols, cols, sf.data() + gi * nb);
      load_row_f32(pb.z, pb.z_type, gi * pb.ldz + n0, cols, cols, zf.data() + gi * nb);
    }
    const uint32_t* qw = pb.qw + n0;
    if (bits == 2 || bits == 4 || bits == 8) {
      at::parallel_for(0, words, grain_for(cols * per_word), [&](int64_t b, int64_t e) {
        if (bits == 2) {
          dequant_words<2>(qw, n, k, pb.group_size, b, e, cols, sf.data(), zf.data(), nb, wp,
                           std::make_integer_sequence<int, 16>());
        } else if (bits == 4) {
          dequant_words<4>(qw, n, k, pb.group_size, b, e, cols, sf.data(), zf.data(), nb, wp,
                           std::make_integer_sequence<int, 8>());
        } else {
          dequant_words<8>(qw, n, k, pb.group_size, b, e, cols, sf.data(), zf.data(), nb, wp,
                           std::make_integer_sequence<int, 4>());
        }
      });
    } else {
      at::parallel_for(0, k, grain_for(cols), [&](int64_t b, int64_t e) {
        dequant_rows(qw, n, bits, pb.group_size, b, e, cols, sf.data(), zf.data(), nb, wp);
      });
    }
    at::Tensor o = out.narrow(1, n0, cols);
    at::mm_out(o, x32, wt.narrow(1, 0, cols));
  }
}

// -- entry ----------------------------------------------------------------------------

// y [M, N] (x.dtype) = sum of the nsplit partial outputs [M, ld] + bias, rounded once.
void finish(const float* parts, int64_t nsplit, int64_t part_stride, int64_t ld, const std::optional<at::Tensor>& bias,
            at::Tensor& y) {
  const int64_t m = y.size(0), n = y.size(1);
  at::Tensor b32;
  const float* bp = nullptr;
  if (bias.has_value()) {
    b32 = bias->to(at::kFloat).contiguous();
    bp = b32.const_data_ptr<float>();
  }
  LOWBIT_DISPATCH_FLOATS(y.scalar_type(), "weight_only_matmul_cpu", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, m, grain_for(n * nsplit), [&](int64_t b, int64_t e) {
      float buf[kBlock];
      for (int64_t r = b; r < e; ++r) {
        for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
          const int64_t len = std::min(kBlock, n - c0);
          const float* src = parts + r * ld + c0;
          for (int64_t i = 0; i < len; ++i) buf[i] = src[i];
          for (int64_t s = 1; s < nsplit; ++s) {
            const float* p = src + s * part_stride;
            for (int64_t i = 0; i < len; ++i) buf[i] += p[i];
          }
          if (bp != nullptr) {
            for (int64_t i = 0; i < len; ++i) buf[i] += bp[c0 + i];
          }
          store_f32(buf, yp + r * n + c0, len);
        }
      }
    });
  });
}

at::Tensor weight_only_matmul_cpu(const at::Tensor& x_, const at::Tensor& qweight_, const at::Tensor& scales_,
                                  const at::Tensor& zeros_, int64_t bits, int64_t group_size,
                                  const std::optional<at::Tensor>& bias) {
  // The op has no autograd formula: an input that requires grad (a model called outside
  // torch.no_grad) must not reach at::mm_out, which refuses out= under autograd.
  const c10::NoGradGuard no_grad;
  const MatmulSizes sz = check_weight_only_matmul(x_, qweight_, scales_, zeros_, bits, group_size, bias);
  const int64_t m = sz.m, n = sz.n, k = sz.k;
  std::vector<int64_t> out_shape(x_.sizes().begin(), x_.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty({m, n}, x_.options());
  if (m == 0 || n == 0) return y.view(out_shape);

  at::Tensor x = x_.reshape({m, k});
  if (k > 1 && x.stride(1) != 1) x = x.contiguous();
  const at::Tensor qweight = qweight_.contiguous();
  const at::Tensor s = group_major(scales_), z = group_major(zeros_);
  Problem pb{m, n, k, sz.g, bits, group_size,
             reinterpret_cast<const uint32_t*>(qweight.const_data_ptr<int32_t>()),
             s.const_data_ptr(), z.const_data_ptr(), s.scalar_type(), z.scalar_type(),
             s.size(0) > 1 ? s.stride(0) : 0, z.size(0) > 1 ? z.stride(0) : 0};

  const int64_t per_word = 32 / bits;
  const bool direct = (bits == 2 || bits == 4 || bits == 8) && m < blas_rows() &&
                      (sz.g <= 1 || group_size % per_word == 0);
  if (k == 0) {
    std::vector<float> zero(n, 0.f);
    finish(zero.data(), 1, 0, 0, bias, y);
    return y.view(out_shape);
  }
  if (!direct) {
    const at::Tensor x32 = x.to(at::kFloat).contiguous();
    const bool in_place = x_.scalar_type() == at::kFloat;
    at::Tensor acc = in_place ? y : at::empty({m, n}, x.options().dtype(at::kFloat));
    run_blas(pb, x32, acc);
    if (!in_place || bias.has_value()) finish(acc.const_data_ptr<float>(), 1, 0, n, bias, y);
    return y.view(out_shape);
  }

  const int64_t nc = m == 1 ? 8 : (m == 2 ? 4 : 2);
  const int64_t nb = 8 * nc, npad = (n + nb - 1) / nb * nb;
  // Partial outputs of up to 8 splits of K (only when N has few column blocks).
  const int64_t nsplit_max = 8;
  const int64_t nblocks = npad / nb;
  const int64_t nsplit_alloc = std::min<int64_t>(nsplit_max, std::max<int64_t>(1, (4 * at::get_num_threads() + nblocks - 1) / nblocks));
  std::vector<float> out(nsplit_alloc * m * npad, 0.f);
  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "weight_only_matmul_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    auto run = [&](auto bits_c, auto nc_c) {
      run_direct<decltype(bits_c)::value, decltype(nc_c)::value>(pb, xp, ldx, out.data(), npad, nsplit_alloc);
    };
    auto with_nc = [&](auto bits_c) {
      if (nc == 8) run(bits_c, std::integral_constant<int, 8>());
      else if (nc == 4) run(bits_c, std::integral_constant<int, 4>());
      else run(bits_c, std::integral_constant<int, 2>());
    };
    if (bits == 2) with_nc(std::integral_constant<int, 2>());
    else if (bits == 4) with_nc(std::integral_constant<int, 4>());
    else with_nc(std::integral_constant<int, 8>());
  });
  finish(out.data(), nsplit_alloc, m * npad, npad, bias, y);
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("weight_only_matmul", &weight_only_matmul_cpu);
}

}  // namespace lowbit::cpu
