// float32 <-> storage conversions for the CPU kernels. Kernels stage kBlock elements at
// a time as float32 and run plain float loops over them, which GCC vectorises; the
// conversions themselves use F16C / AVX2 where the build has them (GCC 12 does not
// vectorise _Float16 casts without AVX-512 FP16). Bit-identical to c10::Half /
// c10::BFloat16 and to torch's casts: round to nearest even (NaN payloads aside).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define LOWBIT_X86_SIMD 1
#endif

namespace lowbit::cpu {

// Elements staged per step: 2 KiB of float32, so source, stage and destination stay in L1.
constexpr int64_t kBlock = 512;

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return bits_to_f32(static_cast<uint32_t>(x.x) << 16); }
inline float to_f32(c10::Half x) {
#if defined(__FLT16_MAX__)
  _Float16 h;
  std::memcpy(&h, &x.x, 2);
  return static_cast<float>(h);
#else
  return static_cast<float>(x);
#endif
}

template <typename T>
inline T from_f32(float f);

template <>
inline float from_f32<float>(float f) { return f; }

template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <>
inline c10::Half from_f32<c10::Half>(float f) {
#if defined(__FLT16_MAX__)
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return c10::Half(bits, c10::Half::from_bits());
#else
  return c10::Half(f);
#endif
}

// -- blocks -------------------------------------------------------------------------------

// float32 view of src[0, n): src itself for float32, else converted into buf (n <= kBlock).
inline const float* as_f32(const float* src, float* /*buf*/, int64_t /*n*/) { return src; }

inline const float* as_f32(const c10::Half* src, float* buf, int64_t n) {
  int64_t i = 0;
#ifdef LOWBIT_X86_SIMD
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) buf[i] = to_f32(src[i]);
  return buf;
}

inline const float* as_f32(const c10::BFloat16* src, float* buf, int64_t n) {
  int64_t i = 0;
#ifdef LOWBIT_X86_SIMD
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(buf + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
#endif
  for (; i < n; ++i) buf[i] = to_f32(src[i]);
  return buf;
}

// dst[0, n) = src[0, n) rounded to the storage type.
inline void store_f32(const float* src, float* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, sizeof(float) * n);
}

inline void store_f32(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#ifdef LOWBIT_X86_SIMD
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = from_f32<c10::Half>(src[i]);
}

inline void store_f32(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#ifdef LOWBIT_X86_SIMD
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), qnan = _mm256_set1_epi32(0x7FC0);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
#endif
  for (; i < n; ++i) dst[i] = from_f32<c10::BFloat16>(src[i]);
}

// -- FP8 encoding ---------------------------------------------------------------------------

// Bits of the FP8 value nearest (ties to even) to v, for |v| <= the format's max or NaN:
// c10's algorithm without its branches, so a loop of it vectorises. MB mantissa bits,
// exponent bias BIAS; NaN becomes 0x7F (both formats' NaN), keeping its sign as c10 does.
template <int MB, int BIAS>
inline uint8_t fp8_bits(float v) {
  constexpr int kShift = 23 - MB;
  constexpr float kMinNormal = 1.0f / static_cast<float>(1 << (BIAS - 1));
  constexpr float kSubScale = static_cast<float>(1 << (BIAS - 1 + MB));   // 1 / subnormal step
  const uint32_t u = f32_to_bits(v);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const float av = bits_to_f32(a);
  const uint32_t normal =
      ((a + ((1u << (kShift - 1)) - 1u) + ((a >> kShift) & 1u)) >> kShift) - (static_cast<uint32_t>(127 - BIAS) << MB);
  // Clamped first: only values below the smallest normal are used, and the cast must not overflow.
  const float small = av < kMinNormal ? av : kMinNormal;
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(std::nearbyint(small * kSubScale)));
  uint32_t mag = av < kMinNormal ? sub : normal;
  mag = a > 0x7F800000u ? 0x7Fu : mag;
  return static_cast<uint8_t>(sign | mag);
}

// dst[j] = FP8 bits of saturate(f[j] / s) for j < n (MB, BIAS as fp8_bits; fmax the
// format's largest finite value). Saturation keeps NaN, as the scalar path does.
template <int MB, int BIAS>
inline void encode_fp8(const float* f, float s, float fmax, uint8_t* dst, int64_t n) {
  int64_t j = 0;
#ifdef LOWBIT_X86_SIMD
  constexpr int kShift = 23 - MB;
  const __m256 vs = _mm256_set1_ps(s), vmax = _mm256_set1_ps(fmax), vmin = _mm256_set1_ps(-fmax);
  const __m256 min_normal = _mm256_set1_ps(1.0f / static_cast<float>(1 << (BIAS - 1)));
  const __m256 sub_scale = _mm256_set1_ps(static_cast<float>(1 << (BIAS - 1 + MB)));
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), one = _mm256_set1_epi32(1);
  const __m256i round_bias = _mm256_set1_epi32((1 << (kShift - 1)) - 1);
  const __m256i rebias = _mm256_set1_epi32((127 - BIAS) << MB), inf = _mm256_set1_epi32(0x7F800000);
  const __m256i nan_code = _mm256_set1_epi32(0x7F), sign_mask = _mm256_set1_epi32(0x80);
  alignas(32) int32_t out[8];
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(f + j), vs);
    v = _mm256_blendv_ps(v, vmax, _mm256_cmp_ps(v, vmax, _CMP_GT_OQ));
    v = _mm256_blendv_ps(v, vmin, _mm256_cmp_ps(v, vmin, _CMP_LT_OQ));
    const __m256i u = _mm256_castps_si256(v);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), sign_mask);
    const __m256i a = _mm256_and_si256(u, abs_mask);
    const __m256 av = _mm256_castsi256_ps(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, kShift), one);
    const __m256i normal = _mm256_sub_epi32(
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(a, round_bias), odd), kShift), rebias);
    const __m256 is_sub = _mm256_cmp_ps(av, min_normal, _CMP_LT_OQ);
    const __m256 small = _mm256_blendv_ps(min_normal, av, is_sub);
    const __m256i sub = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(small, sub_scale),
                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i mag = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(normal), _mm256_castsi256_ps(sub), is_sub));
    mag = _mm256_blendv_epi8(mag, nan_code, _mm256_cmpgt_epi32(a, inf));
    _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm256_or_si256(sign, mag));
    for (int t = 0; t < 8; ++t) dst[j + t] = static_cast<uint8_t>(out[t]);
  }
#endif
  for (; j < n; ++j) {
    float v = f[j] / s;
    v = v < -fmax ? -fmax : (v > fmax ? fmax : v);
    dst[j] = fp8_bits<MB, BIAS>(v);
  }
}

}  // namespace lowbit::cpu
