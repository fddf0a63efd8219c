// float32 <-> storage conversions for the CPU kernels, written as plain inline code so
// GCC vectorises the loops around them (F16C's vcvtph2ps / vcvtps2ph for half, shifts
// and a select for bfloat16). Bit-identical to c10::Half / c10::BFloat16: round to
// nearest even, NaN kept.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace lowbit::cpu {

inline float to_f32(float x) { return x; }

inline float to_f32(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

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
  uint32_t u;
  std::memcpy(&u, &f, 4);
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

}  // namespace lowbit::cpu
