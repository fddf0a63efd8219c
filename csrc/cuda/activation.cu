// Activations on CUDA: dynamic per-token and static per-tensor int8 quantization, and the
// calibration statistics (per-channel max |x|, sum |x|). Mirrors csrc/cpu/activation.cpp
// (checks, messages, results); semantics: python/lowbit/reference/activation.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/activation.h"
#include "core/check.h"
#include "cuda/common.cuh"

namespace lowbit::cuda {
namespace {

// clamp(rint(x / s), -128, 127): an IEEE division (never a multiply by 1 / s) and
// round half to even, as the reference.
struct Int8Quant {
  __device__ int8_t operator()(float x, float s) const {
    float q = rintf(__fdiv_rn(x, s));
    q = q < -128.f ? -128.f : (q > 127.f ? 127.f : q);
    return static_cast<int8_t>(static_cast<int32_t>(q));
  }
};

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cuda(const at::Tensor& x_) {
  constexpr const char* op = "quantize_per_token_int8";
  check_float(op, "x", x_);
  check_min_dim(op, "x", x_, 1);
  check_cuda(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const int64_t k = x.size(-1), rows = leading_rows(x);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty(row_scale_shape(x), x.options().dtype(at::kFloat));
  if (rows == 0) return {codes, scales};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flags = new_flags(x, 1, stream);

  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "quantize_per_token_int8_cuda", [&] {
    // Fused: each row is read once from memory for its absmax, again from cache to code it.
    launch_row_absmax_quant(x.const_data_ptr<scalar_t>(), codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
                            rows, k, 127.f, flag_ptr(flags), Int8Quant(), stream);
  });
  int64_t bad = -1;
  read_flags(flags, &bad, stream);
  LOWBIT_CHECK(bad < 0, op, "argument 'x' holds NaN or Inf (row ", bad,
               "), which would poison the dynamic scale");
  return {codes, scales};
}

// -- activation_stats -------------------------------------------------------------------

// A block covers kStatCols columns (one warp reads 32 consecutive elements of a row: one
// coalesced request) with kStatLanes warps taking every kStatLanes-th row of its chunk.
constexpr int kStatCols = 32;
constexpr int kStatLanes = kThreads / kStatCols;
// Rows per chunk at least: each block then streams a few KiB, enough to hide its start.
constexpr int64_t kStatMinChunkRows = 64;

// Column maxima and float64 sums of |x| over row chunk blockIdx.y of x [rows, k], one
// partial per (chunk, column), combined across the block's lanes in a fixed order: with
// the fixed chunk order of the commit kernel, the sums do not depend on scheduling (no
// floating-point atomics), so repeated calibrations give identical statistics. The
// first row holding NaN or Inf is flagged.
template <typename T>
__global__ void __launch_bounds__(kThreads)
activation_stats_kernel(const T* __restrict__ x, int64_t rows, int64_t k, int64_t chunk_rows,
                        float* __restrict__ part_max, double* __restrict__ part_sum, unsigned long long* bad) {
  const int tx = threadIdx.x % kStatCols, ty = threadIdx.x / kStatCols;
  const int64_t col = int64_t{blockIdx.x} * kStatCols + tx;
  const int64_t r0 = int64_t{blockIdx.y} * chunk_rows;
  const int64_t r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  float m = 0.f;
  double s = 0.0;
  int64_t first_bad = -1;
  if (col < k) {
    for (int64_t r = r0 + ty; r < r1; r += kStatLanes) {
      const float v = to_f32(x[r * k + col]);
      const float a = fabsf(v);
      m = a > m ? a : m;
      s += static_cast<double>(a);
      if (!isfinite(v) && first_bad < 0) first_bad = r;   // rows ascend: the lane's first
    }
  }
  if (first_bad >= 0) flag_min(bad, first_bad);
  __shared__ float sm[kStatLanes][kStatCols];
  __shared__ double ss[kStatLanes][kStatCols];
  sm[ty][tx] = m;
  ss[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && col < k) {
#pragma unroll
    for (int i = 1; i < kStatLanes; ++i) {
      m = sm[i][tx] > m ? sm[i][tx] : m;
      s += ss[i][tx];
    }
    part_max[int64_t{blockIdx.y} * k + col] = m;
    part_sum[int64_t{blockIdx.y} * k + col] = s;
  }
}

// absmax = max(absmax, max over chunks), abssum += sum over chunks (in chunk order), one
// thread per column; nothing is written once a bad row was flagged, so on error the
// outputs are left as they were, as on the CPU.
__global__ void __launch_bounds__(kThreads)
activation_stats_commit_kernel(const float* __restrict__ part_max, const double* __restrict__ part_sum,
                               int64_t chunks, int64_t k, float* __restrict__ absmax,
                               double* __restrict__ abssum, const unsigned long long* bad) {
  if (*bad != ~0ull) return;
  for (int64_t col = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; col < k;
       col += int64_t{gridDim.x} * blockDim.x) {
    float m = 0.f;
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      const float v = part_max[c * k + col];
      m = v > m ? v : m;
      s += part_sum[c * k + col];
    }
    const float a0 = absmax[col];
    absmax[col] = m > a0 ? m : a0;
    abssum[col] = abssum[col] + s;
  }
}

void activation_stats_cuda(at::Tensor& absmax, at::Tensor& abssum, const at::Tensor& x_) {
  constexpr const char* op = "activation_stats";
  check_activation_stats(op, absmax, abssum, x_);
  check_cuda(op, "absmax", absmax);
  const c10::cuda::CUDAGuard guard(absmax.device());
  const int64_t k = x_.size(-1), rows = leading_rows(x_);
  if (rows == 0 || k == 0) return;
  const at::Tensor x = x_.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Enough (column tile, row chunk) blocks to fill the GPU (8 per SM), in chunks of at
  // least kStatMinChunkRows rows; the y grid dimension stays far below its 65535 limit.
  const int64_t tiles = (k + kStatCols - 1) / kStatCols;
  const int64_t want = std::max<int64_t>(1, (int64_t{8} * sm_count() + tiles - 1) / tiles);
  const int64_t max_chunks = (rows + kStatMinChunkRows - 1) / kStatMinChunkRows;
  int64_t chunks = std::min(want, max_chunks);
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  chunks = (rows + chunk_rows - 1) / chunk_rows;
  at::Tensor part_max = at::empty({chunks, k}, absmax.options());
  at::Tensor part_sum = at::empty({chunks, k}, abssum.options());
  at::Tensor flags = new_flags(absmax, 1, stream);

  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "activation_stats_cuda", [&] {
    const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(chunks));
    activation_stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), rows, k, chunk_rows, part_max.data_ptr<float>(),
        part_sum.data_ptr<double>(), flag_ptr(flags));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  activation_stats_commit_kernel<<<grid_for(k, kThreads), kThreads, 0, stream>>>(
      part_max.const_data_ptr<float>(), part_sum.const_data_ptr<double>(), chunks, k, absmax.data_ptr<float>(),
      abssum.data_ptr<double>(), flag_ptr(flags));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int64_t bad = -1;
  read_flags(flags, &bad, stream);
  LOWBIT_CHECK(bad < 0, op, "argument 'x' holds NaN or Inf (row ", bad, ")");
}

