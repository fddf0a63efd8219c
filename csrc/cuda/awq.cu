// AWQ's two searches on CUDA: awq_scale_search and awq_clip_search. Mirrors
// csrc/cpu/awq.cpp (checks, messages, results); semantics: python/lowbit/reference/awq.py.
//
// Scale search: per chunk of candidate rows, one kernel scales, rounds, dequantizes,
// unscales and subtracts (a warp per group, a block per group longer than 1024), one
// cuBLAS GEMM multiplies the differences by the Gram matrix, one kernel takes each row's
// float64 dot product. Clip search: groups of up to 128 columns in one kernel (the gram
// block in shared memory, a warp per row trying every ratio); longer groups as the scale
// search, a GEMM per group. Every float operation on the way to a rounded weight is an
// explicit IEEE intrinsic, so the differences equal the reference's bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "core/awq.h"
#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/grid.cuh"

namespace lowbit::cuda {
namespace {

constexpr int kDirectMax = 128;                 // clip search: direct quadratic forms up to here
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;                 // rows per warp per gram block loaded
constexpr int kPerLane = kDirectMax / 32;
constexpr double kInf = std::numeric_limits<double>::infinity();

// The RTN grid of reference/quant.py (csrc/cuda/grid.cuh, as quant.cu) and the scale
// rounding of QuantLinear.from_linear. scale_dtype: 0 float32, 1 float16, 2 bfloat16.
struct Grid {
  bool symmetric;
  float qmax, maxq;
  int32_t sym_zero;
  int scale_dtype;

  __device__ __forceinline__ void params(float hi, float lo, float clip, float& scale, int32_t& zero) const {
    rtn_params(hi, lo, clip, symmetric, qmax, maxq, sym_zero, scale, zero);
  }

  // scale.clamp(min=finfo(scale_dtype).tiny).to(scale_dtype).float(): inf on overflow.
  __device__ __forceinline__ float stored(float s) const {
    if (scale_dtype == 1) {
      s = s < 6.103515625e-05f ? 6.103515625e-05f : s;
      return __half2float(__float2half_rn(s));
    }
    s = s < FLT_MIN ? FLT_MIN : s;
    return scale_dtype == 2 ? to_f32(from_f32<c10::BFloat16>(s)) : s;
  }

