// W8A8 int8 matmul on CUDA: y = float(x w^T as int32) * x_scale * w_scale + bias, on int8
// tensor cores (WMMA m16n16k16, int32 accumulation, sm_72+) with the dequantization
// fused into the store. Mirrors csrc/cpu/int8_matmul.cpp (checks, messages, results,
// bit for bit); semantics: python/lowbit/reference/matmul.py.
//
// A CTA computes a BM x BN tile of y: each of its warps a (FM x 16) x (FN x 16) block
// of int32 WMMA accumulators. K advances BK = 64 bytes at a time through shared memory,
// where a tile is stored as four k slabs of [rows][16 bytes]: each 16 x 16 fragment is
// then 256 contiguous, 256-byte aligned bytes (WMMA wants 32-byte aligned pointers, which
// a row-major [rows][64] tile breaks at k = 16 and 48). The next k tile is read from
// global memory into registers while the tensor cores work on the current one. Rows of x
// or w past M or N and bytes past K are zero in shared memory, so ragged edges add
// nothing. Epilogue per element: __int2float_rn, __fmul_rn by the row's scale, __fmul_rn
// by the channel's scale, __fadd_rn of the bias (explicit roundings, never fused into an
// FMA), one rounding to out_dtype: the reference's operations, in its order.
//
// Few rows (M <= 64): 32 x 64 tiles, and K split across CTAs when the output has too few
// tiles to fill the GPU; each CTA adds its int32 sums into an [M, N] int32 buffer with
// atomicAdd (integer addition: exact in any order), and a second kernel applies the same
// epilogue. Otherwise 128 x 128 tiles with the epilogue fused into the store.
//
// The scales are checked for NaN/Inf by a small kernel beside the matmul; the flags are
// read back (one stream synchronisation per call) to raise the error from this call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <mma.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/scaled_matmul.h"
#include "cuda/common.cuh"

