// GPTQ on CUDA: accumulate_hessian (one cuBLAS GEMM) and gptq_solve. The Hessian
// preparation (cuSOLVER Cholesky, triangular inverse) and the lazy-batch GEMMs are shared
// ATen calls (core/gptq.h); the per-column loop of a block is the kernel below, one launch
// per block of columns where a framework implementation launches ~10 kernels per column.
// Semantics: python/lowbit/reference/gptq.py.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>

#include "core/check.h"
#include "core/gptq.h"
#include "cuda/common.cuh"

namespace lowbit::cuda {
namespace {

// One CTA owns kTileN output channels (rows of W) for the whole block: GPTQ's rows are
// independent, so CTAs never talk. The block's columns for those channels live in shared
// memory, because each column is read and updated once per earlier column of the block
// (B^2/2 times): from global memory that traffic would dominate. Warp 0 quantizes a
// column (one lane per channel), then all warps apply its error to the later columns.
constexpr int kTileN = 32;
constexpr int kWarps = 8;

template <typename T>
__device__ __forceinline__ T round_scale_dev(T s, int scale_dtype) {
  if (scale_dtype == 1) {  // float16: smallest normal first, round via float32 as torch casts
    const float f = static_cast<float>(s < T(6.103515625e-05) ? T(6.103515625e-05) : s);
    return static_cast<T>(__half2float(__float2half_rn(f)));
  }
  const T tiny = static_cast<T>(1.1754943508222875e-38);
  const float f = static_cast<float>(s < tiny ? tiny : s);
  if (scale_dtype == 2) return static_cast<T>(to_f32(from_f32<c10::BFloat16>(f)));
  return static_cast<T>(f);
}

__device__ __forceinline__ float rint_t(float x) { return rintf(x); }
__device__ __forceinline__ double rint_t(double x) { return rint(x); }

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) gptq_block_kernel(
    T* __restrict__ wt, const T* __restrict__ u, T* __restrict__ err, uint8_t* __restrict__ codes,
    T* __restrict__ scales, int32_t* __restrict__ zeros, const int32_t* __restrict__ group_of,
    double* __restrict__ loss_parts, int64_t k, int64_t n, int64_t b0, int64_t b1, int64_t gs,
    bool params_in_loop, int bits, bool symmetric, T clip, int scale_dtype) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* tile = reinterpret_cast<T*>(smem_raw);  // [B][kTileN]
  __shared__ T e_s[kTileN];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t col = n0 + lane;
  const bool live = col < n;
  const int64_t rows = b1 - b0;
  const T maxq = static_cast<T>((1 << bits) - 1);

  for (int64_t r = warp; r < rows; r += kWarps) {
    tile[r * kTileN + lane] = live ? wt[(b0 + r) * n + col] : T(0);
  }
  __syncthreads();

  double loss = 0.0;
  T scale = T(1), zero = T(0);
  for (int64_t q = b0; q < b1; ++q) {
    const int64_t r = q - b0;
    if (warp == 0) {
      const int64_t g = group_of[q];
      if (params_in_loop && q % gs == 0) {
        const int64_t r_end = r + gs < rows ? r + gs : rows;
        T hi = T(0), lo = T(0);
        for (int64_t j = r; j < r_end; ++j) {
          const T v = tile[j * kTileN + lane];
          if (symmetric) {
            const T av = v < T(0) ? -v : v;
            hi = av > hi ? av : hi;
          } else {
            hi = v > hi ? v : hi;
            lo = v < lo ? v : lo;
          }
        }
        T s;
        int32_t z;
        if (symmetric) {
          s = (hi * clip) / static_cast<T>((1 << (bits - 1)) - 1);
          if (s == T(0)) s = T(1);
          z = 1 << (bits - 1);
        } else {
          s = (hi * clip - lo * clip) / maxq;
          if (s == T(0)) s = T(1);
          const T zr = rint_t(-(lo * clip) / s);
          z = static_cast<int32_t>(zr < T(0) ? T(0) : (zr > maxq ? maxq : zr));
        }
        s = round_scale_dev(s, scale_dtype);
        if (live) {
          scales[g * n + col] = s;
          zeros[g * n + col] = z;
        }
      }
      if (live) {
        scale = scales[g * n + col];
        zero = static_cast<T>(zeros[g * n + col]);
      }
      const T d = u[q * k + q];
      const T w = tile[r * kTileN + lane];
      const T c0 = rint_t(w / scale) + zero;
      const T c = c0 < T(0) ? T(0) : (c0 > maxq ? maxq : c0);
      const T diff = w - (c - zero) * scale;
      const T e = diff / d;
      e_s[lane] = live ? e : T(0);
      if (live) {
        codes[q * n + col] = static_cast<uint8_t>(c);
        err[r * n + col] = e;
        const double dd = static_cast<double>(d);
        loss += static_cast<double>(diff) * static_cast<double>(diff) / (dd * dd) / 2.0;
      }
    }
    __syncthreads();
    const T e = e_s[lane];
    for (int64_t j = r + 1 + warp; j < rows; j += kWarps) {
      tile[j * kTileN + lane] -= e * u[q * k + b0 + j];
    }
    __syncthreads();
  }
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) loss += __shfl_down_sync(0xffffffffu, loss, off);
    if (lane == 0) loss_parts[blockIdx.x] += loss;  // one writer per slot, stream-ordered blocks
  }
}

