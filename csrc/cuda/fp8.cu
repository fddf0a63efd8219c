// FP8 (e4m3fn, e5m2) quantize / dequantize on CUDA. Mirrors csrc/cpu/fp8.cpp (checks,
// messages, results); semantics: python/lowbit/reference/fp8.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/library.h>

#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "cuda/common.cuh"

namespace lowbit::cuda {
namespace {

template <typename F8>
__host__ __device__ constexpr float fp8_max() {
  return std::is_same_v<F8, c10::Float8_e4m3fn> ? 448.f : 57344.f;
}

// x / s (an IEEE division, never a multiply by 1 / s), saturated at the format's
// maximum with comparisons that let NaN through, then c10's conversion (round to
// nearest even; the same host/device code the CPU kernel runs).
template <typename F8>
struct Fp8Quant {
  __device__ F8 operator()(float x, float s) const {
    constexpr float fmax = fp8_max<F8>();
    float v = __fdiv_rn(x, s);
    v = v < -fmax ? -fmax : (v > fmax ? fmax : v);
    return F8(v);
  }
};

// Flat x split into rows of row_len elements, scale[row] each: row_len = K for per-row
// scales, row_len = numel for one per-tensor scale.
template <typename T, typename F8>
__global__ void __launch_bounds__(kThreads)
quantize_fp8_kernel(const T* __restrict__ x, const float* __restrict__ scale, F8* __restrict__ out,
                    int64_t total, int64_t row_len, bool aligned) {
  const Fp8Quant<F8> quant;
  const int64_t runs = (total + kVec - 1) / kVec;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < runs;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = r * kVec;
    T in[kVec];
    F8 q[kVec];
    load_run(x, e0, total, aligned, in);
    GroupWalk pos(e0, row_len, row_len);
    int64_t cur = -1;
    float s = 1.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      q[j] = F8(0, F8::from_bits());
      if (e0 + j >= total) continue;
      if (pos.row != cur) {
        cur = pos.row;
        s = scale[cur];
      }
      q[j] = quant(to_f32(in[j]), s);
      pos.advance(row_len, row_len);
    }
    store_run(out, e0, total, aligned, q);
  }
}

template <typename T, typename F8>
void launch_quantize_fp8(const T* x, const float* scale, F8* out, int64_t total, int64_t row_len,
                         cudaStream_t stream) {
  const bool aligned = is_aligned(x, sizeof(Run<T>)) && is_aligned(out, sizeof(Run<F8>));
  quantize_fp8_kernel<T, F8><<<grid_for((total + kVec - 1) / kVec, kThreads), kThreads, 0, stream>>>(
      x, scale, out, total, row_len, aligned);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantize_fp8_cuda(const at::Tensor& x_, const at::Tensor& scale_, at::ScalarType dtype) {
  constexpr const char* op = "quantize_fp8";
  check_float(op, "x", x_);
  check_min_dim(op, "x", x_, 1);
  check_fp8_dtype_arg(op, "dtype", dtype);
  const bool per_row = check_row_scale(op, x_, scale_);
  check_cuda(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor scale = scale_.contiguous();
  const int64_t k = x.size(-1), total = x.numel();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "quantize_fp8_cuda", [&] {
    dispatch_fp8(dtype, [&](auto tag) {
      using F8 = decltype(tag);
      launch_quantize_fp8(x.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(),
                          static_cast<F8*>(out.data_ptr()), total, per_row ? k : total, stream);
    });
  });
  return out;
}

// Per-tensor absmax: block maxima merged with atomicMax on the float bits, which order
// like the values for non-negative floats (NaN never enters the maximum). Rows holding
// NaN or Inf are flagged.
template <typename T>
__global__ void __launch_bounds__(kThreads)
absmax_kernel(const T* __restrict__ x, int64_t total, int64_t k, bool aligned,
              unsigned int* amax_bits, unsigned long long* bad) {
  const int64_t runs = (total + kVec - 1) / kVec;
  float m = 0.f;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < runs;
       r += int64_t{gridDim.x} * blockDim.x) {
    T in[kVec];
    load_run(x, r * kVec, total, aligned, in);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float v = fabsf(to_f32(in[j]));   // the zero padding changes nothing
      m = v > m ? v : m;
      if (!isfinite(v)) flag_min(bad, (r * kVec + j) / k);
    }
  }
  m = group_reduce<kThreads>(m, MaxOp());
  if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(m));
}

