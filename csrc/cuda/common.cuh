// Helpers shared by the CUDA kernel files: conversions, vector runs, group reductions,
// the first-bad-row flag and launch sizing. The kernels mirror csrc/cpu/ bit for bit.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>

#include "core/check.h"
#include "core/dispatch.h"

// Fast math flushes denormals to zero and swaps IEEE division for an approximation:
// codes would stop matching the reference.
#if defined(__CUDA_ARCH__) && defined(__USE_FAST_MATH__)
#error "lowbit's CUDA kernels need IEEE float32 arithmetic: do not build them with --use_fast_math"
#endif

// at::mm(a, b, out_dtype) (float16/bfloat16 inputs, float32 output) is in torch >= 2.8.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define LOWBIT_HAS_MM_DTYPE 1
#else
#define LOWBIT_HAS_MM_DTYPE 0
#endif

namespace lowbit::cuda {

constexpr int kThreads = 256;   // threads per block of every kernel
constexpr int kVec = 8;         // elements per thread run: 16 bytes of half/bfloat16

// -- argument checks ------------------------------------------------------------------

// The dispatcher sends an op here when any argument is on CUDA; the CPU checks already
// compare devices between arguments, this one rules out a CUDA kernel on a CPU tensor.
inline void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  LOWBIT_CHECK(t.is_cuda(), op, "argument '", arg, "' must be a CUDA tensor, got one on ",
               t.device());
}

// -- launch sizing --------------------------------------------------------------------

inline int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// Blocks for `items` work items, `per_block` per block: grid-stride loops cover the rest
// once every SM holds a full complement of 256-thread blocks (2048 threads / SM).
inline unsigned int grid_for(int64_t items, int64_t per_block) {
  const int64_t want = (items + per_block - 1) / per_block;
  const int64_t cap = int64_t{8} * sm_count();
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(want, cap)));
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// -- first offending row --------------------------------------------------------------

// Device int64 flags that keep the smallest flagged index. Initialised to all ones: as
// unsigned that is above every index, so atomicMin (unsigned 64-bit only on CUDA) keeps
// the minimum; read back as int64 it is -1, the CPU's FirstBad "none".
inline at::Tensor new_flags(const at::Tensor& like, int64_t n, cudaStream_t stream) {
  at::Tensor f = at::empty({n}, like.options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(f.data_ptr(), 0xFF, sizeof(int64_t) * n, stream));
  return f;
}

inline unsigned long long* flag_ptr(at::Tensor& flags, int64_t i = 0) {
  return reinterpret_cast<unsigned long long*>(flags.data_ptr<int64_t>() + i);
}