void accumulate_hessian_cuda(at::Tensor& hessian, const at::Tensor& x, int64_t num_seen) {
  check_cuda("accumulate_hessian", "hessian", hessian);
  const c10::cuda::CUDAGuard guard(hessian.device());
  accumulate_hessian_impl("accumulate_hessian", hessian, x, num_seen);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gptq_solve_cuda(
    const at::Tensor& w, const at::Tensor& hessian, int64_t bits, int64_t group_size, bool symmetric,
    double damp, bool act_order, bool static_groups, int64_t block_size, double clip_ratio,
    at::ScalarType scale_dtype) {
  constexpr const char* op = "gptq_solve";
  check_cuda(op, "w", w);
  const c10::cuda::CUDAGuard guard(w.device());
  const GptqArgs a{bits, group_size, symmetric, damp, act_order, static_groups, block_size, clip_ratio,
                   scale_dtype};
  GptqPlan p = gptq_prepare(op, w, hessian, a);
  const int64_t k = p.wt.size(0), n = p.wt.size(1);
  at::Tensor codes_t = at::empty({k, n}, w.options().dtype(at::kByte));
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  at::Tensor loss_parts = at::zeros({std::max<int64_t>(tiles, 1)}, w.options().dtype(at::kDouble));
  const at::Tensor group_of = p.group_of.contiguous();
  const int sd = scale_dtype == at::kHalf ? 1 : scale_dtype == at::kBFloat16 ? 2 : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto result = AT_DISPATCH_FLOATING_TYPES(p.wt.scalar_type(), "gptq_solve_cuda", [&] {
    const size_t smem = static_cast<size_t>(std::min(p.block, k)) * kTileN * sizeof(scalar_t);
    int dev = 0, max_smem = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    LOWBIT_CHECK(smem + kTileN * sizeof(scalar_t) <= static_cast<size_t>(max_smem), op,
                 "a block of ", std::min(p.block, k), " columns (block_size ", block_size,
                 ", widened to whole groups of group_size ", group_size, " without static groups) of ",
                 sizeof(scalar_t) == 8 ? "float64" : "float32", " needs ", smem,
                 " bytes of shared memory per CTA, over this GPU's ", max_smem,
                 "; use a smaller block_size (or group_size), or float32 (hessian_dtype)");
    C10_CUDA_CHECK(cudaFuncSetAttribute(gptq_block_kernel<scalar_t>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    return gptq_run(p, codes_t, [&](int64_t b0, int64_t b1, at::Tensor& e) {
      if (n == 0) return;
      gptq_block_kernel<scalar_t><<<static_cast<unsigned int>(tiles), kWarps * 32, smem, stream>>>(
          p.wt.data_ptr<scalar_t>(), p.u.const_data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
          codes_t.data_ptr<uint8_t>(), p.scales.data_ptr<scalar_t>(), p.zeros.data_ptr<int32_t>(),
          group_of.const_data_ptr<int32_t>(), loss_parts.data_ptr<double>(), k, n, b0, b1, p.gs,
          p.params_in_loop, static_cast<int>(bits), symmetric, static_cast<scalar_t>(clip_ratio), sd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  auto [codes, scales, zeros, g_idx] = result;
  return {codes, scales, zeros, g_idx, loss_parts.sum()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("accumulate_hessian", &accumulate_hessian_cuda);
  m.impl("gptq_solve", &gptq_solve_cuda);
}

}  // namespace lowbit::cuda