  // dequantize(quantize(v)) on the grid (st, z).
  __device__ __forceinline__ float round(float v, float st, float z) const {
    return __fmul_rn(__fsub_rn(rtn_code(v, st, z, maxq), z), st);
  }
};

Grid make_grid(int64_t bits, bool symmetric, at::ScalarType sd) {
  return Grid{symmetric, static_cast<float>((1 << (bits - 1)) - 1), static_cast<float>((1 << bits) - 1),
              static_cast<int32_t>(1 << (bits - 1)), sd == at::kHalf ? 1 : sd == at::kBFloat16 ? 2 : 0};
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;   // a butterfly: every lane adds the same pairs, so every lane holds the same sum
}

// Rows [r0, r0 + rows) of the differences W_hat - W into d [rows, K], GT threads per
// group. kScaled (scale search): virtual row v is weight row v % n scaled by candidate
// v / n of cands [*, K], W_hat = round(W * s) / s, and an overflowing stored scale sets
// overflow[candidate]. Otherwise (clip search) row v is weight row v, the range is
// shrunk by clip, and each group's stored scale and zero go to cand_scale / cand_zero
// [rows, g]. Overflowing groups leave zeros.
template <int GT, bool kScaled>
__global__ void __launch_bounds__(kThreads)
diff_kernel(const float* __restrict__ w, const float* __restrict__ cands, float* __restrict__ d, int64_t r0,
            int64_t rows, int64_t n, int64_t k, int64_t gs, int64_t g, Grid grid, float clip,
            int32_t* __restrict__ overflow, float* __restrict__ cand_scale, int32_t* __restrict__ cand_zero) {
  constexpr int kPerBlock = kThreads / GT;
  const int lane = threadIdx.x % GT;
  const int64_t items = rows * g;
  for (int64_t item = int64_t{blockIdx.x} * kPerBlock + threadIdx.x / GT; item < items;
       item += int64_t{gridDim.x} * kPerBlock) {
    const int64_t lr = item / g, gi = item - lr * g, v = r0 + lr;
    const int64_t c = kScaled ? v / n : 0, row = kScaled ? v - c * n : v;
    const int64_t k0 = gi * gs, len = min(k, k0 + gs) - k0;
    const float* wr = w + row * k + k0;
    const float* sr = kScaled ? cands + c * k + k0 : nullptr;
    float* dr = d + lr * k + k0;
    float hi = 0.f, lo = 0.f;
    for (int64_t j = lane; j < len; j += GT) {
      const float x = kScaled ? __fmul_rn(wr[j], sr[j]) : wr[j];
      hi = x > hi ? x : hi;
      lo = x < lo ? x : lo;
    }
    hi = group_reduce<GT>(hi, MaxOp());
    lo = group_reduce<GT>(lo, MinOp());
    float scale;
    int32_t zero;
    grid.params(hi, lo, clip, scale, zero);
    const float st = grid.stored(scale);
    const bool ovf = !isfinite(st);
    if (lane == 0) {
      if constexpr (kScaled) {
        if (ovf) overflow[c] = 1;
      } else {
        cand_scale[item] = st;
        cand_zero[item] = zero;
      }
    }
    const float z = static_cast<float>(zero);
    for (int64_t j = lane; j < len; j += GT) {
      float out = 0.f;
      if (!ovf) {
        const float x = wr[j];
        if constexpr (kScaled) {
          const float s = sr[j];
          out = __fsub_rn(__fdiv_rn(grid.round(__fmul_rn(x, s), st, z), s), x);
        } else {
          out = __fsub_rn(grid.round(x, st, z), x);
        }
      }
      dr[j] = out;
    }
  }
}

template <bool kScaled>
void launch_diff(const float* w, const float* cands, float* d, int64_t r0, int64_t rows, int64_t n, int64_t k,
                 int64_t gs, int64_t g, const Grid& grid, float clip, int32_t* overflow, float* cand_scale,
                 int32_t* cand_zero, cudaStream_t stream) {
  const int64_t items = rows * g;
  if (std::min(gs, k) > 1024) {
    diff_kernel<kThreads, kScaled><<<grid_for(items, 1), kThreads, 0, stream>>>(
        w, cands, d, r0, rows, n, k, gs, g, grid, clip, overflow, cand_scale, cand_zero);
  } else {
    diff_kernel<32, kScaled><<<grid_for(items, kWarps), kThreads, 0, stream>>>(
        w, cands, d, r0, rows, n, k, gs, g, grid, clip, overflow, cand_scale, cand_zero);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[r * g + gi] = sum over group gi's columns of a[r, j] * b[r, j] in float64 (a, b
// [rows, k] contiguous), a warp per (row, group). The float32 products are exact in
// float64, so a fused multiply-add rounds them no differently.
__global__ void __launch_bounds__(kThreads)
group_dot_kernel(const float* __restrict__ a, const float* __restrict__ b, double* __restrict__ out, int64_t rows,
                 int64_t k, int64_t gs, int64_t g) {
  const int lane = threadIdx.x % 32;
  for (int64_t item = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32; item < rows * g;
       item += int64_t{gridDim.x} * kWarps) {
    const int64_t r = item / g, k0 = (item - r * g) * gs, len = min(k, k0 + gs) - k0;
    const float* pa = a + r * k + k0;
    const float* pb = b + r * k + k0;
    double acc = 0.0;
    for (int64_t j = lane; j < len; j += 32) acc += static_cast<double>(pa[j]) * static_cast<double>(pb[j]);
    acc = warp_sum(acc);
    if (lane == 0) out[item] = acc;
  }
}

void launch_group_dot(const float* a, const float* b, double* out, int64_t rows, int64_t k, int64_t gs, int64_t g,
                      cudaStream_t stream) {
  group_dot_kernel<<<grid_for(rows * g, kWarps), kThreads, 0, stream>>>(a, b, out, rows, k, gs, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// -- scale search -----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> awq_scale_search_cuda(const at::Tensor& w_, const at::Tensor& gram_,
                                                         const at::Tensor& act_mean_, int64_t bits, int64_t group_size,
                                                         bool symmetric, int64_t n_grid, at::ScalarType scale_dtype,
                                                         double max_value) {
  constexpr const char* op = "awq_scale_search";
  check_awq_scale_search(op, w_, gram_, act_mean_, bits, group_size, n_grid, scale_dtype, max_value);
  check_cuda(op, "w", w_);
  const c10::cuda::CUDAGuard guard(w_.device());
  const at::Tensor w = w_.contiguous(), gram = gram_.contiguous(), act_mean = act_mean_.contiguous();
  check_awq_scale_search_values(op, w, gram, act_mean);

  const int64_t n = w.size(0), k = w.size(1);
  const at::Tensor cands = awq_scale_candidates(act_mean, n_grid);
  if (k == 0) return {at::zeros({n_grid}, w.options().dtype(at::kDouble)), cands.select(0, 0).clone()};

  const std::vector<int64_t> cand = awq_valid_candidates(w, cands, max_value);
  const int64_t nv = static_cast<int64_t>(cand.size()), total = nv * n;
  std::vector<double> cand_loss(nv, 0.0);
  std::vector<int32_t> cand_overflow(nv, 0);
  if (total > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor compact = at::empty({nv, k}, cands.options());
    for (int64_t j = 0; j < nv; ++j) compact.select(0, j).copy_(cands.select(0, cand[j]));
    at::Tensor overflow = at::zeros({nv}, w.options().dtype(at::kInt));
    at::Tensor row_loss = at::empty({total}, w.options().dtype(at::kDouble));
    const Grid grid = make_grid(bits, symmetric, scale_dtype);
    const int64_t gs = std::min(group_size, k), g = num_groups(k, group_size);
    const int64_t chunk = awq_chunk_rows(total, k);
    at::Tensor d = at::empty({chunk, k}, w.options()), dg = at::empty({chunk, k}, w.options());
    for (int64_t r0 = 0; r0 < total; r0 += chunk) {
      const int64_t rows = std::min(chunk, total - r0);
      launch_diff<true>(w.const_data_ptr<float>(), compact.const_data_ptr<float>(), d.data_ptr<float>(), r0, rows, n,
                        k, gs, g, grid, 1.f, overflow.data_ptr<int32_t>(), nullptr, nullptr, stream);
      at::Tensor dgv = dg.narrow(0, 0, rows);
      at::mm_out(dgv, d.narrow(0, 0, rows), gram);
      launch_group_dot(dg.const_data_ptr<float>(), d.const_data_ptr<float>(), row_loss.data_ptr<double>() + r0,
                       rows, k, k, 1, stream);
    }
    const at::Tensor sums = row_loss.view({nv, n}).sum(at::IntArrayRef{1}).cpu();
    const at::Tensor ovf = overflow.cpu();
    for (int64_t j = 0; j < nv; ++j) {
      cand_loss[j] = sums.const_data_ptr<double>()[j];
      cand_overflow[j] = ovf.const_data_ptr<int32_t>()[j];
    }
  }

  at::Tensor losses = at::empty({n_grid}, at::TensorOptions().dtype(at::kDouble));
  double* lp = losses.data_ptr<double>();
  std::fill(lp, lp + n_grid, kInf);
  for (int64_t j = 0; j < nv; ++j) {
    lp[cand[j]] = cand_overflow[j] || std::isnan(cand_loss[j]) ? kInf : cand_loss[j];
  }
  return {losses.to(w.options().dtype(at::kDouble)), cands.select(0, awq_best_candidate(lp, n_grid)).clone()};
}

// -- clip search ------------------------------------------------------------------------

// Groups of at most kDirectMax columns. A block per (group, kWarps * kRowsPerWarp rows):
// the gram block G_gg in shared memory, a warp per row: its range once, then for every
// ratio the differences d (one column per lane and 32-column step) and d G_gg^T d in
// float64, keeping the best. Dynamic shared memory: gs * gs + kWarps * gs floats.
__global__ void __launch_bounds__(kThreads)
clip_direct_kernel(const float* __restrict__ w, const float* __restrict__ gram, int64_t n, int64_t k, int64_t gs,
                   int64_t g, Grid grid, const float* __restrict__ clips, int64_t n_ratio,
                   float* __restrict__ out_scale, int32_t* __restrict__ out_zero, float* __restrict__ out_ratio) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* gsm = smem;                          // [gs][gs], rows of the block at stride gs
  float* dbuf = smem + gs * gs + warp * gs;   // this warp's differences
  constexpr int64_t kRowsPerItem = int64_t{kWarps} * kRowsPerWarp;
  const int64_t tiles = (n + kRowsPerItem - 1) / kRowsPerItem, items = g * tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t gi = item / tiles, tile = item - gi * tiles;
    const int64_t k0 = gi * gs, len = min(k, k0 + gs) - k0;
    __syncthreads();   // the previous block of gram is no longer read
    for (int64_t e = threadIdx.x; e < len * len; e += kThreads) {
      const int64_t a = e / len, b = e - a * len;
      gsm[a * gs + b] = gram[(k0 + a) * k + k0 + b];
    }
    __syncthreads();
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t row = tile * kRowsPerItem + int64_t{rr} * kWarps + warp;
      if (row >= n) break;   // the same for the whole warp
      const float* wr = w + row * k + k0;
      float wv[kPerLane];
      float hi = 0.f, lo = 0.f;
#pragma unroll
      for (int m = 0; m < kPerLane; ++m) {
        const int64_t j = lane + 32 * m;
        wv[m] = j < len ? wr[j] : 0.f;   // zero padding changes no range that holds 0
        hi = wv[m] > hi ? wv[m] : hi;
        lo = wv[m] < lo ? wv[m] : lo;
      }
      hi = group_reduce<32>(hi, MaxOp());
      lo = group_reduce<32>(lo, MinOp());
      double best_err = kInf;
      float best_scale = 0.f, best_ratio = 0.f;
      int32_t best_zero = 0;
      for (int64_t i = 0; i < n_ratio; ++i) {
        const float clip = clips[i];
        float scale;
        int32_t zero;
        grid.params(hi, lo, clip, scale, zero);
        const float st = grid.stored(scale);
        double err = kInf;
        if (isfinite(st)) {   // uniform across the warp: every lane has the same range
          const float z = static_cast<float>(zero);
          float dl[kPerLane];
#pragma unroll
          for (int m = 0; m < kPerLane; ++m) {
            const int64_t j = lane + 32 * m;
            dl[m] = j < len ? __fsub_rn(grid.round(wv[m], st, z), wv[m]) : 0.f;
            if (j < len) dbuf[j] = dl[m];
          }
          __syncwarp();
          double acc = 0.0;
#pragma unroll
          for (int m = 0; m < kPerLane; ++m) {
            const int64_t j = lane + 32 * m;
            if (j < len) {
              double t = 0.0;
              for (int64_t c = 0; c < len; ++c) {
                t += static_cast<double>(gsm[c * gs + j]) * static_cast<double>(dbuf[c]);
              }
              acc += static_cast<double>(dl[m]) * t;
            }
          }
          err = warp_sum(acc);
          if (isnan(err)) err = kInf;
          __syncwarp();   // dbuf is rewritten by the next ratio
        }
        if (i == 0 || err < best_err) {   // strict: equal errors keep the larger ratio
          best_err = err;
          best_scale = st;
          best_zero = zero;
          best_ratio = clip;
        }
      }
      if (lane == 0) {
        const int64_t o = row * g + gi;
        out_scale[o] = best_scale;
        out_zero[o] = best_zero;
        out_ratio[o] = best_ratio;
      }
    }
  }
}

// Longer groups: keeps, per (row, group) of a chunk, the ratio whose float64 dot (from the
// per-group GEMMs) is smallest; overflowing scales count as inf.
__global__ void __launch_bounds__(kThreads)
clip_update_kernel(const double* __restrict__ dots, const float* __restrict__ cand_scale,
                   const int32_t* __restrict__ cand_zero, double* __restrict__ best_err, float* __restrict__ out_scale,
                   int32_t* __restrict__ out_zero, float* __restrict__ out_ratio, int64_t count, float clip,
                   bool first) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    double err = isfinite(cand_scale[i]) ? dots[i] : kInf;
    if (isnan(err)) err = kInf;
    if (first || err < best_err[i]) {
      best_err[i] = err;
      out_scale[i] = cand_scale[i];
      out_zero[i] = cand_zero[i];
      out_ratio[i] = clip;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> awq_clip_search_cuda(const at::Tensor& w_, const at::Tensor& gram_,
                                                                    int64_t bits, int64_t group_size, bool symmetric,
                                                                    int64_t n_grid, double max_shrink,
                                                                    at::ScalarType scale_dtype) {
  constexpr const char* op = "awq_clip_search";
  check_awq_clip_search(op, w_, gram_, bits, group_size, n_grid, max_shrink, scale_dtype);
  check_cuda(op, "w", w_);
  const c10::cuda::CUDAGuard guard(w_.device());
  const at::Tensor w = w_.contiguous(), gram = gram_.contiguous();
  check_finite_w_gram(op, w, gram);
  const int64_t n = w.size(0), k = w.size(1), g = num_groups(k, group_size);
  const auto [scales, zeros, ratios] = awq_clip_outputs(w, g);
  if (n * g == 0) return {scales, zeros, ratios};

  const std::vector<float> clips = awq_clip_ratios(max_shrink, n_grid);
  const int64_t n_ratio = static_cast<int64_t>(clips.size());
  const Grid grid = make_grid(bits, symmetric, scale_dtype);
  const int64_t gs = std::min(group_size, k);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (gs <= kDirectMax) {
    at::Tensor clips_dev = at::empty({n_ratio}, w.options());
    C10_CUDA_CHECK(cudaMemcpyAsync(clips_dev.data_ptr<float>(), clips.data(), sizeof(float) * n_ratio,
                                   cudaMemcpyHostToDevice, stream));
    const size_t smem = sizeof(float) * static_cast<size_t>(gs * gs + kWarps * gs);
    C10_CUDA_CHECK(cudaFuncSetAttribute(clip_direct_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    const int64_t tiles = (n + int64_t{kWarps} * kRowsPerWarp - 1) / (int64_t{kWarps} * kRowsPerWarp);
    clip_direct_kernel<<<grid_for(g * tiles, 1), kThreads, smem, stream>>>(
        w.const_data_ptr<float>(), gram.const_data_ptr<float>(), n, k, gs, g, grid, clips_dev.const_data_ptr<float>(),
        n_ratio, scales.data_ptr<float>(), zeros.data_ptr<int32_t>(), ratios.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // A copy from pageable memory has left `clips` when cudaMemcpyAsync returns; the
    // caching allocator keeps clips_dev's block for this stream's later work only.
    return {scales, zeros, ratios};
  }

  const int64_t chunk = awq_chunk_rows(n, k);
  at::Tensor d = at::empty({chunk, k}, w.options()), e = at::empty({chunk, k}, w.options());
  at::Tensor cand_scale = at::empty({chunk * g}, w.options());
  at::Tensor cand_zero = at::empty({chunk * g}, w.options().dtype(at::kInt));
  at::Tensor dots = at::empty({chunk * g}, w.options().dtype(at::kDouble));
  at::Tensor best_err = at::empty({chunk * g}, w.options().dtype(at::kDouble));
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    for (int64_t i = 0; i < n_ratio; ++i) {
      launch_diff<false>(w.const_data_ptr<float>(), nullptr, d.data_ptr<float>(), r0, rows, n, k, gs, g, grid,
                         clips[i], nullptr, cand_scale.data_ptr<float>(), cand_zero.data_ptr<int32_t>(), stream);
      awq_group_gemms(e, d, gram, rows, gs, g);
      launch_group_dot(e.const_data_ptr<float>(), d.const_data_ptr<float>(), dots.data_ptr<double>(), rows, k, gs, g,
                       stream);
      clip_update_kernel<<<grid_for(rows * g, kThreads), kThreads, 0, stream>>>(
          dots.const_data_ptr<double>(), cand_scale.const_data_ptr<float>(), cand_zero.const_data_ptr<int32_t>(),
          best_err.data_ptr<double>(), scales.data_ptr<float>() + r0 * g, zeros.data_ptr<int32_t>() + r0 * g,
          ratios.data_ptr<float>() + r0 * g, rows * g, clips[i], i == 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {scales, zeros, ratios};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("awq_scale_search", &awq_scale_search_cuda);
  m.impl("awq_clip_search", &awq_clip_search_cuda);
}

}  // namespace lowbit::cuda
