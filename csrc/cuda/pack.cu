// Bit packing into int32 words on CUDA. Mirrors csrc/cpu/pack.cpp (checks, messages,
// results); layout: python/lowbit/reference/packing.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "core/check.h"
#include "cuda/common.cuh"

namespace lowbit::cuda {
namespace {

// One thread per output word (wi, j): ORs in the codes of rows r0 .. r1 - 1 of column j,
// a warp reading 32 consecutive columns of a row at a time. Codes >= 2**bits flag their row.
__global__ void __launch_bounds__(kThreads)
pack_int32_kernel(const uint8_t* __restrict__ codes, uint32_t* __restrict__ out, int64_t r, int64_t c,
                  int64_t words, int bits, unsigned long long* bad) {
  const int64_t total = words * c;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t wi = e / c, j = e - wi * c;
    const int64_t r0 = (32 * wi) / bits, r1 = min(r, (32 * wi + 32 + bits - 1) / bits);
    uint32_t word = 0;
    for (int64_t ri = r0; ri < r1; ++ri) {
      const uint32_t q = codes[ri * c + j];
      const int start = static_cast<int>(ri * bits - 32 * wi);   // negative: a code straddling in
      word |= start >= 0 ? q << start : q >> -start;
      if ((q >> bits) != 0) flag_min(bad, ri);   // never for bits = 8: codes are uint8
    }
    out[e] = word;
  }
}

at::Tensor pack_int32_cuda(const at::Tensor& codes_, int64_t bits) {
  constexpr const char* op = "pack_int32";
  check_dtype(op, "codes", codes_, at::kByte);
  check_dim(op, "codes", codes_, 2);
  check_bits(op, bits);
  check_cuda(op, "codes", codes_);
  const c10::cuda::CUDAGuard guard(codes_.device());
  const at::Tensor codes = codes_.contiguous();
  const int64_t r = codes.size(0), c = codes.size(1), words = packed_rows(r, bits);
  at::Tensor out = at::empty({words, c}, codes.options().dtype(at::kInt));
  if (words * c == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flags = new_flags(codes, 1, stream);
  pack_int32_kernel<<<grid_for(words * c, kThreads), kThreads, 0, stream>>>(
      codes.const_data_ptr<uint8_t>(), reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), r, c, words,
      static_cast<int>(bits), flag_ptr(flags));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int64_t bad = -1;
  read_flags(flags, &bad, stream);
  LOWBIT_CHECK(bad < 0, op, "argument 'codes' holds a value >= 2**bits = ", 1 << bits,
               " (row ", bad, "); codes must be unsigned ", bits, "-bit values");
  return out;
}

// One thread per code (ri, j): its bits from word wi, and the next word when it straddles.
__global__ void __launch_bounds__(kThreads)
unpack_int32_kernel(const uint32_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t rows, int64_t c,
                    int bits) {
  const int64_t total = rows * c;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t ri = e / c, j = e - ri * c;
    const int64_t pos = ri * bits, wi = pos / 32;
    const int sh = static_cast<int>(pos % 32);
    uint32_t v = src[wi * c + j] >> sh;
    if (sh + bits > 32) v |= src[(wi + 1) * c + j] << (32 - sh);
    dst[e] = static_cast<uint8_t>(v & mask);
  }
}

at::Tensor unpack_int32_cuda(const at::Tensor& packed_, int64_t bits, int64_t rows) {
  constexpr const char* op = "unpack_int32";
  check_dtype(op, "packed", packed_, at::kInt);
  check_dim(op, "packed", packed_, 2);
  check_bits(op, bits);
  LOWBIT_CHECK(rows >= 0, op, "argument 'rows' must be >= 0, got ", rows);
  LOWBIT_CHECK(packed_.size(0) == packed_rows(rows, bits), op, "argument 'packed' must have ",
               packed_rows(rows, bits), " rows of words for rows=", rows, " and bits=", bits,
               ", got shape ", packed_.sizes());
  check_cuda(op, "packed", packed_);
  const c10::cuda::CUDAGuard guard(packed_.device());
  const at::Tensor packed = packed_.contiguous();
  const int64_t c = packed.size(1);
  at::Tensor out = at::empty({rows, c}, packed.options().dtype(at::kByte));
  if (rows * c == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  unpack_int32_kernel<<<grid_for(rows * c, kThreads), kThreads, 0, stream>>>(
      reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>()), out.data_ptr<uint8_t>(), rows,
      c, static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("pack_int32", &pack_int32_cuda);
  m.impl("unpack_int32", &unpack_int32_cuda);
}

}  // namespace lowbit::cuda
