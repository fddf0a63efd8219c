// Tensor-core weight-only matmul on the mma layout (csrc/core/mma.h): pack_mma re-lays a
// GPTQ qweight once; mma_matmul computes y = x @ W^T + bias from it. Semantics:
// python/lowbit/reference/mma.py.
//
// mma_matmul has two paths, picked by M (rows of x):
// * the tensor-core kernel (M <= the crossover): W4A16/W8A16 on mma.sync m16n8k16 with
//   float32 accumulation. Decode-sized M is bound by the weight stream, so the kernel is
//   built around keeping DRAM busy: each CTA streams a 64-deep K slice of 256 columns per
//   pipeline stage with cp.async (4 stages in flight), the weights are already in each
//   lane's operand order (one 16-byte shared load per lane per k16 x n64), and split-K
//   gives every SM work even when N alone has too few 256-column tiles.
// * dequantize + cuBLAS (larger M, float32 x, pre-sm_80 GPUs): W [N, K] in x's dtype,
//   then one GEMM; at these M the GEMM's compute dominates the extra pass over W.
//
// Numerics (both paths): W = (q - z) * s with s in x's dtype, rounded once to x's dtype
// (q - z is exact in float16/bfloat16, so one hmul2 rounds exactly like the reference's
// float32 product rounded to x's dtype), float32 accumulation, one rounding at the end.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <atomic>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/mma.h"
#include "cuda/common.cuh"