// -- quantize_per_tensor_int8 -----------------------------------------------------------

// Flat runs of x (k columns per row) coded with the one scale; the first element holding
// NaN is flagged by its row (and coded 0 meanwhile).
template <typename T>
__global__ void __launch_bounds__(kThreads)
quantize_per_tensor_int8_kernel(const T* __restrict__ x, const float* __restrict__ scale, int8_t* __restrict__ out,
                                int64_t total, int64_t k, bool aligned, unsigned long long* bad) {
  const float s = *scale;
  const Int8Quant quant;
  const int64_t runs = (total + kVec - 1) / kVec;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < runs;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = r * kVec;
    T in[kVec];
    int8_t q[kVec];
    load_run(x, e0, total, aligned, in);
    int64_t nan_at = -1;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float v = to_f32(in[j]);
      const bool nan = v != v;
      if (nan && nan_at < 0) nan_at = e0 + j;   // the zero padding is never NaN
      q[j] = nan ? int8_t{0} : quant(v, s);
    }
    if (nan_at >= 0) flag_min(bad, nan_at / k);
    store_run(out, e0, total, aligned, q);
  }
}

at::Tensor quantize_per_tensor_int8_cuda(const at::Tensor& x_, const at::Tensor& scale) {
  constexpr const char* op = "quantize_per_tensor_int8";
  check_quantize_per_tensor_int8(op, x_, scale);
  check_cuda(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const int64_t k = x.size(-1), total = x.numel();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flags = new_flags(x, 1, stream);
  if (total > 0) {
    LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "quantize_per_tensor_int8_cuda", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      int8_t* cp = codes.data_ptr<int8_t>();
      const bool aligned = is_aligned(xp, sizeof(Run<scalar_t>)) && is_aligned(cp, sizeof(Run<int8_t>));
      quantize_per_tensor_int8_kernel<scalar_t><<<grid_for((total + kVec - 1) / kVec, kThreads), kThreads, 0,
                                                  stream>>>(xp, scale.const_data_ptr<float>(), cp, total, k,
                                                            aligned, flag_ptr(flags));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // The kernel reads the scale on the device; its value is checked here, with the NaN
  // flag, after one synchronisation (a bad scale only makes codes that are thrown away).
  float s = 0.f;
  C10_CUDA_CHECK(cudaMemcpyAsync(&s, scale.const_data_ptr<float>(), sizeof(float), cudaMemcpyDeviceToHost, stream));
  int64_t bad = -1;
  read_flags(flags, &bad, stream);
  check_tensor_scale_value(op, s);
  LOWBIT_CHECK(bad < 0, op, "argument 'x' holds NaN (row ", bad, ")");
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_per_token_int8", &quantize_per_token_int8_cuda);
  m.impl("activation_stats", &activation_stats_cuda);
  m.impl("quantize_per_tensor_int8", &quantize_per_tensor_int8_cuda);
}

}  // namespace lowbit::cuda