namespace lowbit::cuda {
namespace {

constexpr const char* kOp = "int8_matmul";
constexpr int kBK = 64;             // k per shared-memory tile
constexpr int kSlabs = kBK / 16;    // 16-byte k slabs per tile

// -- kernels --------------------------------------------------------------------------

struct Args {
  const int8_t* x;       // [M, K], rows contiguous
  const int8_t* w;       // [N, K], rows contiguous
  int64_t m, n, k;
  bool vec;              // K % 16 == 0 and x, w 16-byte aligned: 16-byte loads
  const float* xs;       // x_scale, element row * xs_step
  int64_t xs_step;
  const float* ws;       // w_scale, element col * ws_step
  int64_t ws_step;
  const float* bias;     // float32 [N] or nullptr
  int64_t kchunk;        // k per CTA along grid z (a multiple of kBK, or K when gridDim.z == 1)
  int32_t* partial;      // split K: int32 [M, N] that CTAs add their sums to; else nullptr
};

// WM x WN warps, each FM x FN fragments of 16 x 16.
template <int WM_, int WN_, int FM_, int FN_>
struct Tile {
  static constexpr int WM = WM_, WN = WN_, FM = FM_, FN = FN_;
  static constexpr int kWarps = WM * WN;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBM = WM * FM * 16;
  static constexpr int kBN = WN * FN * 16;
};
// 128 x 128 tiles, 8 warps of 32 x 64: the many-row case.
using LargeTile = Tile<4, 2, 2, 4>;
// 32 x 64 tiles, 4 warps of 16 x 32: for few rows, with K split across CTAs (split_k).
using SmallTile = Tile<2, 2, 1, 2>;
constexpr int64_t kSmallTileMaxRows = 64;

// 16 bytes of row `row` of a [rows, k] int8 matrix from column k0 on; zeros from column
// kend (<= k) and past the last row.
__device__ __forceinline__ int4 load16(const int8_t* __restrict__ p, int64_t row, int64_t rows, int64_t k0,
                                       int64_t kend, int64_t k, bool vec) {
  if (row >= rows || k0 >= kend) return make_int4(0, 0, 0, 0);
  const int8_t* src = p + row * k + k0;
  if (vec) return *reinterpret_cast<const int4*>(src);   // k0 + 16 <= kend: K, kend multiples of 16
  union {
    int4 v;
    int8_t b[16];
  } u;
#pragma unroll
  for (int i = 0; i < 16; ++i) u.b[i] = k0 + i < kend ? src[i] : int8_t{0};
  return u.v;
}

// The reference's epilogue of one accumulator: explicit roundings, never an FMA.
template <typename out_t>
__device__ __forceinline__ out_t dequant(int32_t acc, int64_t row, int64_t col, const Args& a) {
  float v = __int2float_rn(acc);
  v = __fmul_rn(v, a.xs[row * a.xs_step]);
  v = __fmul_rn(v, a.ws[col * a.ws_step]);
  if (a.bias != nullptr) v = __fadd_rn(v, a.bias[col]);
  return from_f32<out_t>(v);
}

template <typename T, typename out_t>
__global__ void __launch_bounds__(T::kThreads) int8_matmul_kernel(Args a, out_t* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 720
  __trap();   // no int8 WMMA before sm_72; the host refuses such devices first
#else
  using namespace nvcuda;
  constexpr int kBM = T::kBM, kBN = T::kBN;
  constexpr int kAChunks = kBM * kSlabs, kBChunks = kBN * kSlabs;   // 16-byte pieces of a k tile
  constexpr int kAPer = (kAChunks + T::kThreads - 1) / T::kThreads;
  constexpr int kBPer = (kBChunks + T::kThreads - 1) / T::kThreads;
  __shared__ __align__(256) int8_t as[kSlabs][kBM][16];
  __shared__ __align__(256) int8_t bs[kSlabs][kBN][16];
  __shared__ __align__(256) int32_t stage[T::kWarps][16 * 16];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / T::WN, wn = warp % T::WN;
  const int64_t m0 = int64_t{blockIdx.x} * kBM, n0 = int64_t{blockIdx.y} * kBN;
  const int64_t kbeg = int64_t{blockIdx.z} * a.kchunk, kend = min(a.k, kbeg + a.kchunk);

  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[T::FM][T::FN];
#pragma unroll
  for (int i = 0; i < T::FM; ++i) {
#pragma unroll
    for (int j = 0; j < T::FN; ++j) wmma::fill_fragment(acc[i][j], 0);
  }

  // Chunk c of a k tile: row c / kSlabs, slab c % kSlabs (consecutive threads read
  // consecutive 16-byte pieces of a row: 64-byte runs of global memory).
  int4 ra[kAPer], rb[kBPer];
  auto load_tile = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kAPer; ++i) {
      const int c = tid + i * T::kThreads;
      if (c < kAChunks) ra[i] = load16(a.x, m0 + c / kSlabs, a.m, k0 + (c % kSlabs) * 16, kend, a.k, a.vec);
    }
#pragma unroll
    for (int i = 0; i < kBPer; ++i) {
      const int c = tid + i * T::kThreads;
      if (c < kBChunks) rb[i] = load16(a.w, n0 + c / kSlabs, a.n, k0 + (c % kSlabs) * 16, kend, a.k, a.vec);
    }
  };
  auto store_tile = [&] {
#pragma unroll
    for (int i = 0; i < kAPer; ++i) {
      const int c = tid + i * T::kThreads;
      if (c < kAChunks) *reinterpret_cast<int4*>(&as[c % kSlabs][c / kSlabs][0]) = ra[i];
    }
#pragma unroll
    for (int i = 0; i < kBPer; ++i) {
      const int c = tid + i * T::kThreads;
      if (c < kBChunks) *reinterpret_cast<int4*>(&bs[c % kSlabs][c / kSlabs][0]) = rb[i];
    }
  };

