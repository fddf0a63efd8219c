// The RTN grid's arithmetic (python/lowbit/reference/quant.py) on the device, shared by
// the CUDA kernels that quantize: quant_params / quantize (csrc/cuda/quant.cu) and AWQ's
// searches (csrc/cuda/awq.cu). Every float operation is an explicit IEEE intrinsic (nvcc
// would otherwise fuse a * b + c into one FMA), so scales, zeros and codes match the
// reference and csrc/cpu/grid.h bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lowbit::cuda {

// quant_params' scale and zero of a group whose range, widened to hold 0, is [lo, hi],
// shrunk by clip (csrc/cpu/grid.h's rtn_params).
__device__ __forceinline__ void rtn_params(float hi, float lo, float clip, bool symmetric, float qmax, float maxq,
                                           int32_t sym_zero, float& scale, int32_t& zero) {
  if (symmetric) {
    const float amax = hi > -lo ? hi : -lo;
    scale = __fdiv_rn(__fmul_rn(amax, clip), qmax);
    if (scale == 0.f) scale = 1.f;
    zero = sym_zero;
  } else {
    const float h = __fmul_rn(hi, clip), l = __fmul_rn(lo, clip);
    scale = __fdiv_rn(__fsub_rn(h, l), maxq);
    if (scale == 0.f) scale = 1.f;
    zero = static_cast<int32_t>(fminf(fmaxf(rintf(__fdiv_rn(-l, scale)), 0.f), maxq));
  }
}

// quantize's code of v, as a float: clamp(rint(v / s) + z, 0, maxq).
__device__ __forceinline__ float rtn_code(float v, float s, float z, float maxq) {
  float q = __fadd_rn(rintf(__fdiv_rn(v, s)), z);
  q = q < 0.f ? 0.f : q;
  q = q > maxq ? maxq : q;
  return q;
}

}  // namespace lowbit::cuda