namespace lowbit::cuda {
namespace {

// -- pack_mma ---------------------------------------------------------------------------

// One thread per output word: its 32 / BITS codes gathered from the GPTQ layout. Runs
// once per layer at load time, so plain index arithmetic is enough.
template <int BITS>
__global__ void __launch_bounds__(kThreads)
    pack_mma_kernel(const uint32_t* __restrict__ qw, int64_t n, uint32_t* __restrict__ out, int64_t rows,
                    int64_t words) {
  const int64_t total = rows * words;
  for (int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t kb = idx / words, w = idx - kb * words;
    uint32_t v = 0;
#pragma unroll
    for (int i = 0; i < 32 / BITS; ++i) {
      int64_t k, c;
      mma_code_position(BITS, kb, w, i, k, c);
      const int64_t bit = k * BITS;
      const uint32_t code = (__ldg(qw + (bit >> 5) * n + c) >> (bit & 31)) & ((1u << BITS) - 1u);
      v |= code << (i * BITS);
    }
    out[idx] = v;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_mma_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                                                             const at::Tensor& zeros, int64_t bits,
                                                             int64_t group_size) {
  const int64_t k = check_pack_mma(qweight, scales, zeros, bits, group_size);
  check_cuda("pack_mma", "qweight", qweight);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const int64_t n = qweight.size(1), rows = k / 16, words = n * bits / 2;
  const at::Tensor qw = qweight.contiguous();
  at::Tensor packed = at::empty({rows, words}, qweight.options());
  if (packed.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const unsigned int grid = grid_for(packed.numel(), kThreads);
    const auto* src = reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>());
    auto* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
    if (bits == 4) {
      pack_mma_kernel<4><<<grid, kThreads, 0, stream>>>(src, n, dst, rows, words);
    } else {
      pack_mma_kernel<8><<<grid, kThreads, 0, stream>>>(src, n, dst, rows, words);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto [s, z] = mma_permute_params(scales, zeros);
  return {packed, s, z};
}

// -- the tensor-core kernel ---------------------------------------------------------------

constexpr int kWarpsN = 4;                   // each owns 64 of the CTA's columns
constexpr int kWarpsK = 2;                   // ... and half of each stage's k16 steps
constexpr int kMmaThreads = 32 * kWarpsN * kWarpsK;
constexpr int kBN = 64 * kWarpsN;            // columns per CTA
constexpr int kBK = 64;                      // K per pipeline stage: 4 k16 steps
constexpr int kStages = 4;                   // cp.async stages in flight per CTA
constexpr int kGroupRows = 4;                // scale rows a stage can touch (group_size >= 16)
// Up to this many rows the tensor-core kernel beats dequantize + cuBLAS: on an H200
// (benchmarks/results/gpu_h200_2026-11-26_issue7.md, forced-path columns) 128 for
// layers of >= 2**25 weights (Llama gate/up/down), where dequantizing W costs the most,
// 64 for smaller ones (q/k/v/o).
int64_t default_max_mma_rows(int64_t n, int64_t k) { return n * k >= (int64_t{1} << 25) ? 128 : 64; }

template <int BITS, int MT>
struct Smem {
  static constexpr int kB = (kBK / 16) * kWarpsN * 32 * BITS * 4;    // packed weights
  static constexpr int kA = MT * 16 * kBK * 2;                       // x tile
  static constexpr int kS = kGroupRows * kBN * 2;                    // scales
  static constexpr int kZ = kGroupRows * kBN;                        // zeros
  static constexpr int kStage = kB + kA + kS + kZ;
  static constexpr int kPipe = kStage * kStages;
  // The two K halves' accumulators meet in shared memory after the main loop.
  static constexpr int kReduce = kWarpsN * MT * 32 * 32 * 4;
  static constexpr int kTotal = (kPipe > kReduce ? kPipe : kReduce) + 16 * kStages;
};

struct MmaParams {
  const void* x;          // [M, K] contiguous, 16-byte aligned, T
  const uint32_t* w;      // packed [K / 16, N * BITS / 2]
  const void* scales;     // [G, N] permuted, T
  const uint8_t* zeros;   // [G, N] permuted
  const float* bias;      // [N] float32 or nullptr
  void* out;              // [M, N] T (one K slice)
  float* partial;         // [splits, M, N] float32 (several K slices)
  int m, n, k, gs, splits;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (each weight byte is used once per CTA);
// src_bytes = 0 writes zeros (rows of x past M, columns past K) without reading.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) {
  return *reinterpret_cast<const T2*>(&v);
}

// (x & MASK) | MAGIC in one LOP3: written as C++, ptxas emits an AND and an OR (a LOP3
// takes one immediate), one instruction per code pair too many.
template <uint32_t MASK, uint32_t MAGIC>
__device__ __forceinline__ uint32_t lop3(uint32_t x) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(x), "n"(MASK), "n"(MAGIC));
  return r;
}

// Halves / bytes of a group's staged scales and zero points for n8 tile c (0..7).
template <typename T2>
__device__ __forceinline__ T2 scale_pair(const uint4& sv, int c) {
  const uint32_t w = c < 2 ? sv.x : c < 4 ? sv.y : c < 6 ? sv.z : sv.w;
  return as_t2<T2>(__byte_perm(w, w, (c & 1) ? 0x3232u : 0x1010u));
}

__device__ __forceinline__ uint32_t zero_byte(const uint2& zv, int c) {
  return ((c < 4 ? zv.x : zv.y) >> (8 * (c & 3))) & 0xFFu;
}

// Per-dtype pieces: the mma instruction and the dequantization of one 4- or 8-bit code
// word into B-operand register pairs. A code ORed into the low mantissa bits under a
// fixed exponent ("magic number") becomes a float16/bfloat16 value with one LOP3 and no
// conversion instruction; at the H100/H200's bandwidth the dequantization, not DRAM, is
// what a decode-sized matmul runs out of, so every instruction per code counts.
template <typename T>
struct Dtype;

template <>
struct Dtype<__half> {
  using T2 = __half2;
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  // Terms of a group: the scale pairs, lo = 1024 + z (subtracted from 1024 + q) and
  // hi = -(64 + z) (added to (1024 + 16 q) / 16), both exact in float16 for z <= 255, so
  // q - z is exact and the scale product rounds once, as the reference's float32 product
  // does. lo is the magic-number trick again (0x64 above the zero byte), hi = 960 - lo.
  __device__ static void terms(const uint4& sv, const uint2& zv, T2 (&sc)[8], T2 (&lo)[8], T2 (&hi)[8],
                               float (&)[8]) {
    const T2 k960 = __float2half2_rn(960.f);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      sc[c] = scale_pair<T2>(sv, c);
      const uint32_t b = c & 3;
      lo[c] = as_t2<T2>(__byte_perm(c < 4 ? zv.x : zv.y, 0x64646464u, 0x4040u | b | (b << 8)));
      hi[c] = __hsub2(k960, lo[c]);
    }
  }
  // A 4-bit word feeds two n8 tiles: nibbles (0, 4) and (1, 5) are tile 0's b0 and b1,
  // (2, 6) and (3, 7) tile 1's. Nibbles 1 and 5 are masked in place (1024 + 16 q) and
  // scaled by 1/16 in the FMA that also subtracts the zero point: one shift per word.
  __device__ static void dq4(uint32_t q, const T2 (&lo)[2], const T2 (&hi)[2], const T2 (&s)[2],
                             uint32_t (&b)[4]) {
    const T2 sixteenth = __float2half2_rn(0.0625f);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t w = j == 0 ? q : q >> 8;
      const uint32_t l = lop3<0x000F000Fu, 0x64006400u>(w);
      const uint32_t h = lop3<0x00F000F0u, 0x64006400u>(w);
      b[2 * j] = as_u32(__hmul2(__hsub2(as_t2<T2>(l), lo[j]), s[j]));
      b[2 * j + 1] = as_u32(__hmul2(__hfma2(as_t2<T2>(h), sixteenth, hi[j]), s[j]));
    }
  }
  // An 8-bit word is one n8 tile: bytes (0, 1) are b0, (2, 3) b1; 0x64 above a byte is
  // 1024 + q.
  __device__ static void dq8(uint32_t q, T2 lo, float, T2 s, uint32_t& b0, uint32_t& b1) {
    b0 = as_u32(__hmul2(__hsub2(as_t2<T2>(__byte_perm(q, 0x64646464u, 0x4140u)), lo), s));
    b1 = as_u32(__hmul2(__hsub2(as_t2<T2>(__byte_perm(q, 0x64646464u, 0x4342u)), lo), s));
  }
  __device__ static T2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};