  const int64_t ktiles = kend > kbeg ? (kend - kbeg + kBK - 1) / kBK : 0;
  if (ktiles > 0) load_tile(kbeg);
  for (int64_t t = 0; t < ktiles; ++t) {
    __syncthreads();   // every warp is done with the previous tile
    store_tile();
    __syncthreads();
    if (t + 1 < ktiles) load_tile(kbeg + (t + 1) * kBK);   // in flight during the MMAs below
#pragma unroll
    for (int s = 0; s < kSlabs; ++s) {
      // A: row-major 16 x 16 (m, k) at ldm 16; B = w^T: column-major (k, n), i.e. w's
      // rows [n][16 k], also at ldm 16.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[T::FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[T::FN];
#pragma unroll
      for (int i = 0; i < T::FM; ++i) wmma::load_matrix_sync(fa[i], &as[s][(wm * T::FM + i) * 16][0], 16);
#pragma unroll
      for (int j = 0; j < T::FN; ++j) wmma::load_matrix_sync(fb[j], &bs[s][(wn * T::FN + j) * 16][0], 16);
#pragma unroll
      for (int i = 0; i < T::FM; ++i) {
#pragma unroll
        for (int j = 0; j < T::FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }

  // Epilogue: each fragment through the warp's own staging buffer, one element per lane
  // at a time (16 consecutive columns of a row per half-warp).
  int32_t* st = stage[warp];
#pragma unroll
  for (int i = 0; i < T::FM; ++i) {
#pragma unroll
    for (int j = 0; j < T::FN; ++j) {
      wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t row0 = m0 + (wm * T::FM + i) * 16, col0 = n0 + (wn * T::FN + j) * 16;
#pragma unroll
      for (int e = lane; e < 256; e += 32) {
        const int64_t row = row0 + e / 16, col = col0 + e % 16;
        if (row < a.m && col < a.n) {
          if (a.partial != nullptr) {
            atomicAdd(a.partial + row * a.n + col, st[e]);   // integer: exact in any order (mod 2^32)
          } else {
            out[row * a.n + col] = dequant<out_t>(st[e], row, col, a);
          }
        }
      }
      __syncwarp();   // the next fragment overwrites the staging buffer
    }
  }
#endif
}

// The epilogue of a split-K matmul, over the summed accumulators.
template <typename out_t>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(Args a, out_t* __restrict__ out) {
  const int64_t total = a.m * a.n, stride = int64_t{gridDim.x} * kThreads;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < total; i += stride) {
    out[i] = dequant<out_t>(a.partial[i], i / a.n, i % a.n, a);
  }
}

// first[0] / first[1]: smallest index of a NaN or Inf in xs[0, nx) / ws[0, nw).
__global__ void __launch_bounds__(kThreads) nonfinite_kernel(const float* __restrict__ xs, int64_t nx,
                                                             const float* __restrict__ ws, int64_t nw,
                                                             unsigned long long* first) {
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < nx + nw; i += stride) {
    if (i < nx) {
      if (!isfinite(xs[i])) flag_min(first, i);
    } else if (!isfinite(ws[i - nx])) {
      flag_min(first + 1, i - nx);
    }
  }
}

// Split K into chunks of whole k tiles when the output alone has too few tiles to give
// every SM several CTAs: a CTA's k tiles run one after another, each waiting on its own
// global loads, so few long CTAs leave the memory system idle (the few-rows case).
int64_t split_k(int64_t output_tiles, int64_t k) {
  const int64_t ktiles = (k + kBK - 1) / kBK;
  const int64_t want = (8 * int64_t{sm_count()} + output_tiles - 1) / std::max<int64_t>(output_tiles, 1);
  return std::max<int64_t>(1, std::min({want, ktiles / 4, int64_t{64}}));
}

template <typename T, typename out_t>
void launch(Args a, out_t* out, bool allow_split, const at::Tensor& like, cudaStream_t stream) {
  const int64_t grid_m = (a.m + T::kBM - 1) / T::kBM, grid_n = (a.n + T::kBN - 1) / T::kBN;
  LOWBIT_CHECK(grid_m <= 0x7FFFFFFF && grid_n <= 65535, kOp, "output of ", a.m, " x ", a.n,
               " is too large for one launch (at most 65535 * ", T::kBN, " columns)");
  int64_t splits = allow_split ? split_k(grid_m * grid_n, a.k) : 1;
  at::Tensor partial;
  a.kchunk = a.k;
  if (splits > 1) {
    const int64_t ktiles = (a.k + kBK - 1) / kBK;
    a.kchunk = (ktiles + splits - 1) / splits * kBK;
    splits = (a.k + a.kchunk - 1) / a.kchunk;   // every chunk non-empty
    partial = at::empty({a.m, a.n}, like.options().dtype(at::kInt));
    a.partial = partial.data_ptr<int32_t>();
    C10_CUDA_CHECK(cudaMemsetAsync(a.partial, 0, sizeof(int32_t) * a.m * a.n, stream));
  }
  const dim3 grid(static_cast<unsigned int>(grid_m), static_cast<unsigned int>(grid_n),
                  static_cast<unsigned int>(splits));
  int8_matmul_kernel<T, out_t><<<grid, T::kThreads, 0, stream>>>(a, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    epilogue_kernel<out_t><<<grid_for(a.m * a.n, kThreads), kThreads, 0, stream>>>(a, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor int8_matmul_cuda(const at::Tensor& x_, const at::Tensor& x_scale, const at::Tensor& w_,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype) {
  const ScaledMatmulSizes sz = check_int8_matmul(x_, x_scale, w_, w_scale, bias, out_dtype);
  check_cuda(kOp, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m = sz.m, n = sz.n, k = sz.k;
  int dev = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  LOWBIT_CHECK(major * 10 + minor >= 72, kOp, "int8 tensor cores need a GPU of compute capability 7.2 or newer, "
               "this one is ", major, ".", minor);

  const at::Tensor xs = x_scale.reshape({-1}).contiguous();
  const at::Tensor ws = w_scale.reshape({-1}).contiguous();
  at::Tensor flags = new_flags(x_, 2, stream);
  if (xs.numel() + ws.numel() > 0) {
    nonfinite_kernel<<<grid_for(xs.numel() + ws.numel(), kThreads), kThreads, 0, stream>>>(
        xs.const_data_ptr<float>(), xs.numel(), ws.const_data_ptr<float>(), ws.numel(), flag_ptr(flags));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  std::vector<int64_t> out_shape(x_.sizes().begin(), x_.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x_.options().dtype(out_dtype));
  at::Tensor x, w, bias_f;
  if (m > 0 && n > 0) {
    x = x_.reshape({m, k}).contiguous();
    w = w_.contiguous();
    if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
    Args a{};
    a.x = x.const_data_ptr<int8_t>();
    a.w = w.const_data_ptr<int8_t>();
    a.m = m;
    a.n = n;
    a.k = k;
    a.vec = k % 16 == 0 && is_aligned(a.x, 16) && is_aligned(a.w, 16);
    a.xs = xs.const_data_ptr<float>();
    a.xs_step = xs.numel() == 1 ? 0 : 1;
    a.ws = ws.const_data_ptr<float>();
    a.ws_step = ws.numel() == 1 ? 0 : 1;
    a.bias = bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr;
    LOWBIT_DISPATCH_FLOATS(out_dtype, "int8_matmul_cuda", [&] {
      if (m <= kSmallTileMaxRows) {
        launch<SmallTile>(a, out.data_ptr<scalar_t>(), /*allow_split=*/true, x, stream);
      } else {
        launch<LargeTile>(a, out.data_ptr<scalar_t>(), /*allow_split=*/false, x, stream);
      }
    });
  }
  int64_t bad[2] = {-1, -1};
  read_flags(flags, bad, stream);
  LOWBIT_CHECK(bad[0] < 0, kOp, "argument 'x_scale' holds NaN or Inf (element ", bad[0], ")");
  LOWBIT_CHECK(bad[1] < 0, kOp, "argument 'w_scale' holds NaN or Inf (element ", bad[1], ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("int8_matmul", &int8_matmul_cuda);
}

}  // namespace lowbit::cuda
