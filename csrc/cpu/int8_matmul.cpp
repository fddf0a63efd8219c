// W8A8 int8 matmul on the CPU: y = float(x w^T as int32) * x_scale * w_scale + bias, the
// epilogue fused into the tile store (semantics: python/lowbit/reference/matmul.py).
//
// The weight is packed, per call, into panels of kNR = 64 output channels in the layout
// of AMX's B tiles ("VNNI layout"): for each block of 64 k, four groups of 16 channels,
// each 16 rows (one per 4 consecutive k) of 16 channels x 4 bytes:
//     panel[kb][g][r][c][i] = w[n0 + 16 g + c][64 kb + 4 r + i]     (4 KiB per k block)
// One 64-byte row is what vpdpbusd needs to multiply-add 16 channels x 4 k at once, and
// what AMX loads as a tile row. K is padded to a multiple of 64 (zeros in x, so whatever
// the padded weight bytes are, they add nothing). Kernels, best first (runtime dispatch:
// the file builds without global -mavx512 flags and runs on any x86-64):
//  * AMX-INT8: tdpbssd (signed x signed) on 32 rows x 32 channels per tile pass.
//  * AVX-512 VNNI: vpdpbusd on up to 6 rows x 64 channels (24 zmm accumulators).
//  * AVX-VNNI: vpdpbusd on ymm, 4 rows x 16 channels.
//  * AVX2: bytes widened to int16 and vpmaddwd (vpmaddubsw would saturate).
//  * scalar.
// vpdpbusd multiplies unsigned by signed bytes, so those kernels pack w + 128 (w ^ 0x80)
// and subtract 128 * sum_k x[m, k] per row afterwards (int32 arithmetic wraps, and the
// true sum fits: K <= 131071). All accumulation is exact; the epilogue is the reference's
// three float32 operations in its order, so every path gives the reference's bits.
//
// Work is split into tasks (block of rows, panel), row-block major so that a thread's
// consecutive tasks reuse the block of x in cache. With one row block each task packs its
// own panel (w is read once, straight into the cache the kernel reads it from); with more,
// w is packed once up front and shared.
//
// LOWBIT_INT8_MATMUL_ISA=amx|avx512vnni|avxvnni|avx2|scalar caps the kernel used (tests
// run every path; an ISA the CPU lacks falls through to the best one it has).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/scaled_matmul.h"
#include "cpu/common.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LOWBIT_INT8_X86 1
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define LOWBIT_INT8_AMX 1
#endif
#endif

namespace lowbit::cpu {
namespace {

constexpr const char* kOp = "int8_matmul";
constexpr int64_t kNR = 64;              // output channels per panel
constexpr int64_t kKB = 64;              // k per block: one AMX tile row, 16 vpdpbusd steps
constexpr int64_t kBlockBytes = kNR * kKB;

// Index of the first NaN or Inf in p[0, n), or -1.
int64_t first_nonfinite(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(p[i])) return i;
  }
  return -1;
}

// -- kernels -------------------------------------------------------------------------------

// acc[i][c] (int32 [rows][kNR]) = sum over kblocks * 64 k of x[i][k] * packed w[c][k], with
// x rows at stride ldx (bytes), the packed weight as unsigned (w + 128) or signed bytes.
using Kernel = void (*)(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks, int64_t rows,
                        int32_t* acc);

enum class Isa { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4 };

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Offset of byte i of channel c, k row r (k = 4 r + i) in k block kb of a panel.
inline int64_t panel_offset(int64_t kb, int64_t c, int64_t r, int64_t i) {
  return kb * kBlockBytes + (c / 16) * 1024 + r * 64 + (c % 16) * 4 + i;
}