template <>
struct Dtype<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  // bfloat16's 7 mantissa bits hold a nibble only at the bottom (128 + q), and hold
  // integers exactly only up to 256: the magic and the zero point come off in two exact
  // subtractions (lo = z), and every nibble is shifted down.
  __device__ static void terms(const uint4& sv, const uint2& zv, T2 (&sc)[8], T2 (&lo)[8], T2 (&)[8],
                               float (&zf)[8]) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      sc[c] = scale_pair<T2>(sv, c);
      zf[c] = __uint_as_float(0x4B000000u | zero_byte(zv, c)) - 8388608.f;   // exact: 2**23 + z - 2**23
      lo[c] = __float2bfloat162_rn(zf[c]);
    }
  }
  __device__ static void dq4(uint32_t q, const T2 (&lo)[2], const T2 (&hi)[2], const T2 (&s)[2],
                             uint32_t (&b)[4]) {
    const T2 k128 = __float2bfloat162_rn(128.f);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t v = lop3<0x000F000Fu, 0x43004300u>(q >> (4 * i));
      b[i] = as_u32(__hmul2(__hsub2(__hsub2(as_t2<T2>(v), k128), lo[i >> 1]), s[i >> 1]));
    }
  }
  // An 8-bit code does not fit bfloat16's mantissa: through float32, where q - z is exact,
  // then to bfloat16, exact again (|q - z| <= 255).
  __device__ static void dq8(uint32_t q, T2, float zf, T2 s, uint32_t& b0, uint32_t& b1) {
    const float v0 = static_cast<float>(q & 0xFFu) - zf, v1 = static_cast<float>((q >> 8) & 0xFFu) - zf;
    const float v2 = static_cast<float>((q >> 16) & 0xFFu) - zf, v3 = static_cast<float>(q >> 24) - zf;
    b0 = as_u32(__hmul2(__floats2bfloat162_rn(v0, v1), s));
    b1 = as_u32(__hmul2(__floats2bfloat162_rn(v2, v3), s));
  }
  __device__ static T2 from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// Grid (ceil(N / 256), splits, ceil(M / (16 MT))). CTA (nt, s, mb) computes rows
