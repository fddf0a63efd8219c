// Dynamic per-token int8 activation quantization on CUDA. Mirrors
// csrc/cpu/activation.cpp (checks, messages, results); semantics:
// python/lowbit/reference/activation.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

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

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_per_token_int8", &quantize_per_token_int8_cuda);
}

}  // namespace lowbit::cuda
