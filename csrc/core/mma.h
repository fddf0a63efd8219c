// The tensor-core weight layout ("mma layout") of pack_mma / mma_matmul, and their
// argument checks, shared by the CPU and CUDA kernels. The fake kernels in
// python/lowbit/ops.py make the same checks, in this order, with these words; the
// layout's specification is python/lowbit/reference/mma.py.
//
// Why this layout: an NVIDIA mma.sync m16n8k16 instruction wants, in each lane of a
// warp, the B (weight) operand values at k = 2t, 2t+1, 2t+8, 2t+9 of column g (lane =
// 4 g + t). The packed words put exactly those codes in one lane's word, in the order
// in which a mask-and-OR with a float16/bfloat16 exponent ("magic number") turns them
// into register pairs, so a lane's 16-byte load of one k16 x n64 tile is its whole
// operand for 8 mma instructions with no shuffles and no shared-memory transposes.
//
// packed: int32 [K / 16, N * bits / 2]. Row kb holds K rows 16 kb .. 16 kb + 15; within
// it, unit u (64 columns) takes 32 * bits words, lane l of it `bits` consecutive words:
//     word index = u * 32 * bits + l * bits + w,   l = 4 g + t
//   4-bit: word w (0..3) covers columns 64 u + 16 w + {0, 8} + g; nibble i (bits 4i..4i+3):
//     n = 64 u + 16 w + 8 * ((i >> 1) & 1) + g,   k = 16 kb + 2 t + (i >> 2) + 8 * (i & 1)
//   8-bit: word w (0..7) covers columns 64 u + 8 w + g; byte i:
//     n = 64 u + 8 w + g,   k = 16 kb + 2 t + (i & 1) + 8 * (i >> 1)
// scales, zeros: [G, N] with the columns of each 64-block permuted so that lane g reads
// its 8 columns' values (one per n8 tile c = 0..7, column 64 u + 8 c + g) as 8
// consecutive values: stored position 64 u + 8 g + c holds column 64 u + 8 c + g.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

#include "core/check.h"

