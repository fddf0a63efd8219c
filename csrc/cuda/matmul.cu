// Weight-only quantized matmul on CUDA: y = x @ W^T + bias, W [N, K] the dequantized
// weight (q - zero) * scale, read straight from GPTQ-layout qweight (int32
// [ceil(K * bits / 32), N], reference/packing.py); float32 accumulation, one rounding
// to x's dtype at the end. Semantics: python/lowbit/reference/matmul.py.
//
// Two paths:
// * M <= kGemvMaxRows (decode): a GEMV that streams the packed words once. Lane i of a
//   warp owns column n, so a warp's 32 loads of one packed row are 128 consecutive
//   bytes (qweight is N-contiguous): one full cache line per request. The 8 warps of a
//   block split K, and blocks split K further when N alone has too few columns to give
//   every SM several blocks; x is staged in shared memory as float32 once per block.
//   Every weight word is loaded once and used for all M rows.
// * larger M (prefill): dequantize W^T [K, N] into x's dtype, then cuBLAS (tensor
//   cores for float16/bfloat16) with a float32 result, then bias and the cast.
//
// Each weight element is (q - zero) * scale in float32 with one IEEE rounding, the
// value the reference builds, so results differ from it only in summation order (and,
// on the cuBLAS path, in W rounded to x's dtype for float16/bfloat16).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "core/check.h"
#include "core/matmul.h"
#include "cuda/common.cuh"

