// Dtype dispatch for the kernels: float32, float16 and bfloat16 only. The argument
// checks reject the rest, so double is not compiled for nothing.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#define LOWBIT_DISPATCH_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace lowbit {

// Calls fn with a value of the FP8 storage type named by dtype (e4m3fn or e5m2; the
// argument checks have ruled out the rest).
template <typename Fn>
void dispatch_fp8(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::ScalarType::Float8_e4m3fn) {
    fn(c10::Float8_e4m3fn());
  } else {
    fn(c10::Float8_e5m2());
  }
}

}  // namespace lowbit