// 16 MT mb .. + 16 MT of columns 256 nt .. + 256 over its slice of K's 64-deep tiles.
// Warp (wn, wk) owns columns 256 nt + 64 wn .. + 64 (eight n8 tiles) and k16 steps
// 2 wk, 2 wk + 1 of every stage, for all MT m16 tiles; the two wk halves are summed once
// at the end. Eight warps per CTA, each with half a stage of work, keep enough warps
// resident to hide the dequantize -> mma latency that four warps left exposed.
// MINB: CTAs per SM the register allocation must allow (the decode case, MT = 1, is
// latency-bound: 3 CTAs = 24 warps at <= 80 registers, with a few spills, or 2 = 16
// warps without).
template <typename T, int BITS, int MT, int MINB>
__global__ void __launch_bounds__(kMmaThreads, MINB) mma_kernel(const MmaParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using D = Dtype<T>;
  using T2 = typename D::T2;
  using S = Smem<BITS, MT>;
  extern __shared__ uint4 smem[];
  char* const base = reinterpret_cast<char*>(smem);
  int* const stage_g0 = reinterpret_cast<int*>(base + (S::kPipe > S::kReduce ? S::kPipe : S::kReduce));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % kWarpsN, wk = warp / kWarpsN;
  const int nt = blockIdx.x, slice = blockIdx.y, m0 = blockIdx.z * 16 * MT;
  const int units = p.n / 64, unit0 = nt * kWarpsN;
  const int kb_rows = p.k / 16, k_tiles = (p.k + kBK - 1) / kBK;
  const int kt_begin = static_cast<int>(int64_t{k_tiles} * slice / p.splits);
  const int kt_end = static_cast<int>(int64_t{k_tiles} * (slice + 1) / p.splits);
  const int n_kt = kt_end - kt_begin;
  const int64_t words_row = int64_t{p.n} * BITS / 2;
  const int valid_units = min(kWarpsN, units - unit0);
  const bool active = wn < valid_units;

  const T* const x = static_cast<const T*>(p.x);
  const T* const scales = static_cast<const T*>(p.scales);

  // The loader's group: the one holding the next stage's first k, and where the next
  // group starts (one division per CTA, none per stage).
  int lg = kt_begin * kBK / p.gs;
  int lnext = (lg + 1) * p.gs;

  // Copies by warp role. Warps 0..3 each copy one k16 row of packed weights per stage:
  // the CTA's 4 units of a row are one contiguous 512 * BITS / 4 bytes, lane l taking
  // chunks l, l + 32, ..., so each copy is a fixed offset from one per-stage pointer.
  // Warps 4..7 copy the x tile and the scale / zero rows. (Index arithmetic recomputed
  // per copy and per stage cost more instructions than the dequantize + mma it fed: at
  // these bandwidths the kernel is issue-bound, not DRAM-bound.)
  constexpr int kChunksRow = kWarpsN * 8 * BITS;          // 16-byte chunks of one k16 row
  constexpr int kBPerLane = kChunksRow / 32;              // = BITS
  const bool b_warp = warp < kWarpsN;
  const int b_valid = valid_units * (BITS / 4);           // chunks j < b_valid are in N
  const uint32_t* const b_base = p.w + int64_t{unit0} * 32 * BITS + lane * 4;
  const int b_dst = warp * kChunksRow * 16 + lane * 16;
  const int lt = tid - kMmaThreads / 2;                   // 0..127 in warps 4..7
  constexpr int kACopies = MT;                            // MT * 128 chunks over 128 threads
  int64_t a_src[kACopies];
  int a_dst[kACopies], a_col[kACopies];
  bool a_ok[kACopies];
#pragma unroll
  for (int i = 0; i < kACopies; ++i) {
    const int c = i * 128 + lt;
    const int r = c >> 3, ch = c & 7;
    a_ok[i] = !b_warp && m0 + r < p.m;
    a_col[i] = ch * 8;
    a_src[i] = a_ok[i] ? int64_t{m0 + r} * p.k + ch * 8 : 0;
    // chunk ch of row r stored at ch ^ (r & 7): the 8 rows an ldmatrix phase reads land
    // in 8 different bank groups.
    a_dst[i] = (r * 8 + (ch ^ (r & 7))) * 16;
  }

  auto load_stage = [&](int st, int kt) {
    char* sb = base + st * S::kStage;
    if (b_warp) {
      const int kb = kt * (kBK / 16) + warp;
      if (kb < kb_rows) {
        const uint32_t* src = b_base + int64_t{kb} * words_row;
        char* dst = sb + b_dst;
#pragma unroll
        for (int j = 0; j < kBPerLane; ++j) {
          if (j < b_valid) cp_async16(dst + j * 512, src + j * 128, 16);
        }
      }
      return;
    }
    char* sa = sb + S::kB;
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < kACopies; ++i) {
      const bool ok = a_ok[i] && k0 + a_col[i] < p.k;
      cp_async16(sa + a_dst[i], ok ? x + a_src[i] + k0 : x, ok ? 16 : 0);
    }
    const int k1 = min(k0 + kBK, p.k) - 1;
    while (lnext <= k0) {
      ++lg;
      lnext += p.gs;
    }
    int rows = 1;
    for (int e = lnext; e <= k1; e += p.gs) ++rows;
    if (lt == 0) stage_g0[st] = lg;
    // rows x (32 scale + 16 zero chunks), at most 192: lanes of warps 4..7, twice.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = i * 128 + lt;
      const int r = c / 48, j = c - r * 48;
      if (r < rows) {
        const bool is_scale = j < 32;
        const int col = nt * kBN + (is_scale ? j * 8 : (j - 32) * 16);
        if (col < p.n) {
          const int64_t off = int64_t{lg + r} * p.n + col;
          if (is_scale) {
            cp_async16(sa + S::kA + (r * kBN + j * 8) * 2, scales + off, 16);
          } else {
            cp_async16(sa + S::kA + S::kS + r * kBN + (j - 32) * 16, p.zeros + off, 16);
          }
        }
      }
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][c][e] = 0.f;

  // The lane's 8 columns' scale / zero terms for its current group, re-read only when a
  // k16 step enters a new group (tracked without dividing).
  int g = (kt_begin * kBK + 32 * wk) / p.gs;
  int gnext = (g + 1) * p.gs;
  int loaded = -1;
  T2 sc[8], lo[8], hi[8];
  float zf[8];

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_kt) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  for (int i = 0; i < n_kt; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int nxt = i + kStages - 1;
    if (nxt < n_kt) load_stage(nxt % kStages, kt_begin + nxt);
    cp_async_commit();

    const int kt = kt_begin + i;
    const int st = i % kStages;
    const char* sb = base + st * S::kStage;
    const char* sa = sb + S::kB;
    const T* ss = reinterpret_cast<const T*>(sa + S::kA);
    const uint8_t* sz = reinterpret_cast<const uint8_t*>(ss) + S::kS;
    if (active) {
      const int g0 = stage_g0[st];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ks = 2 * wk + h;
        const int kglob = kt * kBK + ks * 16;
        if (kglob < p.k) {
          while (kglob >= gnext) {
            ++g;
            gnext += p.gs;
          }
          if (g != loaded) {
            loaded = g;
            const int off = (g - g0) * kBN + wn * 64 + (lane >> 2) * 8;
            const uint4 sv = *reinterpret_cast<const uint4*>(ss + off);
            const uint2 zv = *reinterpret_cast<const uint2*>(sz + off);
            D::terms(sv, zv, sc, lo, hi, zf);
          }
          uint32_t a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const int r = mt * 16 + (lane & 15), ch = ks * 2 + (lane >> 4);
            ldmatrix_x4(a[mt], sa + (r * 8 + (ch ^ (r & 7))) * 16);
          }
          const uint32_t* wl =
              reinterpret_cast<const uint32_t*>(sb) + (ks * kWarpsN + wn) * 32 * BITS + lane * BITS;
          uint4 qv[BITS / 4];
#pragma unroll
          for (int v = 0; v < BITS / 4; ++v) qv[v] = reinterpret_cast<const uint4*>(wl)[v];
#pragma unroll
          for (int w = 0; w < BITS; ++w) {
            const uint4& q4 = qv[w / 4];
            const uint32_t q = (w & 3) == 0 ? q4.x : (w & 3) == 1 ? q4.y : (w & 3) == 2 ? q4.z : q4.w;
            if constexpr (BITS == 4) {
              uint32_t b[4];
              const T2 l2[2] = {lo[2 * w], lo[2 * w + 1]}, h2[2] = {hi[2 * w], hi[2 * w + 1]};
              const T2 s2[2] = {sc[2 * w], sc[2 * w + 1]};
              D::dq4(q, l2, h2, s2, b);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                D::mma(acc[mt][2 * w], a[mt], b[0], b[1]);
                D::mma(acc[mt][2 * w + 1], a[mt], b[2], b[3]);
              }
            } else {
              uint32_t b0, b1;
              D::dq8(q, lo[w], zf[w], sc[w], b0, b1);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) D::mma(acc[mt][w], a[mt], b0, b1);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();   // the pipeline's shared memory now holds the second half's sums

  // Sum the two K halves: [wn][element][lane], so a warp's 32 stores hit 32 banks.
  float* red = reinterpret_cast<float*>(base);
  if (active && wk == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[((wn * MT + mt) * 32 + c * 4 + e) * 32 + lane] = acc[mt][c][e];
  }
  __syncthreads();
  if (!active || wk == 1) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][c][e] += red[((wn * MT + mt) * 32 + c * 4 + e) * 32 + lane];

  // Accumulator (mt, c) holds rows m0 + 16 mt + g (+ 8) and columns 2t, 2t + 1 of n8
  // tile c: adjacent columns, written as one pair.
  const int gq = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int col = (unit0 + wn) * 64 + c * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + mt * 16 + gq + 8 * h;
        if (row >= p.m) continue;
        float v0 = acc[mt][c][2 * h], v1 = acc[mt][c][2 * h + 1];
        if (p.splits == 1) {
          if (p.bias != nullptr) {
            v0 += p.bias[col];
            v1 += p.bias[col + 1];
          }
          *reinterpret_cast<T2*>(static_cast<T*>(p.out) + int64_t{row} * p.n + col) = D::from_floats(v0, v1);
        } else {
          *reinterpret_cast<float2*>(p.partial + (int64_t{slice} * p.m + row) * p.n + col) = make_float2(v0, v1);
        }
      }
    }
  }