namespace lowbit::cuda {
namespace {

constexpr int kWarps = kThreads / 32;
// Codes per unit: 32 codes of b bits fill exactly b words, so a unit never splits a code
// and every code's word and shift are compile-time constants once the loop is unrolled
// (3-, 5-, 6- and 7-bit codes that straddle two words included).
constexpr int kUnit = 32;
// Up to this many rows of x the GEMV wins: its work grows with M while the weight
// traffic does not; past it, dequantize + a tensor-core GEMM is faster.
constexpr int64_t kGemvMaxRows = 8;
// x staged per block: at most 32 KiB of shared memory, so 7 blocks fit on an H100 SM
// (228 KiB) and 5 on an A100 (164 KiB) without the opt-in above 48 KiB.
constexpr int kSmemBytes = 32 * 1024;
// Blocks per SM the GEMV grid aims for. At 40 to 96 registers per thread (M = 1 to 8)
// an SM holds 6 down to 2 blocks of 256; 4 blocks' worth of warps, each with a unit of
// loads in flight, keeps enough bytes outstanding to cover DRAM latency, and more
// K-splits would only add partial sums to reduce.
constexpr int kBlocksPerSm = 4;
// K-split blocks give each warp at least this many units, so staging x and the
// cross-warp reduction stay small next to the weight stream.
constexpr int64_t kMinUnitsPerWarp = 2;
// 2**23 as float: the bit pattern 0x4B000000 | q is 2**23 + q exactly for q < 2**23,
// so an integer becomes a float with one OR and one FADD instead of an I2F conversion
// (a quarter-rate instruction on sm_80/sm_90).
constexpr float kMagic = 8388608.f;
constexpr uint32_t kMagicBits = 0x4B000000u;

// Runtime dtype of x, scales, bias and the output: read through one switch each (a
// branch every thread takes alike) instead of templating the kernels on four dtypes.
enum Kind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

int kind_of(at::ScalarType t) {
  return t == at::kHalf ? kF16 : t == at::kBFloat16 ? kBF16 : kF32;
}

__device__ __forceinline__ float load_f(const void* p, int64_t i, int kind) {
  switch (kind) {
    case kF16: return to_f32(static_cast<const c10::Half*>(p)[i]);
    case kBF16: return to_f32(static_cast<const c10::BFloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_f(void* p, int64_t i, float v, int kind) {
  switch (kind) {
    case kF16: static_cast<c10::Half*>(p)[i] = from_f32<c10::Half>(v); break;
    case kBF16: static_cast<c10::BFloat16*>(p)[i] = from_f32<c10::BFloat16>(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Everything the kernels read, passed by value (it lands in the constant bank).
struct Params {
  const void* x;           // [M, K] with strides xs0, xs1
  int64_t xs0, xs1;
  int x_kind;
  const uint32_t* qw;      // [P, N], row stride qs0, columns contiguous
  int64_t qs0;
  const void* scales;      // [N, G], strides ss0, ss1
  int64_t ss0, ss1;
  int s_kind;
  const void* zeros;       // [N, G] int32 or uint8, strides zs0, zs1
  int64_t zs0, zs1;
  bool z_u8;
  const void* bias;        // [N] or nullptr, stride bs0
  int64_t bs0;
  int b_kind;
  int64_t M, N, K, P;
  int64_t gs;              // group size, at most K (so (g + 1) * gs cannot overflow)
  int64_t upw;             // GEMV: units of 32 codes per warp
  void* out;               // GEMV with one K-split: [M, N] of out_kind, bias added
  int out_kind;
  float* partial;          // GEMV with several K-splits: [splits, M, N] float32 sums
};

// Code j (0..31) of a unit held in w[0..BITS-1]; j must be a compile-time constant
// after unrolling, so w stays in registers (indexing a register array at run time would
// move it to local memory).
template <int BITS>
__device__ __forceinline__ uint32_t code_at(const uint32_t (&w)[BITS], int j) {
  const int p = j * BITS, wi = p >> 5, sh = p & 31;
  uint32_t v = w[wi] >> sh;
  if (sh + BITS > 32) v |= w[wi + 1] << (32 - sh);   // straddles into the next word
  return v & ((1u << BITS) - 1u);
}

// Code k of a column read from memory, for the rare code-by-code paths (j known only at
// run time there): the words were just loaded, so these are L1 hits.
template <int BITS>
__device__ __forceinline__ uint32_t code_from(const uint32_t* __restrict__ col, int64_t qs0, int64_t k) {
  const int64_t pos = k * BITS, row = pos >> 5;
  const int sh = static_cast<int>(pos & 31);
  uint32_t v = __ldg(col + row * qs0) >> sh;
  if (sh + BITS > 32) v |= __ldg(col + (row + 1) * qs0) << (32 - sh);
  return v & ((1u << BITS) - 1u);
}

// The BITS words of unit u of one column; words past the last row read as 0 (only the
// last unit of a column whose K is not a multiple of 32 has them, and its codes past K
// are never used).
template <int BITS>
__device__ __forceinline__ void load_unit(const uint32_t* __restrict__ col, int64_t qs0, int64_t p_rows,
                                          int64_t u, uint32_t (&w)[BITS]) {
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
    const int64_t row = u * BITS + i;
    w[i] = row < p_rows ? __ldg(col + row * qs0) : 0u;
  }
}

// The group a thread's column is in: index, first column of the next group, scale and
// zero point.
struct Group {
  int64_t g, next;
  float s, zf;
  float zb;     // kMagic + zero when that is exact (fold), else kMagic
  bool fold;    // |zero| <= 2**23: (2**23 + q) - (2**23 + zero) is q - zero in one FADD
};

__device__ __forceinline__ void load_group(const Params& p, int64_t n, Group& grp) {
  grp.s = load_f(p.scales, n * p.ss0 + grp.g * p.ss1, p.s_kind);
  const int64_t zi = n * p.zs0 + grp.g * p.zs1;
  grp.zf = p.z_u8 ? static_cast<float>(static_cast<const uint8_t*>(p.zeros)[zi])
                  : static_cast<float>(static_cast<const int32_t*>(p.zeros)[zi]);
  // Both sums are integers in [0, 2**24]: exact, so the folded subtraction rounds once,
  // like the reference's q.float() - zero.float().
  grp.fold = fabsf(grp.zf) <= kMagic;
  grp.zb = grp.fold ? __fadd_rn(kMagic, grp.zf) : kMagic;
}

__device__ __forceinline__ void start_group(const Params& p, int64_t n, int64_t k, Group& grp) {
  grp.g = k / p.gs;
  grp.next = (grp.g + 1) * p.gs;
  load_group(p, n, grp);
}

// Moves to the next group when column k starts it. Columns are visited in order and a
// group holds at least one, so one step is always enough.
__device__ __forceinline__ void enter(const Params& p, int64_t n, int64_t k, Group& grp) {
  if (k >= grp.next) {
    ++grp.g;
    grp.next += p.gs;
    load_group(p, n, grp);
  }
}

// Weight element (q - zero) * scale from a code, rounded as the reference rounds it.
template <bool FOLD>
__device__ __forceinline__ float weight_of(uint32_t code, const Group& grp) {
  const float m = __uint_as_float(code | kMagicBits);   // 2**23 + q
  const float d = FOLD ? __fsub_rn(m, grp.zb) : __fsub_rn(__fsub_rn(m, kMagic), grp.zf);
  return __fmul_rn(d, grp.s);
}

// A whole unit inside one group whose zero point folds: 32 weights times MR staged rows
// of x. x comes four
// columns at a time as one 128-bit shared-memory load that the warp shares (every lane
// reads the same address: a broadcast, no bank conflict), so shared-memory bandwidth
// stays below the FMA rate.
template <int BITS, int MR>
__device__ __forceinline__ void unit_fast(const uint32_t (&w)[BITS], const float* __restrict__ xs, int kc,
                                          int off, const Group& grp, float (&acc)[MR]) {
#pragma unroll
  for (int c = 0; c < kUnit; c += 4) {
    float wv[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) wv[e] = weight_of<true>(code_at<BITS>(w, c + e), grp);
#pragma unroll
    for (int r = 0; r < MR; ++r) {
      const float4 xv = *reinterpret_cast<const float4*>(xs + r * kc + off + c);
      acc[r] = __fmaf_rn(wv[0], xv.x, acc[r]);
      acc[r] = __fmaf_rn(wv[1], xv.y, acc[r]);
      acc[r] = __fmaf_rn(wv[2], xv.z, acc[r]);
      acc[r] = __fmaf_rn(wv[3], xv.w, acc[r]);
    }
  }
}

// A unit that a group boundary cuts, the last (short) unit of K, or a group whose zero
// point is beyond +-2**23: code by code, a rolled loop (group sizes that are multiples
// of 32 with real zero points only meet it at the end of K).
template <int BITS, int MR>
__device__ __forceinline__ void unit_slow(const uint32_t* __restrict__ col, const float* __restrict__ xs, int kc,
                                          int off, int count, int64_t k0, const Params& p, int64_t n, Group& grp,
                                          float (&acc)[MR]) {
#pragma unroll 1
  for (int j = 0; j < count; ++j) {
    enter(p, n, k0 + j, grp);
    const float wv = weight_of<false>(code_from<BITS>(col, p.qs0, k0 + j), grp);
#pragma unroll
    for (int r = 0; r < MR; ++r) acc[r] = __fmaf_rn(wv, xs[r * kc + off + j], acc[r]);
  }
}

// GEMV for M <= MR rows. Grid: (ceil(N / 32), splits); block (bx, by) computes columns
// 32 bx .. 32 bx + 31 over units [by * 8 * upw, (by + 1) * 8 * upw) of K, warp w of it
// over upw consecutive units (consecutive, so the group advances incrementally).
template <int BITS, int MR>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const Params p) {
  extern __shared__ float4 smem4[];   // float4: 16-byte alignment for the vector loads
  float* xs = reinterpret_cast<float*>(smem4);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = int64_t{blockIdx.x} * 32 + lane;
  const int64_t units = (p.K + kUnit - 1) / kUnit;
  const int64_t ub0 = int64_t{blockIdx.y} * kWarps * p.upw;
  const int64_t ub1 = min(units, ub0 + kWarps * p.upw);
  const int kc = static_cast<int>(kWarps * p.upw * kUnit);   // row stride of xs
  const int64_t kbase = ub0 * kUnit;

  // Stage x[:, kbase : kbase + kc] as float32, zero past K and in rows >= M: each x
  // element is read from global memory once per block instead of once per warp.
  for (int r = 0; r < MR; ++r) {
    for (int i = threadIdx.x; i < kc; i += kThreads) {
      const int64_t k = kbase + i;
      xs[r * kc + i] = r < p.M && k < p.K ? load_f(p.x, r * p.xs0 + k * p.xs1, p.x_kind) : 0.f;
    }
  }
  __syncthreads();

  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;
  const int64_t ua = min(ub1, ub0 + warp * p.upw), ue = min(ub1, ua + p.upw);
  if (n < p.N && ua < ue) {
    const uint32_t* col = p.qw + n;
    Group grp;
    start_group(p, n, ua * kUnit, grp);
    // Two units of words in registers: the next unit's loads are in flight while this
    // one is decoded, so each thread keeps up to 2 * BITS loads outstanding.
    uint32_t cur[BITS], nxt[BITS];
    load_unit<BITS>(col, p.qs0, p.P, ua, cur);
    for (int64_t u = ua; u < ue; ++u) {
#pragma unroll
      for (int i = 0; i < BITS; ++i) nxt[i] = 0u;
      if (u + 1 < ue) load_unit<BITS>(col, p.qs0, p.P, u + 1, nxt);
      const int64_t k0 = u * kUnit;
      enter(p, n, k0, grp);
      const int off = static_cast<int>(k0 - kbase);
      const int64_t left = p.K - k0;
      if (left >= kUnit && grp.next >= k0 + kUnit && grp.fold) {
        unit_fast<BITS, MR>(cur, xs, kc, off, grp, acc);
      } else {
        unit_slow<BITS, MR>(col, xs, kc, off, static_cast<int>(left < kUnit ? left : kUnit), k0, p, n, grp,
                            acc);
      }
#pragma unroll
      for (int i = 0; i < BITS; ++i) cur[i] = nxt[i];
    }
  }

  // Sum the 8 warps' partial dot products in a fixed order (deterministic), reusing the
  // x buffer once every warp is done reading it: 8 * MR * 32 floats <= MR * kc.
  __syncthreads();
  float* red = xs;
#pragma unroll
  for (int r = 0; r < MR; ++r) red[(warp * MR + r) * 32 + lane] = acc[r];
  __syncthreads();
  if (threadIdx.x < MR * 32) {
    const int r = threadIdx.x >> 5;
    if (r < p.M && n < p.N) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v = __fadd_rn(v, red[(w * MR + r) * 32 + lane]);
      if (p.partial != nullptr) {
        p.partial[(int64_t{blockIdx.y} * p.M + r) * p.N + n] = v;
      } else {
        if (p.bias != nullptr) v = __fadd_rn(v, load_f(p.bias, n * p.bs0, p.b_kind));
        store_f(p.out, r * p.N + n, v, p.out_kind);
      }
    }
  }
}

// out[i] = sum of the `splits` float32 planes of partial at i, plus bias, rounded once
// to the output dtype. splits = 0 (K = 0) gives the bias alone, or zeros.
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const float* __restrict__ partial, int64_t splits, int64_t mn, int64_t n_cols,
                const void* bias, int64_t bs0, int b_kind, void* out, int out_kind) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < mn;
       i += int64_t{gridDim.x} * blockDim.x) {
    float v = 0.f;
    for (int64_t s = 0; s < splits; ++s) v = __fadd_rn(v, partial[s * mn + i]);
    if (bias != nullptr) v = __fadd_rn(v, load_f(bias, (i % n_cols) * bs0, b_kind));
    store_f(out, i, v, out_kind);
  }
}

// W^T [K, N] in T from the packed codes, one thread per (unit, column): the warp's
// loads and its stores of each of the 32 rows are both N-contiguous.
template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads) dequant_t_kernel(const Params p, T* __restrict__ wt) {
  const int64_t units = (p.K + kUnit - 1) / kUnit, items = units * p.N;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < items;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t u = e / p.N, n = e - u * p.N, k0 = u * kUnit;
    uint32_t w[BITS];
    load_unit<BITS>(p.qw + n, p.qs0, p.P, u, w);
    Group grp;
    start_group(p, n, k0, grp);
    T* dst = wt + k0 * p.N + n;
    const int64_t left = p.K - k0;
    if (left >= kUnit && grp.next >= k0 + kUnit) {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) dst[j * p.N] = from_f32<T>(weight_of<false>(code_at<BITS>(w, j), grp));
    } else {
      const int count = static_cast<int>(left < kUnit ? left : kUnit);
#pragma unroll 1
      for (int j = 0; j < count; ++j) {
        enter(p, n, k0 + j, grp);
        dst[j * p.N] = from_f32<T>(weight_of<false>(code_from<BITS>(p.qw + n, p.qs0, k0 + j), grp));
      }
    }
  }
}