namespace lowbit {

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

// Codes of one lane word: 32 / bits values.
LOWBIT_HD int mma_codes_per_word(int bits) { return 32 / bits; }

// (k, n) of code i of packed word `index` in row kb (see the header comment).
LOWBIT_HD void mma_code_position(int bits, int64_t kb, int64_t index, int i, int64_t& k, int64_t& n) {
  const int64_t words_per_unit = int64_t{32} * bits;
  const int64_t u = index / words_per_unit;
  const int64_t r = index - u * words_per_unit;
  const int lane = static_cast<int>(r / bits), w = static_cast<int>(r % bits);
  const int g = lane >> 2, t = lane & 3;
  if (bits == 4) {
    n = 64 * u + 16 * w + 8 * ((i >> 1) & 1) + g;
    k = 16 * kb + 2 * t + (i >> 2) + 8 * (i & 1);
  } else {
    n = 64 * u + 8 * w + g;
    k = 16 * kb + 2 * t + (i & 1) + 8 * (i >> 1);
  }
}

// Stored position of column n in the permuted scales / zeros.
LOWBIT_HD int64_t mma_param_position(int64_t n) {
  const int64_t u = n >> 6, c = (n >> 3) & 7, g = n & 7;
  return (u << 6) + g * 8 + c;
}

struct MmaSizes {
  int64_t m, n, k, g;
};

// Layout limits shared by both ops: 4- or 8-bit codes, K in whole k16 rows, N in whole
// 64-column units, and groups that never cut a k16 row (so one scale per mma operand).
inline void check_mma_shape(const char* op, int64_t bits, int64_t k, int64_t n, int64_t group_size) {
  LOWBIT_CHECK(bits == 4 || bits == 8, op, "the mma layout holds 4- or 8-bit codes, got bits=", bits,
               "; use weight_only_matmul for other widths");
  LOWBIT_CHECK(k % 16 == 0, op, "the mma layout needs K (in_features) divisible by 16, got K=", k,
               "; use weight_only_matmul for this layer");
  LOWBIT_CHECK(n % 64 == 0, op, "the mma layout needs N (out_features) divisible by 64, got N=", n,
               "; use weight_only_matmul for this layer");
  LOWBIT_CHECK(group_size >= k || group_size % 16 == 0, op,
               "the mma layout needs group_size divisible by 16 (or >= K for per-channel), got ",
               group_size);
}

// pack_mma(qweight [K bits / 32, N] int32, scales [G, N] float, zeros [G, N] int32/uint8,
// bits, group_size): K = rows * 32 / bits, exact since K is a multiple of 16. Returns K.
inline int64_t check_pack_mma(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                              int64_t bits, int64_t group_size) {
  constexpr const char* op = "pack_mma";
  check_dtype(op, "qweight", qweight, at::kInt);
  check_dim(op, "qweight", qweight, 2);
  check_float(op, "scales", scales);
  check_dim(op, "scales", scales, 2);
  LOWBIT_CHECK_TYPE(zeros.scalar_type() == at::kInt || zeros.scalar_type() == at::kByte, op,
                    "argument 'zeros' must be torch.int32 or torch.uint8, got ", dtype_name(zeros.scalar_type()));
  check_group_size(op, group_size);
  LOWBIT_CHECK(bits == 4 || bits == 8, op, "the mma layout holds 4- or 8-bit codes, got bits=", bits,
               "; use weight_only_matmul for other widths");
  const int64_t k = qweight.size(0) * 32 / bits, n = qweight.size(1);
  check_mma_shape(op, bits, k, n, group_size);
  check_same_device(op, "scales", scales, "qweight", qweight);
  check_same_device(op, "zeros", zeros, "qweight", qweight);
  const int64_t g = num_groups(k, group_size);
  LOWBIT_CHECK(scales.size(0) == g && scales.size(1) == n, op, "argument 'scales' must have shape [", g, ", ", n,
               "] (groups x out_features for K=", k, ", group_size ", group_size, "), got ", scales.sizes());
  LOWBIT_CHECK(zeros.sizes() == scales.sizes(), op, "argument 'zeros' must have the shape of 'scales' ",
               scales.sizes(), ", got ", zeros.sizes());
  return k;
}

// mma_matmul(x [..., K], packed [K/16, N bits/2] int32, scales [G, N] float (permuted),
// zeros [G, N] uint8 (permuted), bits, group_size, bias [N]?, max_mma_rows).
inline MmaSizes check_mma_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                 const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                 const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "mma_matmul";
  check_float(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_dtype(op, "packed", packed, at::kInt);
  check_dim(op, "packed", packed, 2);
  check_float(op, "scales", scales);
  check_dim(op, "scales", scales, 2);
  check_dtype(op, "zeros", zeros, at::kByte);
  check_group_size(op, group_size);
  LOWBIT_CHECK(bits == 4 || bits == 8, op, "the mma layout holds 4- or 8-bit codes, got bits=", bits);
  check_same_device(op, "packed", packed, "x", x);
  check_same_device(op, "scales", scales, "x", x);
  check_same_device(op, "zeros", zeros, "x", x);
  const int64_t k = x.size(-1);
  LOWBIT_CHECK(packed.size(0) * 16 == k, op, "argument 'packed' must have K/16 = ", k / 16,
               " rows for K=", k, " (the last dim of 'x'), got shape ", packed.sizes());
  LOWBIT_CHECK((packed.size(1) * 2) % bits == 0, op, "argument 'packed' has ", packed.size(1),
               " words per row, not a whole number of columns at bits=", bits);
  const int64_t n = packed.size(1) * 2 / bits;
  check_mma_shape(op, bits, k, n, group_size);
  const int64_t g = num_groups(k, group_size);
  LOWBIT_CHECK(scales.size(0) == g && scales.size(1) == n, op, "argument 'scales' must have shape [", g, ", ", n,
               "] for K=", k, ", N=", n, " and group_size ", group_size, ", got ", scales.sizes());
  LOWBIT_CHECK(zeros.sizes() == scales.sizes(), op, "argument 'zeros' must have the shape of 'scales' ",
               scales.sizes(), ", got ", zeros.sizes());
  if (bias.has_value()) {
    check_float(op, "bias", *bias);
    check_same_device(op, "bias", *bias, "x", x);
    LOWBIT_CHECK(bias->dim() == 1 && bias->size(0) == n, op, "argument 'bias' must have shape [", n, "], got ",
                 bias->sizes());
  }
  return {leading_rows(x), n, k, g};
}

// The scales / zeros of pack_mma: [G, N] -> [G, N] with each 64-column block permuted
// (stored position 64 u + 8 g + c holds column 64 u + 8 c + g), zeros as uint8. Zero
// points outside 0..255 are an error (the kernels hold them in 8 bits).
inline std::pair<at::Tensor, at::Tensor> mma_permute_params(const at::Tensor& scales, const at::Tensor& zeros) {
  const int64_t g = scales.size(0), n = scales.size(1);
  if (zeros.scalar_type() != at::kByte && zeros.numel() > 0) {
    LOWBIT_CHECK(!(zeros.lt(0).logical_or(zeros.gt(255))).any().item<bool>(), "pack_mma",
                 "argument 'zeros' must hold zero points in 0..255 for the mma layout, got values outside it (min ",
                 zeros.min().item<int64_t>(), ", max ", zeros.max().item<int64_t>(), ")");
  }
  auto permute = [&](const at::Tensor& t) {
    // clone, not contiguous(): an empty input would come back as a view of itself.
    return t.reshape({g, n / 64, 8, 8}).transpose(2, 3).clone(at::MemoryFormat::Contiguous).reshape({g, n});
  };
  return {permute(scales), permute(zeros.to(at::kByte))};
}

}  // namespace lowbit