#else
  __trap();   // built for sm_80+ only; the host never launches it on older devices
#endif
}

// Sum of the K slices in a fixed order (deterministic), plus bias, rounded once.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_slices_kernel(const float* __restrict__ partial, int splits, int64_t mn, int64_t n,
                         const float* __restrict__ bias, T* __restrict__ out) {
  using D = Dtype<T>;
  for (int64_t i = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * 2; i < mn;
       i += int64_t{gridDim.x} * blockDim.x * 2) {
    float2 v = *reinterpret_cast<const float2*>(partial + i);
    for (int s = 1; s < splits; ++s) {
      const float2 w = *reinterpret_cast<const float2*>(partial + s * mn + i);
      v.x += w.x;
      v.y += w.y;
    }
    if (bias != nullptr) {
      const int64_t c = i % n;
      v.x += bias[c];
      v.y += bias[c + 1];
    }
    *reinterpret_cast<typename D::T2*>(out + i) = D::from_floats(v.x, v.y);
  }
}

// Tuning knobs for a new GPU, read once: LOWBIT_MMA_CTAS_PER_SM (CTAs per SM the split-K
// grid aims for) and LOWBIT_MMA_MINB (2 or 3, the decode kernel's register budget).
int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::max(0, std::atoi(v)) : 0;
}