// -- launches -------------------------------------------------------------------------

// GEMV launch shape for M rows, N columns and K: false when the GEMV does not take the
// problem (M above kGemvMaxRows, or K too long for gridDim.y).
struct GemvPlan {
  int64_t mr;       // rows the kernel is compiled for: 1, 2, 4 or 8 (>= M)
  int64_t splits;   // blocks along K (gridDim.y)
  int64_t upw;      // units per warp
  int64_t tiles;    // blocks along N (gridDim.x)
  size_t smem;      // bytes of dynamic shared memory: x staged as float32
};

bool plan_gemv(int64_t m, int64_t n, int64_t k, int64_t sms, GemvPlan& plan) {
  if (m > kGemvMaxRows) return false;
  const int64_t units = (k + kUnit - 1) / kUnit;
  plan.mr = m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8;
  plan.tiles = (n + 31) / 32;
  const int64_t upw_max = kSmemBytes / (plan.mr * kWarps * kUnit * int64_t{sizeof(float)});
  // Enough K-splits to give every SM kBlocksPerSm blocks when N alone has too few column
  // tiles, but no fewer than kMinUnitsPerWarp units per warp.
  int64_t splits = (kBlocksPerSm * sms + plan.tiles - 1) / plan.tiles;
  splits = std::max<int64_t>(1, std::min(splits, units / (kWarps * kMinUnitsPerWarp)));
  plan.upw = std::clamp<int64_t>((units + kWarps * splits - 1) / (kWarps * splits), 1, upw_max);
  plan.splits = (units + kWarps * plan.upw - 1) / (kWarps * plan.upw);   // no empty blocks
  plan.smem = static_cast<size_t>(plan.mr * kWarps * plan.upw * kUnit) * sizeof(float);
  // gridDim.y's limit: only K beyond ~16M columns misses it (and takes the other path).
  return plan.splits <= 65535 && plan.tiles <= 0x7FFFFFFF;
}