void kernel_scalar(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks, int64_t rows,
                   int32_t* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    int32_t* a = acc + i * kNR;
    for (int64_t c = 0; c < kNR; ++c) a[c] = 0;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      for (int64_t r = 0; r < 16; ++r) {
        for (int64_t j = 0; j < 4; ++j) {
          const int32_t xv = x[i * ldx + kb * kKB + r * 4 + j];
          for (int64_t c = 0; c < kNR; ++c) {
            // Unsigned wrap-around: the per-row correction brings the true sum back.
            a[c] = static_cast<int32_t>(static_cast<uint32_t>(a[c]) +
                                        static_cast<uint32_t>(xv * panel[panel_offset(kb, c, r, j)]));
          }
        }
      }
    }
  }
}

#ifdef LOWBIT_INT8_X86

#define LOWBIT_AVX2 __attribute__((target("avx2,fma")))
#define LOWBIT_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#define LOWBIT_AVX512VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define LOWBIT_AMX __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))

// AVX2: 2 rows x 16 channels per pass. Each 16 bytes of a panel row (4 channels x 4 k)
// widened to int16 and multiplied by x's 4 k (widened, repeated) with vpmaddwd: lane
// 2c + h holds channel c's products for k pair h, the pairs are added at the end.
template <int MR>
LOWBIT_AVX2 void avx2_rows(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks, int32_t* acc) {
  for (int64_t g = 0; g < 4; ++g) {
    __m256i c[MR][4];
    for (int i = 0; i < MR; ++i) {
      for (int q = 0; q < 4; ++q) c[i][q] = _mm256_setzero_si256();
    }
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const uint8_t* p = panel + kb * kBlockBytes + g * 1024;
      for (int64_t r = 0; r < 16; ++r) {
        __m256i xv[MR];
        for (int i = 0; i < MR; ++i) {
          const __m128i x4 = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(load4(x + i * ldx + kb * kKB + r * 4)));
          xv[i] = _mm256_broadcastq_epi64(x4);
        }
        for (int q = 0; q < 4; ++q) {
          const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + r * 64 + q * 16)));
          for (int i = 0; i < MR; ++i) c[i][q] = _mm256_add_epi32(c[i][q], _mm256_madd_epi16(b, xv[i]));
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      for (int q = 0; q < 4; ++q) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), c[i][q]);
        for (int j = 0; j < 4; ++j) {
          acc[i * kNR + g * 16 + q * 4 + j] =
              static_cast<int32_t>(static_cast<uint32_t>(lanes[2 * j]) + static_cast<uint32_t>(lanes[2 * j + 1]));
        }
      }
    }
  }
}

LOWBIT_AVX2 void kernel_avx2(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks, int64_t rows,
                             int32_t* acc) {
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) avx2_rows<2>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR);
  if (i < rows) avx2_rows<1>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR);
}

// AVX-VNNI: 4 rows x 16 channels (8 ymm accumulators) per pass, one pass per group of 16.
template <int MR>
LOWBIT_AVXVNNI void avxvnni_rows(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks,
                                 int32_t* acc) {
  for (int64_t g = 0; g < 4; ++g) {
    __m256i c[MR][2];
    for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_si256();
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const uint8_t* p = panel + kb * kBlockBytes + g * 1024;
      const int8_t* xk = x + kb * kKB;
      for (int64_t r = 0; r < 16; ++r) {
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + r * 64));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + r * 64 + 32));
        for (int i = 0; i < MR; ++i) {
          const __m256i a = _mm256_set1_epi32(load4(xk + i * ldx + r * 4));
          c[i][0] = _mm256_dpbusd_avx_epi32(c[i][0], b0, a);
          c[i][1] = _mm256_dpbusd_avx_epi32(c[i][1], b1, a);
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * kNR + g * 16), c[i][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * kNR + g * 16 + 8), c[i][1]);
    }
  }
}

LOWBIT_AVXVNNI void kernel_avxvnni(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks,
                                   int64_t rows, int32_t* acc) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) avxvnni_rows<4>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR);
  switch (rows - i) {
    case 3: avxvnni_rows<3>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR); break;
    case 2: avxvnni_rows<2>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR); break;
    case 1: avxvnni_rows<1>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR); break;
    default: break;
  }
}