int ctas_per_sm_target(int mt) {
  static const int env = env_int("LOWBIT_MMA_CTAS_PER_SM");
  // Measured on an H200 (benchmarks/results/gpu_h200_2026-11-26_issue7.md): 4 for the
  // decode kernel, 3 at M <= 32, 2 above.
  return env > 0 ? env : (mt == 1 ? 4 : mt == 2 ? 3 : 2);
}

int decode_min_blocks() {
  // 2 (no spills, 16 warps per SM) measured faster than 3 (24 warps, spills) on an H200.
  static const int env = env_int("LOWBIT_MMA_MINB");
  return env == 3 ? 3 : 2;
}

template <typename T, int BITS, int MT, int MINB>
void launch_mma(const MmaParams& base_params, int sms, cudaStream_t stream, const at::Tensor& like) {
  using S = Smem<BITS, MT>;
  MmaParams p = base_params;
  const int n_tiles = (p.n + kBN - 1) / kBN;
  const int m_blocks = (p.m + 16 * MT - 1) / (16 * MT);
  const int k_tiles = (p.k + kBK - 1) / kBK;
  // Split K until the grid fills every SM with the resident CTAs its latency hiding
  // needs, keeping at least 3 tiles per slice so each slice's pipeline fills.
  const int ctas = n_tiles * m_blocks, want = ctas_per_sm_target(MT) * sms;
  int splits = std::max(1, (want + ctas - 1) / ctas);
  splits = std::min(splits, std::max(1, k_tiles / 3));
  p.splits = splits;
  at::Tensor partial;
  if (splits > 1) {
    partial = at::empty({splits, p.m, p.n}, like.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  auto kernel = mma_kernel<T, BITS, MT, MINB>;
  // Above 48 KiB of dynamic shared memory needs an opt-in, once per device.
  static std::atomic<uint64_t> opted_in{0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if ((opted_in.load(std::memory_order_relaxed) & bit) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kTotal));
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  const dim3 grid(n_tiles, splits, m_blocks);
  kernel<<<grid, kMmaThreads, S::kTotal, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t mn = int64_t{p.m} * p.n;
    reduce_slices_kernel<T><<<grid_for(mn / 2, kThreads), kThreads, 0, stream>>>(
        p.partial, splits, mn, p.n, p.bias, static_cast<T*>(p.out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int BITS>
void dispatch_mt(const MmaParams& p, int sms, cudaStream_t stream, const at::Tensor& like) {
  if (p.m <= 16) {
    if (decode_min_blocks() == 3) {
      launch_mma<T, BITS, 1, 3>(p, sms, stream, like);
    } else {
      launch_mma<T, BITS, 1, 2>(p, sms, stream, like);
    }
  } else if (p.m <= 32) {
    launch_mma<T, BITS, 2, 2>(p, sms, stream, like);
  } else {
    launch_mma<T, BITS, 4, 1>(p, sms, stream, like);
  }
}

// -- dequantize (for the GEMM path) ----------------------------------------------------------

// W [N, K] in x's dtype (or float32). CTA (u, kq): one 64-column unit, 4 k16 rows; warp r
// dequantizes row 4 kq + r from its lanes' operand words into a shared [64][64] tile, then
// the CTA writes the tile as 64 runs of 128 bytes: W's rows are K-contiguous, and the
// operand order scatters a lane's codes over 8 rows, so writing straight from the
// registers would cost a 2-byte store per code. float16 / bfloat16 reuse the tensor-core
// kernel's dequantization (a k, k + 1 pair per instruction sequence; it is also what
// makes the two paths' W identical).
template <typename T>
struct Cuda;
template <>
struct Cuda<c10::Half> { using type = __half; };
template <>
struct Cuda<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename OutT, int BITS>
__global__ void __launch_bounds__(128)
    dequant_mma_kernel(const uint32_t* __restrict__ w, const OutT* __restrict__ scales,
                       const uint8_t* __restrict__ zeros, int64_t n, int64_t k, int64_t gs,
                       OutT* __restrict__ out) {
  constexpr int kPitch = 64 + 16 / sizeof(OutT);   // padded rows: fewer bank conflicts
  __shared__ __align__(16) OutT tile[64][kPitch];
  const int lane = threadIdx.x & 31, r = threadIdx.x >> 5;
  const int64_t u = blockIdx.x, kb = int64_t{blockIdx.y} * 4 + r;
  const int64_t kbs = k / 16, words = n * BITS / 2;
  if (kb < kbs) {
    const int64_t grp = (kb * 16) / gs;
    const int gq = lane >> 2, t = lane & 3;
    const int64_t pos = grp * n + u * 64 + gq * 8;   // permuted: tile c of the lane at pos + c
    const uint32_t* src = w + kb * words + u * 32 * BITS + lane * BITS;
    if constexpr (std::is_same_v<OutT, float>) {
      float s[8], z[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        s[c] = scales[pos + c];
        z[c] = static_cast<float>(zeros[pos + c]);
      }
#pragma unroll
      for (int wi = 0; wi < BITS; ++wi) {
        const uint32_t v = __ldg(src + wi);
#pragma unroll
        for (int i = 0; i < 32 / BITS; ++i) {
          // The layout of csrc/core/mma.h within one unit and one k16 row; the n8 tile
          // (the index into s / z) is a compile-time constant, so s and z stay in registers.
          const int tc = BITS == 4 ? 2 * wi + ((i >> 1) & 1) : wi;
          const int kk = BITS == 4 ? 2 * t + (i >> 2) + 8 * (i & 1) : 2 * t + (i & 1) + 8 * (i >> 1);
          const float q = static_cast<float>((v >> (i * BITS)) & ((1u << BITS) - 1u));
          tile[tc * 8 + gq][r * 16 + kk] = __fmul_rn(q - z[tc], s[tc]);
        }
      }
    } else {
      using T = typename Cuda<OutT>::type;
      using D = Dtype<T>;
      using T2 = typename D::T2;
      const uint4 sv = *reinterpret_cast<const uint4*>(scales + pos);
      const uint2 zv = *reinterpret_cast<const uint2*>(zeros + pos);
      T2 sc[8], lo[8], hi[8];
      float zf[8];
      D::terms(sv, zv, sc, lo, hi, zf);
      uint32_t q[BITS];
#pragma unroll
      for (int v = 0; v < BITS / 4; ++v) *reinterpret_cast<uint4*>(q + 4 * v) = *reinterpret_cast<const uint4*>(src + 4 * v);
      // Register pair (k, k + 1) of n8 tile c: b0 is k = 2t, b1 is k = 2t + 8.
      auto put = [&](int c, uint32_t b0, uint32_t b1) {
        *reinterpret_cast<uint32_t*>(&tile[c * 8 + gq][r * 16 + 2 * t]) = b0;
        *reinterpret_cast<uint32_t*>(&tile[c * 8 + gq][r * 16 + 2 * t + 8]) = b1;
      };
#pragma unroll
      for (int wi = 0; wi < BITS; ++wi) {
        if constexpr (BITS == 4) {
          uint32_t b[4];
          const T2 l2[2] = {lo[2 * wi], lo[2 * wi + 1]}, h2[2] = {hi[2 * wi], hi[2 * wi + 1]};
          const T2 s2[2] = {sc[2 * wi], sc[2 * wi + 1]};
          D::dq4(q[wi], l2, h2, s2, b);
          put(2 * wi, b[0], b[1]);
          put(2 * wi + 1, b[2], b[3]);
        } else {
          uint32_t b0, b1;
          D::dq8(q[wi], lo[wi], zf[wi], sc[wi], b0, b1);
          put(wi, b0, b1);
        }
      }
    }
  }
  __syncthreads();
  // 64 rows x (up to) 64 k: thread i writes row i / 2, half i % 2 (32 k), in 16-byte runs.
  const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int64_t k0 = int64_t{blockIdx.y} * 64 + half * 32;
  constexpr int per16 = 16 / sizeof(OutT);
#pragma unroll
  for (int j = 0; j < 32 / per16; ++j) {
    const int64_t kk = k0 + j * per16;
    if (kk < k) {
      *reinterpret_cast<uint4*>(out + (u * 64 + row) * k + kk) =
          *reinterpret_cast<const uint4*>(&tile[row][half * 32 + j * per16]);
    }
  }
}

// -- the op ----------------------------------------------------------------------------------

// Compute capability major and SM count, read once per device.
std::pair<int, int> device_info(int dev) {
  static std::array<std::atomic<int>, 64> cache{};   // (major << 16 | sms) + 1, 0 = unread
  const int slot = dev & 63;
  int v = cache[slot].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    v = ((major << 16) | sms) + 1;
    cache[slot].store(v, std::memory_order_relaxed);
  }
  return {(v - 1) >> 16, (v - 1) & 0xFFFF};
}

at::Tensor mma_matmul_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t bits, int64_t group_size,
                           const std::optional<at::Tensor>& bias, int64_t max_mma_rows) {
  constexpr const char* op = "mma_matmul";
  const MmaSizes sz = check_mma_matmul(x, packed, scales, zeros, bits, group_size, bias);
  check_cuda(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(sz.n);
  if (sz.m == 0 || sz.n == 0) return at::empty(out_shape, x.options());
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  if (sz.k == 0) {
    at::Tensor y = at::zeros({sz.m, sz.n}, x.options().dtype(at::kFloat));
    if (bias_f.defined()) y.add_(bias_f);
    return y.to(x.scalar_type()).reshape(out_shape);
  }
  LOWBIT_CHECK(sz.m <= INT32_MAX && sz.n <= INT32_MAX && sz.k <= INT32_MAX, op,
               "sizes beyond 2**31 are not supported, got M=", sz.m, ", N=", sz.n, ", K=", sz.k);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType dt = x.scalar_type();
  const int64_t gs = std::min(group_size, sz.k);   // >= K: one group; keeps k / gs in int

  const auto [major, sms] = device_info(x.get_device());
  const int64_t limit = max_mma_rows < 0 ? default_max_mma_rows(sz.n, sz.k) : max_mma_rows;
  const bool tc = (dt == at::kHalf || dt == at::kBFloat16) && major >= 8 && sz.m <= limit;

  at::Tensor pk = packed.contiguous();
  at::Tensor zs = zeros.contiguous();
  // Scales in x's dtype: the rounding the reference applies (exact for float32 x).
  at::Tensor sc = scales.to(dt).contiguous();
  // Both paths read 16-byte chunks: every base address must be 16-byte aligned (the row
  // strides are, given K % 16 == 0 and N % 64 == 0).
  if (!is_aligned(pk.data_ptr(), 16)) pk = pk.clone();
  if (!is_aligned(sc.data_ptr(), 16)) sc = sc.clone();
  if (!is_aligned(zs.data_ptr(), 16)) zs = zs.clone();
  if (tc) {
    at::Tensor x2 = x.reshape({sz.m, sz.k});
    if (!x2.is_contiguous() || !is_aligned(x2.data_ptr(), 16)) x2 = x2.clone(at::MemoryFormat::Contiguous);
    at::Tensor y = at::empty({sz.m, sz.n}, x.options());
    MmaParams p{};
    p.x = x2.data_ptr();
    p.w = reinterpret_cast<const uint32_t*>(pk.data_ptr<int32_t>());
    p.scales = sc.data_ptr();
    p.zeros = zs.data_ptr<uint8_t>();
    p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
    p.out = y.data_ptr();
    p.partial = nullptr;
    p.m = static_cast<int>(sz.m);
    p.n = static_cast<int>(sz.n);
    p.k = static_cast<int>(sz.k);
    p.gs = static_cast<int>(gs);
    p.splits = 1;
    if (dt == at::kHalf) {
      if (bits == 4) dispatch_mt<__half, 4>(p, sms, stream, x); else dispatch_mt<__half, 8>(p, sms, stream, x);
    } else {
      if (bits == 4) dispatch_mt<__nv_bfloat16, 4>(p, sms, stream, x);
      else dispatch_mt<__nv_bfloat16, 8>(p, sms, stream, x);
    }
    return y.reshape(out_shape);
  }

  // Dequantize W [N, K] once into x's dtype, then one cuBLAS GEMM (float32 accumulation;
  // a bias rides in cuBLASLt's epilogue, rounded to x's dtype first).
  at::Tensor w = at::empty({sz.n, sz.k}, x.options());
  const dim3 grid(static_cast<unsigned int>(sz.n / 64), static_cast<unsigned int>((sz.k / 16 + 3) / 4));
  const auto* wp = reinterpret_cast<const uint32_t*>(pk.data_ptr<int32_t>());
  const uint8_t* zp = zs.data_ptr<uint8_t>();
  auto launch = [&](auto* out_ptr) {
    using OutT = std::remove_pointer_t<decltype(out_ptr)>;
    const auto* sp = reinterpret_cast<const OutT*>(sc.data_ptr());
    if (bits == 4) {
      dequant_mma_kernel<OutT, 4><<<grid, 128, 0, stream>>>(wp, sp, zp, sz.n, sz.k, gs, out_ptr);
    } else {
      dequant_mma_kernel<OutT, 8><<<grid, 128, 0, stream>>>(wp, sp, zp, sz.n, sz.k, gs, out_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (dt == at::kFloat) {
    launch(w.data_ptr<float>());
  } else if (dt == at::kHalf) {
    launch(reinterpret_cast<c10::Half*>(w.data_ptr()));
  } else {
    launch(reinterpret_cast<c10::BFloat16*>(w.data_ptr()));
  }
  const at::Tensor x2 = x.reshape({sz.m, sz.k});
  at::Tensor y = bias_f.defined() ? at::addmm(bias_f.to(dt), x2, w.t()) : at::mm(x2, w.t());
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("pack_mma", &pack_mma_cuda);
  m.impl("mma_matmul", &mma_matmul_cuda);
}

}  // namespace lowbit::cuda
