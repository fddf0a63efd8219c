// Integer grids on CUDA: quant_params, quantize, dequantize. Mirrors csrc/cpu/quant.cpp
// (checks, messages, results); semantics and rounding: python/lowbit/reference/quant.py.
// Every float operation on the way to a scale, a code or a value is an explicit IEEE
// intrinsic: nvcc would otherwise fuse a * b + c into one FMA, rounding once where the
// reference rounds twice.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/grid.cuh"

namespace lowbit::cuda {
namespace {

// Scale and zero of every (row, group) of w [n, k], GT threads per group. Each range
// starts at 0, as on the CPU: lo = min(w, 0), hi = max(w, 0).
template <typename T, int GT>
__global__ void __launch_bounds__(kThreads)
quant_params_kernel(const T* __restrict__ w, float* __restrict__ scales, int32_t* __restrict__ zeros,
                    int64_t n, int64_t k, int64_t g, int64_t group_size, bool symmetric, float clip,
                    float qmax, float maxq, int32_t sym_zero, unsigned long long* bad) {
  constexpr int kPerBlock = kThreads / GT;
  const int lane = threadIdx.x % GT;
  const int64_t items = n * g;
  for (int64_t i = int64_t{blockIdx.x} * kPerBlock + threadIdx.x / GT; i < items;
       i += int64_t{gridDim.x} * kPerBlock) {
    const int64_t row = i / g, k0 = (i - row * g) * group_size;
    const int64_t len = min(k, k0 + group_size) - k0;
    const T* p = w + row * k + k0;
    float hi = 0.f, lo = 0.f;
    bool finite = true;
    for (int64_t j = lane; j < len; j += GT) {
      const float v = to_f32(p[j]);
      hi = v > hi ? v : hi;
      lo = v < lo ? v : lo;
      finite = finite && isfinite(v);
    }
    hi = group_reduce<GT>(hi, MaxOp());
    lo = group_reduce<GT>(lo, MinOp());
    if (!finite) flag_min(bad, row);
    if (lane != 0) continue;
    float scale;
    int32_t zero;
    rtn_params(hi, lo, clip, symmetric, qmax, maxq, sym_zero, scale, zero);
    scales[i] = scale;
    zeros[i] = zero;
  }
}

std::tuple<at::Tensor, at::Tensor> quant_params_cuda(const at::Tensor& w_, int64_t bits,
                                                     int64_t group_size, bool symmetric,
                                                     double clip_ratio) {
  constexpr const char* op = "quant_params";
  check_dim(op, "w", w_, 2);
  check_float(op, "w", w_);
  check_bits(op, bits);
  check_group_size(op, group_size);
  LOWBIT_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, op,
               "argument 'clip_ratio' must be in (0, 1], got ", clip_ratio);
  check_cuda(op, "w", w_);
  const c10::cuda::CUDAGuard guard(w_.device());
  const at::Tensor w = w_.contiguous();
  const int64_t n = w.size(0), k = w.size(1), g = num_groups(k, group_size);
  at::Tensor scales = at::empty({n, g}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({n, g}, w.options().dtype(at::kInt));
  if (n * g == 0) return {scales, zeros};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flags = new_flags(w, 1, stream);
  const float clip = static_cast<float>(clip_ratio);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float maxq = static_cast<float>((1 << bits) - 1);
  const int32_t sym_zero = 1 << (bits - 1);
  const int64_t len = std::min(group_size, k);

  LOWBIT_DISPATCH_FLOATS(w.scalar_type(), "quant_params_cuda", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    // A warp per group up to 1024 columns; a block per longer group (per-channel or
    // per-tensor grids with few groups would leave most SMs idle with one warp each).
    if (len > 1024) {
      quant_params_kernel<scalar_t, kThreads><<<grid_for(n * g, 1), kThreads, 0, stream>>>(
          wp, scales.data_ptr<float>(), zeros.data_ptr<int32_t>(), n, k, g, group_size, symmetric,
          clip, qmax, maxq, sym_zero, flag_ptr(flags));
    } else {
      quant_params_kernel<scalar_t, 32><<<grid_for(n * g, kThreads / 32), kThreads, 0, stream>>>(
          wp, scales.data_ptr<float>(), zeros.data_ptr<int32_t>(), n, k, g, group_size, symmetric,
          clip, qmax, maxq, sym_zero, flag_ptr(flags));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  int64_t bad = -1;
  read_flags(flags, &bad, stream);
  LOWBIT_CHECK(bad < 0, op, "argument 'w' holds NaN or Inf (row ", bad,
               "), which would poison the scales; clean the weight first");
  return {scales, zeros};
}

// The CPU's checked_scales: flags the first scale that is not positive and finite.
__global__ void __launch_bounds__(kThreads)
check_scales_kernel(const float* __restrict__ s, int64_t count, unsigned long long* bad) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = s[i];
    if (!(isfinite(v) && v > 0.f)) flag_min(bad, i);
  }
}

// codes = clamp(rint(w / s) + z, 0, maxq) over the flat [n, k] array, kVec elements per
// thread run; rows holding NaN or Inf are flagged.
template <typename T>
__global__ void __launch_bounds__(kThreads)
quantize_kernel(const T* __restrict__ w, const float* __restrict__ scales,
                const int32_t* __restrict__ zeros, uint8_t* __restrict__ codes, int64_t total,
                int64_t k, int64_t g, int64_t group_size, float maxq, bool aligned,
                unsigned long long* bad) {
  const int64_t runs = (total + kVec - 1) / kVec;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < runs;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = r * kVec;
    T in[kVec];
    uint8_t out[kVec];
    load_run(w, e0, total, aligned, in);
    GroupWalk pos(e0, k, group_size);
    int64_t cur = -1;
    float s = 1.f, z = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out[j] = 0;
      if (e0 + j >= total) continue;
      const int64_t idx = pos.row * g + pos.grp;
      if (idx != cur) {
        cur = idx;
        s = scales[idx];
        z = static_cast<float>(zeros[idx]);
      }
      const float v = to_f32(in[j]);
      out[j] = static_cast<uint8_t>(static_cast<int32_t>(rtn_code(v, s, z, maxq)));
      if (!isfinite(v)) flag_min(bad, pos.row);
      pos.advance(k, group_size);
    }
    store_run(codes, e0, total, aligned, out);
  }
}