// AVX-512 VNNI: MR rows x 64 channels in 4 * MR zmm accumulators; per k row, 4 panel
// vectors are shared by the MR rows and each broadcast of x's 4 bytes by the 4 vectors.
template <int MR>
LOWBIT_AVX512VNNI void avx512vnni_rows(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks,
                                       int32_t* acc) {
  __m512i c[MR][4];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < 4; ++j) c[i][j] = _mm512_setzero_si512();
  }
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint8_t* p = panel + kb * kBlockBytes;
    const int8_t* xk = x + kb * kKB;
    for (int64_t r = 0; r < 16; ++r) {
      __m512i b[4];
      for (int j = 0; j < 4; ++j) b[j] = _mm512_loadu_si512(p + j * 1024 + r * 64);
      for (int i = 0; i < MR; ++i) {
        const __m512i a = _mm512_set1_epi32(load4(xk + i * ldx + r * 4));
        for (int j = 0; j < 4; ++j) c[i][j] = _mm512_dpbusd_epi32(c[i][j], b[j], a);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(acc + i * kNR + j * 16, c[i][j]);
  }
}

LOWBIT_AVX512VNNI void kernel_avx512vnni(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks,
                                         int64_t rows, int32_t* acc) {
  int64_t i = 0;
  for (; i + 6 <= rows; i += 6) avx512vnni_rows<6>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR);
  switch (rows - i) {
    case 5: avx512vnni_rows<5>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR); break;
    case 4: avx512vnni_rows<4>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR); break;
    case 3: avx512vnni_rows<3>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR); break;
    case 2: avx512vnni_rows<2>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR); break;
    case 1: avx512vnni_rows<1>(panel, x + i * ldx, ldx, kblocks, acc + i * kNR); break;
    default: break;
  }
}

// Panel packing: one gather per 64-byte panel row (the same 4 bytes of 16 weight rows),
// into one k block (64 k, all present) of channels < `channels` (<= kNR; the rest zero).
LOWBIT_AVX512VNNI void pack_block_avx512(const int8_t* w, int64_t ldw, int64_t channels, uint32_t flip,
                                         uint8_t* dst) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(ldw)));
  const __m512i vflip = _mm512_set1_epi32(static_cast<int32_t>(flip));
  for (int64_t g = 0; g < 4; ++g) {
    const int64_t valid = channels - g * 16;
    const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : valid <= 0 ? __mmask16(0) : __mmask16((1u << valid) - 1);
    const int8_t* src = w + g * 16 * ldw;
    for (int64_t r = 0; r < 16; ++r) {
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, rows, src + r * 4, 1);
      _mm512_storeu_si512(dst + g * 1024 + r * 64, _mm512_xor_si512(v, vflip));
    }
  }
}

// The same with AVX2 gathers, 8 channels at a time.
LOWBIT_AVX2 void pack_block_avx2(const int8_t* w, int64_t ldw, int64_t channels, uint32_t flip, uint8_t* dst) {
  const __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(static_cast<int32_t>(ldw)));
  const __m256i vflip = _mm256_set1_epi32(static_cast<int32_t>(flip));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t h = 0; h < 8; ++h) {   // channels 8h .. 8h + 7
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(channels - h * 8)), lane);
    const int8_t* src = w + h * 8 * ldw;
    uint8_t* d = dst + (h / 2) * 1024 + (h % 2) * 32;
    for (int64_t r = 0; r < 16; ++r) {
      const __m256i v = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(src + r * 4),
                                                    rows, mask, 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + r * 64), _mm256_xor_si256(v, vflip));
    }
  }
}

#ifdef LOWBIT_INT8_AMX
// AMX: tiles tmm0-3 hold a 32 x 32 int32 block of the result, tmm4-5 two 16-row tiles of
// x (16 rows x 64 k), tmm6-7 two B tiles of the panel (16 channels x 64 k each). Rows
// come padded to a multiple of 32.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

