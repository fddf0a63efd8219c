// Dtype dispatch for the kernels: float32, float16 and bfloat16 only. The argument
// checks reject the rest, so double is not compiled for nothing.
#pragma once

#include <ATen/Dispatch.h>

#define LOWBIT_DISPATCH_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
