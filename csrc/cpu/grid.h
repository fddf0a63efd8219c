// The RTN grid's arithmetic (python/lowbit/reference/quant.py), shared by the CPU kernels
// that quantize: quant_params / quantize (csrc/cpu/quant.cpp) and AWQ's searches
// (csrc/cpu/awq.cpp). One IEEE float32 operation at a time, in the reference's order
// (the CPU build uses -ffp-contract=off), so every scale, zero and code matches it bit
// for bit.
#pragma once

#include <cmath>
#include <cstdint>

namespace lowbit::cpu {

// quant_params' scale and zero of a group whose range, widened to hold 0, is [lo, hi],
// shrunk by clip: symmetric max|.| * clip / qmax with the middle code as zero, or
// asymmetric (hi - lo) * clip / maxq with zero = clamp(rint(-lo * clip / scale), 0, maxq).
// A zero scale (an all-zero group) becomes 1.
inline void rtn_params(float hi, float lo, float clip, bool symmetric, float qmax, float maxq, int32_t sym_zero,
                       float& scale, int32_t& zero) {
  if (symmetric) {
    const float amax = hi > -lo ? hi : -lo;
    scale = (amax * clip) / qmax;
    if (scale == 0.f) scale = 1.f;
    zero = sym_zero;
  } else {
    const float h = hi * clip, l = lo * clip;
    scale = (h - l) / maxq;
    if (scale == 0.f) scale = 1.f;
    zero = static_cast<int32_t>(std::fmin(std::fmax(std::nearbyint(-l / scale), 0.f), maxq));
  }
}

// quantize's code of v, as a float: clamp(rint(v / s) + z, 0, maxq).
inline float rtn_code(float v, float s, float z, float maxq) {
  float q = std::nearbyint(v / s) + z;
  q = q < 0.f ? 0.f : q;
  q = q > maxq ? maxq : q;
  return q;
}

}  // namespace lowbit::cpu