LOWBIT_AMX void kernel_amx(const uint8_t* panel, const int8_t* x, int64_t ldx, int64_t kblocks, int64_t rows,
                           int32_t* acc) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  for (int64_t i = 0; i < rows; i += 32) {
    for (int64_t half = 0; half < 2; ++half) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const uint8_t* p = panel + kb * kBlockBytes + half * 2048;
        const int8_t* xk = x + i * ldx + kb * kKB;
        _tile_loadd(4, xk, ldx);
        _tile_loadd(5, xk + 16 * ldx, ldx);
        _tile_loadd(6, p, 64);
        _tile_loadd(7, p + 1024, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      int32_t* a = acc + i * kNR + half * 32;
      constexpr int64_t stride = kNR * sizeof(int32_t);
      _tile_stored(0, a, stride);
      _tile_stored(1, a + 16, stride);
      _tile_stored(2, a + 16 * kNR, stride);
      _tile_stored(3, a + 16 * kNR + 16, stride);
    }
  }
  _tile_release();
}

// Linux hands out the AMX tile state only on request (once per process).
bool amx_usable() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8") ||
        !__builtin_cpu_supports("avx512vnni")) {
      return false;
    }
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}
#endif  // LOWBIT_INT8_AMX
#endif  // LOWBIT_INT8_X86

Isa best_isa() {
  static const Isa best = [] {
#ifdef LOWBIT_INT8_X86
#ifdef LOWBIT_INT8_AMX
    if (amx_usable()) return Isa::kAmx;
#endif
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512Vnni;
    }
    if (__builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2")) return Isa::kAvxVnni;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return best;
}

// The CPU's best kernel, capped by LOWBIT_INT8_MATMUL_ISA (read at every call, so tests
// can switch paths). AMX stands alone: an unavailable request below it falls further down.
Isa pick_isa() {
  Isa isa = best_isa();
  const char* env = std::getenv("LOWBIT_INT8_MATMUL_ISA");
  if (env == nullptr || *env == '\0') return isa;
  const std::string want(env);
  Isa cap = Isa::kAmx;
  if (want == "avx512vnni") cap = Isa::kAvx512Vnni;
  else if (want == "avxvnni") cap = Isa::kAvxVnni;
  else if (want == "avx2") cap = Isa::kAvx2;
  else if (want == "scalar") cap = Isa::kScalar;
  if (isa > cap) isa = cap;
#ifdef LOWBIT_INT8_X86
  // A CPU with AVX-512 VNNI may lack AVX-VNNI (Ice Lake): the AVX2 kernel stands in.
  if (isa == Isa::kAvxVnni && !__builtin_cpu_supports("avxvnni")) isa = Isa::kAvx2;
#endif
  return isa;
}

Kernel kernel_for(Isa isa) {
  switch (isa) {
#ifdef LOWBIT_INT8_X86
#ifdef LOWBIT_INT8_AMX
    case Isa::kAmx: return kernel_amx;
#endif
    case Isa::kAvx512Vnni: return kernel_avx512vnni;
    case Isa::kAvxVnni: return kernel_avxvnni;
    case Isa::kAvx2: return kernel_avx2;
#endif
    default: return kernel_scalar;
  }
}

// Packs channels [n0, n0 + kNR) of w (int8 [N, K], row stride K) into a panel of kblocks
// k blocks, bytes XOR flip (0x80 for the unsigned kernels). Channels past N and k past K
// are zero (their x is zero too: they add nothing).
void pack_panel(const int8_t* w, int64_t n, int64_t k, int64_t n0, int64_t kblocks, uint8_t flip, Isa isa,
                uint8_t* panel) {
  const int64_t channels = std::min(kNR, n - n0);
  int64_t kb = 0;
#ifdef LOWBIT_INT8_X86
  const uint32_t flip4 = 0x01010101u * flip;
  const int64_t full_blocks = k / kKB;
  for (; isa >= Isa::kAvx512Vnni && kb < full_blocks; ++kb) {
    pack_block_avx512(w + n0 * k + kb * kKB, k, channels, flip4, panel + kb * kBlockBytes);
  }
  for (; isa >= Isa::kAvx2 && kb < full_blocks; ++kb) {
    pack_block_avx2(w + n0 * k + kb * kKB, k, channels, flip4, panel + kb * kBlockBytes);
  }
#else
  (void)isa;
#endif
  for (; kb < kblocks; ++kb) {
    uint8_t* dst = panel + kb * kBlockBytes;
    for (int64_t c = 0; c < kNR; ++c) {
      const int8_t* src = c < channels ? w + (n0 + c) * k : nullptr;
      for (int64_t r = 0; r < 16; ++r) {
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t kk = kb * kKB + r * 4 + i;
          const uint8_t v = src != nullptr && kk < k ? static_cast<uint8_t>(src[kk]) : 0;
          dst[panel_offset(0, c, r, i)] = static_cast<uint8_t>(v ^ flip);
        }
      }
    }
  }
}