at::Tensor quantize_cuda(const at::Tensor& w_, const at::Tensor& scales_, const at::Tensor& zeros_,
                         int64_t bits, int64_t group_size) {
  constexpr const char* op = "quantize";
  check_float(op, "w", w_);
  check_bits(op, bits);
  check_grid(op, "w", w_, scales_, zeros_, group_size);
  check_cuda(op, "w", w_);
  const c10::cuda::CUDAGuard guard(w_.device());
  const at::Tensor w = w_.contiguous();
  const at::Tensor scales = scales_.to(at::kFloat).contiguous();
  const at::Tensor zeros = zeros_.contiguous();
  const int64_t n = w.size(0), k = w.size(1), g = num_groups(k, group_size);
  at::Tensor codes = at::empty({n, k}, w.options().dtype(at::kByte));
  if (n * g == 0) return codes;   // no scales to check, no element to code
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flags = new_flags(w, 2, stream);   // [first bad scale, first bad row of w]
  const float* sp = scales.const_data_ptr<float>();
  check_scales_kernel<<<grid_for(n * g, kThreads), kThreads, 0, stream>>>(sp, n * g, flag_ptr(flags, 0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const float maxq = static_cast<float>((1 << bits) - 1);
  const int64_t total = n * k;

  LOWBIT_DISPATCH_FLOATS(w.scalar_type(), "quantize_cuda", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    uint8_t* cp = codes.data_ptr<uint8_t>();
    const bool aligned = is_aligned(wp, sizeof(Run<scalar_t>)) && is_aligned(cp, sizeof(Run<uint8_t>));
    quantize_kernel<scalar_t><<<grid_for((total + kVec - 1) / kVec, kThreads), kThreads, 0, stream>>>(
        wp, sp, zeros.const_data_ptr<int32_t>(), cp, total, k, g, group_size, maxq, aligned,
        flag_ptr(flags, 1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  int64_t bad[2];
  read_flags(flags, bad, stream);
  // Scales first, as the CPU checks them before it codes anything.
  float bad_scale = 0.f;
  if (bad[0] >= 0) {
    C10_CUDA_CHECK(cudaMemcpyAsync(&bad_scale, sp + bad[0], sizeof(float), cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  LOWBIT_CHECK(bad[0] < 0, op, "argument 'scales' must be positive and finite, got ", bad_scale,
               " at row ", bad[0] / std::max<int64_t>(g, 1), ", group ", bad[0] % std::max<int64_t>(g, 1));
  LOWBIT_CHECK(bad[1] < 0, op, "argument 'w' holds NaN or Inf (row ", bad[1],
               "), which has no code; clean the weight first");
  return codes;
}

// values = (code - z) * s over the flat [n, k] array, rounded once to T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                  const int32_t* __restrict__ zeros, T* __restrict__ out, int64_t total, int64_t k,
                  int64_t g, int64_t group_size, bool aligned) {
  const int64_t runs = (total + kVec - 1) / kVec;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < runs;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = r * kVec;
    uint8_t in[kVec];
    T vals[kVec];
    load_run(codes, e0, total, aligned, in);
    GroupWalk pos(e0, k, group_size);
    int64_t cur = -1;
    float s = 1.f, z = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      vals[j] = T{};
      if (e0 + j >= total) continue;
      const int64_t idx = pos.row * g + pos.grp;
      if (idx != cur) {
        cur = idx;
        s = scales[idx];
        z = static_cast<float>(zeros[idx]);
      }
      vals[j] = from_f32<T>(__fmul_rn(__fsub_rn(static_cast<float>(in[j]), z), s));
      pos.advance(k, group_size);
    }
    store_run(out, e0, total, aligned, vals);
  }
}

at::Tensor dequantize_cuda(const at::Tensor& codes_, const at::Tensor& scales_, const at::Tensor& zeros_,
                           int64_t group_size, at::ScalarType dtype) {
  constexpr const char* op = "dequantize";
  check_dtype(op, "codes", codes_, at::kByte);
  check_float_dtype_arg(op, "dtype", dtype);
  check_grid(op, "codes", codes_, scales_, zeros_, group_size);
  check_cuda(op, "codes", codes_);
  const c10::cuda::CUDAGuard guard(codes_.device());
  const at::Tensor codes = codes_.contiguous();
  const at::Tensor scales = scales_.to(at::kFloat).contiguous();
  const at::Tensor zeros = zeros_.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1), g = num_groups(k, group_size);
  at::Tensor out = at::empty({n, k}, codes.options().dtype(dtype));
  const int64_t total = n * k;
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  LOWBIT_DISPATCH_FLOATS(dtype, "dequantize_cuda", [&] {
    const uint8_t* cp = codes.const_data_ptr<uint8_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const bool aligned = is_aligned(cp, sizeof(Run<uint8_t>)) && is_aligned(outp, sizeof(Run<scalar_t>));
    dequantize_kernel<scalar_t><<<grid_for((total + kVec - 1) / kVec, kThreads), kThreads, 0, stream>>>(
        cp, scales.const_data_ptr<float>(), zeros.const_data_ptr<int32_t>(), outp, total, k, g,
        group_size, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quant_params", &quant_params_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace lowbit::cuda