__global__ void tensor_scale_kernel(const unsigned int* amax_bits, float fmax, float* scale) {
  const float s = __fdiv_rn(__uint_as_float(*amax_bits), fmax);
  *scale = s == 0.f ? 1.f : s;
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_dynamic_cuda(const at::Tensor& x_, at::ScalarType dtype,
                                                             bool per_row) {
  constexpr const char* op = "quantize_fp8_dynamic";
  check_float(op, "x", x_);
  check_min_dim(op, "x", x_, 1);
  check_fp8_dtype_arg(op, "dtype", dtype);
  check_cuda(op, "x", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const int64_t k = x.size(-1), rows = leading_rows(x), total = x.numel();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  at::Tensor scale = per_row ? at::empty(row_scale_shape(x), x.options().dtype(at::kFloat))
                             : at::empty({}, x.options().dtype(at::kFloat));
  if (per_row && rows == 0) return {out, scale};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flags = new_flags(x, 1, stream);
  at::Tensor amax;   // per-tensor only: float bits of the absmax, from +0
  if (!per_row) {
    amax = at::empty({1}, x.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(amax.data_ptr(), 0, sizeof(int32_t), stream));
  }
  float* sp = scale.data_ptr<float>();

  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "quantize_fp8_dynamic_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_fp8(dtype, [&](auto tag) {
      using F8 = decltype(tag);
      F8* outp = static_cast<F8*>(out.data_ptr());
      if (per_row) {
        // Fused: each row is read once from memory for its absmax, again from cache to code it.
        launch_row_absmax_quant(xp, outp, sp, rows, k, fp8_max<F8>(), flag_ptr(flags), Fp8Quant<F8>(),
                                stream);
        return;
      }
      unsigned int* amax_bits = reinterpret_cast<unsigned int*>(amax.data_ptr<int32_t>());
      if (total > 0) {
        const bool aligned = is_aligned(xp, sizeof(Run<scalar_t>));
        absmax_kernel<scalar_t><<<grid_for((total + kVec - 1) / kVec, kThreads), kThreads, 0, stream>>>(
            xp, total, k, aligned, amax_bits, flag_ptr(flags));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      tensor_scale_kernel<<<1, 1, 0, stream>>>(amax_bits, fp8_max<F8>(), sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (total > 0) launch_quantize_fp8(xp, sp, outp, total, total, stream);
    });
  });
  int64_t bad = -1;
  read_flags(flags, &bad, stream);
  LOWBIT_CHECK(bad < 0, op, "argument 'x' holds NaN or Inf (row ", bad,
               "), which would poison the dynamic scale");
  return {out, scale};
}

// q * s, rounded once to T. fp8 -> float through c10's exact conversion, the one the
// CPU kernel tabulates.
template <typename F8, typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_fp8_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale, T* __restrict__ out,
                      int64_t total, int64_t row_len, bool aligned) {
  const int64_t runs = (total + kVec - 1) / kVec;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < runs;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e0 = r * kVec;
    uint8_t in[kVec];
    T vals[kVec];
    load_run(q, e0, total, aligned, in);
    GroupWalk pos(e0, row_len, row_len);
    int64_t cur = -1;
    float s = 1.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      vals[j] = T{};
      if (e0 + j >= total) continue;
      if (pos.row != cur) {
        cur = pos.row;
        s = scale[cur];
      }
      const float v = static_cast<float>(F8(in[j], F8::from_bits()));
      vals[j] = from_f32<T>(__fmul_rn(v, s));
      pos.advance(row_len, row_len);
    }
    store_run(out, e0, total, aligned, vals);
  }
}

at::Tensor dequantize_fp8_cuda(const at::Tensor& q_, const at::Tensor& scale_, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_fp8";
  LOWBIT_CHECK_TYPE(is_fp8_dtype(q_.scalar_type()), op,
                    "argument 'q' must be torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype_name(q_.scalar_type()));
  check_min_dim(op, "q", q_, 1);
  check_float_dtype_arg(op, "dtype", dtype);
  const bool per_row = check_row_scale(op, q_, scale_);
  check_cuda(op, "q", q_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous();
  const at::Tensor scale = scale_.contiguous();
  const int64_t k = q.size(-1), total = q.numel();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* qp = static_cast<const uint8_t*>(q.const_data_ptr());
  LOWBIT_DISPATCH_FLOATS(dtype, "dequantize_fp8_cuda", [&] {
    scalar_t* outp = out.data_ptr<scalar_t>();
    const bool aligned = is_aligned(qp, sizeof(Run<uint8_t>)) && is_aligned(outp, sizeof(Run<scalar_t>));
    dispatch_fp8(q.scalar_type(), [&](auto tag) {
      using F8 = decltype(tag);
      dequantize_fp8_kernel<F8, scalar_t><<<grid_for((total + kVec - 1) / kVec, kThreads), kThreads, 0, stream>>>(
          qp, scale.const_data_ptr<float>(), outp, total, per_row ? k : total, aligned);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_fp8", &quantize_fp8_cuda);
  m.impl("quantize_fp8_dynamic", &quantize_fp8_dynamic_cuda);
  m.impl("dequantize_fp8", &dequantize_fp8_cuda);
}

}  // namespace lowbit::cuda