// y[c] = ((float(acc[c] - corr) * xs) * ws[c] + bias[c]) for c < nc, rounded to out_t.
template <typename out_t>
void epilogue_row(const int32_t* acc, uint32_t corr, float xs, const float* ws, const float* bias, int64_t nc,
                  out_t* out) {
  float y[kNR];
  for (int64_t c = 0; c < nc; ++c) {
    const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(acc[c]) - corr);
    y[c] = (static_cast<float>(v) * xs) * ws[c];
  }
  if (bias != nullptr) {
    for (int64_t c = 0; c < nc; ++c) y[c] = y[c] + bias[c];
  }
  store_f32(y, out, nc);
}

at::Tensor int8_matmul_cpu(const at::Tensor& x_, const at::Tensor& x_scale, const at::Tensor& w_,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           at::ScalarType out_dtype) {
  const ScaledMatmulSizes sz = check_int8_matmul(x_, x_scale, w_, w_scale, bias, out_dtype);
  const int64_t m = sz.m, n = sz.n, k = sz.k;
  // Scales expanded to one float32 per row / channel: the epilogue loops stay plain.
  const at::Tensor xs = x_scale.reshape({-1}).contiguous().expand({m}).contiguous();
  const at::Tensor ws = w_scale.reshape({-1}).contiguous().expand({n}).contiguous();
  {
    const int64_t bad = first_nonfinite(x_scale.contiguous().const_data_ptr<float>(), x_scale.numel());
    LOWBIT_CHECK(bad < 0, kOp, "argument 'x_scale' holds NaN or Inf (element ", bad, ")");
    const int64_t bad_w = first_nonfinite(w_scale.contiguous().const_data_ptr<float>(), w_scale.numel());
    LOWBIT_CHECK(bad_w < 0, kOp, "argument 'w_scale' holds NaN or Inf (element ", bad_w, ")");
  }
  std::vector<int64_t> out_shape(x_.sizes().begin(), x_.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x_.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;

  const Isa isa = pick_isa();
  const Kernel kernel = kernel_for(isa);
  const bool is_unsigned = isa != Isa::kAmx;   // vpdpbusd / widening kernels: w + 128
  const int64_t kblocks = (k + kKB - 1) / kKB, kp = kblocks * kKB;
  // AMX multiplies 32 rows at a time; the other kernels take any row count.
  const int64_t row_align = isa == Isa::kAmx ? 32 : 1;
  const int64_t mp = (m + row_align - 1) / row_align * row_align;

  // x as rows of kp bytes (a zero-padded copy unless it already is), and for the
  // unsigned kernels 128 * sum_k x[m, k] per row, subtracted from each accumulator.
  const at::Tensor xc = x_.contiguous();
  const int8_t* x_rows = xc.const_data_ptr<int8_t>();
  at::Tensor x_pad;
  if (kp != k || mp != m) {
    x_pad = at::empty({mp, kp}, xc.options());
    int8_t* dst = x_pad.data_ptr<int8_t>();
    const int8_t* src = x_rows;
    at::parallel_for(0, mp, grain_for(kp), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (i < m) std::memcpy(dst + i * kp, src + i * k, k);
        std::memset(dst + i * kp + (i < m ? k : 0), 0, kp - (i < m ? k : 0));
      }
    });
    x_rows = dst;
  }
  std::vector<uint32_t> corr(is_unsigned ? m : 0);
  if (is_unsigned) {
    at::parallel_for(0, m, grain_for(k), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        int32_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += x_rows[i * kp + j];
        corr[i] = static_cast<uint32_t>(s) * 128u;
      }
    });
  }
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bias_p = bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr;
  const float* xs_p = xs.const_data_ptr<float>();
  const float* ws_p = ws.const_data_ptr<float>();

  const at::Tensor wc = w_.contiguous();
  const int8_t* w_p = wc.const_data_ptr<int8_t>();
  const uint8_t flip = is_unsigned ? 0x80 : 0x00;
  const int64_t panel_bytes = kblocks * kBlockBytes;
  const int64_t panels = (n + kNR - 1) / kNR;
  // Rows per task: about 1 MiB of x, so x's block and a panel stay in L2 together.
  const int64_t block_rows = std::max<int64_t>(
      row_align, std::min<int64_t>(512, (int64_t{1} << 20) / std::max<int64_t>(kp, 1)) / row_align * row_align);
  const int64_t row_blocks = (mp + block_rows - 1) / block_rows;

  // Shared packed weight when several row blocks read each panel.
  std::unique_ptr<uint8_t[]> shared;
  uint8_t* shared_p = nullptr;
  if (row_blocks > 1 && panel_bytes > 0) {
    shared.reset(new uint8_t[panels * panel_bytes + 64]);
    shared_p = shared.get() + (64 - reinterpret_cast<uintptr_t>(shared.get()) % 64) % 64;
    at::parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) pack_panel(w_p, n, k, p * kNR, kblocks, flip, isa, shared_p + p * panel_bytes);
    });
  }

  LOWBIT_DISPATCH_FLOATS(out_dtype, "int8_matmul_cpu", [&] {
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, row_blocks * panels, 1, [&](int64_t b, int64_t e) {
      std::unique_ptr<uint8_t[]> own;
      uint8_t* own_p = nullptr;
      if (shared_p == nullptr) {
        own.reset(new uint8_t[panel_bytes + 64]);
        own_p = own.get() + (64 - reinterpret_cast<uintptr_t>(own.get()) % 64) % 64;
      }
      std::vector<int32_t> acc(block_rows * kNR);
      for (int64_t t = b; t < e; ++t) {
        const int64_t rb = t / panels, p = t % panels;
        const int64_t n0 = p * kNR, nc = std::min(kNR, n - n0);
        const int64_t m0 = rb * block_rows, rows = std::min(block_rows, mp - m0);
        const uint8_t* panel = shared_p != nullptr ? shared_p + p * panel_bytes : own_p;
        if (shared_p == nullptr) pack_panel(w_p, n, k, n0, kblocks, flip, isa, own_p);
        kernel(panel, x_rows + m0 * kp, kp, kblocks, rows, acc.data());
        for (int64_t i = 0; i < rows && m0 + i < m; ++i) {
          const int64_t row = m0 + i;
          epilogue_row(acc.data() + i * kNR, is_unsigned ? corr[row] : 0u, xs_p[row], ws_p + n0,
                       bias_p != nullptr ? bias_p + n0 : nullptr, nc, out_p + row * n + n0);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int8_matmul", &int8_matmul_cpu);
}

}  // namespace lowbit::cpu