template <int BITS>
void launch_gemv_bits(const GemvPlan& plan, cudaStream_t stream, const Params& p) {
  const dim3 grid(static_cast<unsigned int>(plan.tiles), static_cast<unsigned int>(plan.splits));
  switch (plan.mr) {
    case 1: gemv_kernel<BITS, 1><<<grid, kThreads, plan.smem, stream>>>(p); break;
    case 2: gemv_kernel<BITS, 2><<<grid, kThreads, plan.smem, stream>>>(p); break;
    case 4: gemv_kernel<BITS, 4><<<grid, kThreads, plan.smem, stream>>>(p); break;
    default: gemv_kernel<BITS, 8><<<grid, kThreads, plan.smem, stream>>>(p); break;
  }
}

void launch_gemv(int64_t bits, const GemvPlan& plan, cudaStream_t stream, const Params& p) {
  switch (bits) {
    case 2: launch_gemv_bits<2>(plan, stream, p); break;
    case 3: launch_gemv_bits<3>(plan, stream, p); break;
    case 4: launch_gemv_bits<4>(plan, stream, p); break;
    case 5: launch_gemv_bits<5>(plan, stream, p); break;
    case 6: launch_gemv_bits<6>(plan, stream, p); break;
    case 7: launch_gemv_bits<7>(plan, stream, p); break;
    default: launch_gemv_bits<8>(plan, stream, p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_dequant_t(int64_t bits, const Params& p, T* wt, cudaStream_t stream) {
  const int64_t items = (p.K + kUnit - 1) / kUnit * p.N;
  const unsigned int blocks = grid_for(items, kThreads);
  switch (bits) {
    case 2: dequant_t_kernel<2, T><<<blocks, kThreads, 0, stream>>>(p, wt); break;
    case 3: dequant_t_kernel<3, T><<<blocks, kThreads, 0, stream>>>(p, wt); break;
    case 4: dequant_t_kernel<4, T><<<blocks, kThreads, 0, stream>>>(p, wt); break;
    case 5: dequant_t_kernel<5, T><<<blocks, kThreads, 0, stream>>>(p, wt); break;
    case 6: dequant_t_kernel<6, T><<<blocks, kThreads, 0, stream>>>(p, wt); break;
    case 7: dequant_t_kernel<7, T><<<blocks, kThreads, 0, stream>>>(p, wt); break;
    default: dequant_t_kernel<8, T><<<blocks, kThreads, 0, stream>>>(p, wt); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_finalize(const float* partial, int64_t splits, const Params& p, void* out, cudaStream_t stream) {
  const int64_t mn = p.M * p.N;
  finalize_kernel<<<grid_for(mn, kThreads), kThreads, 0, stream>>>(partial, splits, mn, p.N, p.bias, p.bs0,
                                                                    p.b_kind, out, p.out_kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// -- the op ---------------------------------------------------------------------------

at::Tensor weight_only_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, int64_t bits, int64_t group_size,
                                   const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "weight_only_matmul";
  const MatmulSizes sz = check_weight_only_matmul(x, qweight, scales, zeros, bits, group_size, bias);
  check_cuda(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t k = sz.k, n = sz.n, m = sz.m;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty({m, n}, x.options());
  if (m * n == 0) return out.view(out_shape);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Columns must be contiguous for the coalesced loads; a column slice of a wider
  // qweight (row stride > N) is fine as it is.
  const at::Tensor qw = qweight.size(1) <= 1 || qweight.stride(1) == 1 ? qweight : qweight.contiguous();
  const at::Tensor x2 = x.reshape({m, k});

  Params p{};
  p.x = x2.const_data_ptr();
  p.xs0 = x2.stride(0);
  p.xs1 = x2.stride(1);
  p.x_kind = kind_of(x.scalar_type());
  p.qw = reinterpret_cast<const uint32_t*>(qw.const_data_ptr<int32_t>());
  p.qs0 = qw.stride(0);
  p.scales = scales.const_data_ptr();
  p.ss0 = scales.stride(0);
  p.ss1 = scales.stride(1);
  p.s_kind = kind_of(scales.scalar_type());
  p.zeros = zeros.const_data_ptr();
  p.zs0 = zeros.stride(0);
  p.zs1 = zeros.stride(1);
  p.z_u8 = zeros.scalar_type() == at::kByte;
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.bs0 = bias.has_value() ? bias->stride(0) : 0;
  p.b_kind = bias.has_value() ? kind_of(bias->scalar_type()) : kF32;
  p.M = m;
  p.N = n;
  p.K = k;
  p.P = qw.size(0);
  p.gs = std::min(group_size, std::max<int64_t>(k, 1));   // same groups; no overflow past K
  p.out = out.data_ptr();
  p.out_kind = kind_of(x.scalar_type());

  if (k == 0) {   // an empty sum: the bias, or zeros
    launch_finalize(nullptr, 0, p, out.data_ptr(), stream);
    return out.view(out_shape);
  }

  GemvPlan plan;
  if (plan_gemv(m, n, k, sm_count(), plan)) {
    p.upw = plan.upw;
    if (plan.splits == 1) {
      launch_gemv(bits, plan, stream, p);
    } else {
      at::Tensor partial = at::empty({plan.splits, m, n}, x.options().dtype(at::kFloat));
      p.partial = partial.data_ptr<float>();
      launch_gemv(bits, plan, stream, p);
      launch_finalize(p.partial, plan.splits, p, out.data_ptr(), stream);
    }
    return out.view(out_shape);
  }

  // Many rows: W^T [K, N] in x's dtype, then cuBLAS with float32 accumulation.
  at::Tensor wt = at::empty({k, n}, x.options());
  LOWBIT_DISPATCH_FLOATS(x.scalar_type(), "weight_only_matmul_cuda", [&] {
    launch_dequant_t<scalar_t>(bits, p, wt.data_ptr<scalar_t>(), stream);
  });
#if LOWBIT_HAS_MM_DTYPE
  // A float32 result even for float16/bfloat16 inputs: the bias is added before the one
  // rounding to x's dtype, as the reference does.
  const at::Tensor y = at::mm(x2, wt, at::kFloat);
#else
  // Older torch: cuBLAS rounds the product to x's dtype (accumulating in float32); the
  // bias then adds a second rounding.
  const at::Tensor y = at::mm(x2, wt).to(at::kFloat);
#endif
  if (!bias.has_value() && x.scalar_type() == at::kFloat) return y.view(out_shape);
  launch_finalize(y.const_data_ptr<float>(), 1, p, out.data_ptr(), stream);
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("weight_only_matmul", &weight_only_matmul_cuda);
}

}  // namespace lowbit::cuda