// Blocks the host until the stream is done: the error has to be raised by this call,
// as the CPU kernel does.
inline void read_flags(const at::Tensor& flags, int64_t* host, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaMemcpyAsync(host, flags.const_data_ptr<int64_t>(),
                                 sizeof(int64_t) * flags.numel(), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
}

__device__ __forceinline__ void flag_min(unsigned long long* flag, int64_t i) {
  atomicMin(flag, static_cast<unsigned long long>(i));
}

// -- conversions (exact, or round to nearest even) ------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(c10::Half x) { return __half2float(__ushort_as_half(x.x)); }
__device__ __forceinline__ float to_f32(c10::BFloat16 x) {
  return __uint_as_float(static_cast<uint32_t>(x.x) << 16);
}

template <typename T>
__device__ __forceinline__ T from_f32(float f);

template <>
__device__ __forceinline__ float from_f32<float>(float f) { return f; }

template <>
__device__ __forceinline__ c10::Half from_f32<c10::Half>(float f) {
  return c10::Half(__half_as_ushort(__float2half_rn(f)), c10::Half::from_bits());
}

// Integer rounding, the formula of csrc/cpu/convert.h: the same bits on every
// architecture, NaN included (cvt.rn.bf16.f32 would give a different NaN).
template <>
__device__ __forceinline__ c10::BFloat16 from_f32<c10::BFloat16>(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// -- vector runs ----------------------------------------------------------------------

// kVec consecutive elements; the alignment lets one run move in 128-bit transactions
// instead of kVec narrow ones.
template <typename T>
struct alignas(sizeof(T) * kVec) Run {
  T v[kVec];
};

// Elements e0 .. e0 + kVec - 1 of p (those below `total`; the rest read as zero).
// `aligned`: p is aligned to a whole Run, so a full run is one vector load.
template <typename T>
__device__ __forceinline__ void load_run(const T* __restrict__ p, int64_t e0, int64_t total,
                                         bool aligned, T (&out)[kVec]) {
  if (aligned && e0 + kVec <= total) {
    const Run<T> r = *reinterpret_cast<const Run<T>*>(p + e0);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = r.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = e0 + j < total ? p[e0 + j] : T{};
  }
}

template <typename T>
__device__ __forceinline__ void store_run(T* __restrict__ p, int64_t e0, int64_t total, bool aligned,
                                          const T (&in)[kVec]) {
  if (aligned && e0 + kVec <= total) {
    Run<T> r;
#pragma unroll
    for (int j = 0; j < kVec; ++j) r.v[j] = in[j];
    *reinterpret_cast<Run<T>*>(p + e0) = r;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (e0 + j < total) p[e0 + j] = in[j];
    }
  }
}

// Row, column and group of consecutive flat elements of a row-major [rows, k] array
// whose rows split into groups of gs columns: two 64-bit divisions per run, not per
// element (they cost tens of instructions each on the GPU).
struct GroupWalk {
  int64_t row, col, grp, next;   // next: first column of the following group
  __device__ GroupWalk(int64_t e, int64_t k, int64_t gs) {
    row = e / k;
    col = e - row * k;
    grp = col / gs;
    next = (grp + 1) * gs;
  }
  __device__ void advance(int64_t k, int64_t gs) {
    if (++col == k) {
      ++row;
      col = 0;
      grp = 0;
      next = gs;
    } else if (col == next) {
      ++grp;
      next += gs;
    }
  }
};

// -- group reductions -----------------------------------------------------------------

// Comparisons written as the CPU writes them: NaN never wins, and max/min are exact in
// any order, so the result is the CPU's whatever the reduction tree.
struct MaxOp {
  __device__ float operator()(float m, float v) const { return v > m ? v : m; }
};
struct MinOp {
  __device__ float operator()(float m, float v) const { return v < m ? v : m; }
};

// Reduces v over the GT threads (32: a warp; a multiple of 32: the whole block) that
// share one work item; every one of them gets the result. GT > 32 synchronises the
// block, so all its threads must call it together.
template <int GT, typename Op>
__device__ __forceinline__ float group_reduce(float v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if constexpr (GT > 32) {
    __shared__ float part[GT / 32];
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    v = part[0];
#pragma unroll
    for (int w = 1; w < GT / 32; ++w) v = op(v, part[w]);
    __syncthreads();   // the next call overwrites part
  }
  return v;
}

// -- per-row absmax quantization (per-token int8, per-row dynamic fp8) ----------------

// One row of x [rows, k] per GT threads: absmax, scale = absmax / qmax (1 where it is 0),
// then codes quant(x / scale). Rows holding NaN or Inf are flagged (smallest wins).
// `aligned`: x, out and every row start are aligned to whole runs.
template <typename T, typename Out, int GT, typename Quant>
__global__ void __launch_bounds__(kThreads)
row_absmax_quant_kernel(const T* __restrict__ x, Out* __restrict__ out, float* __restrict__ scales,
                        int64_t rows, int64_t k, float qmax, bool aligned,
                        unsigned long long* bad, Quant quant) {
  constexpr int kPerBlock = kThreads / GT;
  const int lane = threadIdx.x % GT;
  const int64_t runs = (k + kVec - 1) / kVec;
  for (int64_t row = int64_t{blockIdx.x} * kPerBlock + threadIdx.x / GT; row < rows;
       row += int64_t{gridDim.x} * kPerBlock) {
    const T* src = x + row * k;
    Out* dst = out + row * k;
    float m = 0.f;
    bool finite = true;
    for (int64_t r = lane; r < runs; r += GT) {
      T in[kVec];
      load_run(src, r * kVec, k, aligned, in);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float v = fabsf(to_f32(in[j]));   // the zero padding changes nothing
        m = v > m ? v : m;
        finite = finite && isfinite(v);
      }
    }
    m = group_reduce<GT>(m, MaxOp());
    if (!finite) flag_min(bad, row);
    float s = __fdiv_rn(m, qmax);
    if (s == 0.f) s = 1.f;
    if (lane == 0) scales[row] = s;
    for (int64_t r = lane; r < runs; r += GT) {
      T in[kVec];
      Out q[kVec];
      load_run(src, r * kVec, k, aligned, in);
#pragma unroll
      for (int j = 0; j < kVec; ++j) q[j] = quant(to_f32(in[j]), s);
      store_run(dst, r * kVec, k, aligned, q);
    }
  }
}

// Launches row_absmax_quant_kernel: a warp per row for short rows, a block per row for
// long ones (a warp alone would leave most of the GPU idle on a few long rows).
template <typename T, typename Out, typename Quant>
void launch_row_absmax_quant(const T* x, Out* out, float* scales, int64_t rows, int64_t k, float qmax,
                             unsigned long long* bad, Quant quant, cudaStream_t stream) {
  const bool aligned = k % kVec == 0 && is_aligned(x, sizeof(Run<T>)) && is_aligned(out, sizeof(Run<Out>));
  if (k > 1024) {
    row_absmax_quant_kernel<T, Out, kThreads, Quant><<<grid_for(rows, 1), kThreads, 0, stream>>>(
        x, out, scales, rows, k, qmax, aligned, bad, quant);
  } else {
    row_absmax_quant_kernel<T, Out, 32, Quant><<<grid_for(rows, kThreads / 32), kThreads, 0, stream>>>(
        x, out, scales, rows, k, qmax, aligned, bad, quant);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lowbit::cuda
