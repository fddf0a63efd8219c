// Helpers shared by the CPU kernel files: parallel loops that report the first bad row,
// and blocked float32 reductions.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cpu/convert.h"

namespace lowbit::cpu {

// Smallest index some worker flagged, or -1: errors name the first offending row
// whatever the thread schedule.
struct FirstBad {
  std::atomic<int64_t> idx{INT64_MAX};
  void flag(int64_t i) {
    int64_t cur = idx.load(std::memory_order_relaxed);
    while (i < cur && !idx.compare_exchange_weak(cur, i, std::memory_order_relaxed)) {
    }
  }
  int64_t get() const {
    const int64_t v = idx.load();
    return v == INT64_MAX ? -1 : v;
  }
};

// Grain (items per task) so that a task touches about 64K elements: smaller tasks cost
// more in scheduling than they gain on a few cores.
inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(elems_per_item, 1));
}

// Reductions keep kLanes independent partial results: without -ffast-math GCC will not
// reorder a float reduction, but it vectorises lane-wise max/min/add. Max and min are
// exact in any order, so results stay bit-identical to the reference's.
constexpr int kLanes = 16;

// Running min(x, 0), max(x, 0) and a finiteness check over float32 data.
struct RangeAcc {
  float lo[kLanes] = {}, hi[kLanes] = {}, poison[kLanes] = {};

  void add(const float* __restrict__ f, int64_t n) {
    // Locals, not members: GCC keeps them in registers only if nothing may alias them.
    float h[kLanes], l[kLanes], p[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      h[j] = hi[j];
      l[j] = lo[j];
      p[j] = poison[j];
    }
    int64_t k = 0;
#ifdef LOWBIT_X86_SIMD
    // GCC does not vectorise `v > m ? v : m` reductions without -ffinite-math-only;
    // vmaxps(v, m) is that expression exactly (NaN and signed zeros included).
    static_assert(kLanes == 16, "two 8-lane registers per accumulator");
    __m256 h0 = _mm256_loadu_ps(h), h1 = _mm256_loadu_ps(h + 8);
    __m256 l0 = _mm256_loadu_ps(l), l1 = _mm256_loadu_ps(l + 8);
    __m256 p0 = _mm256_loadu_ps(p), p1 = _mm256_loadu_ps(p + 8);
    const __m256 zero = _mm256_setzero_ps();
    for (; k + kLanes <= n; k += kLanes) {
      const __m256 v0 = _mm256_loadu_ps(f + k), v1 = _mm256_loadu_ps(f + k + 8);
      h0 = _mm256_max_ps(v0, h0);
      h1 = _mm256_max_ps(v1, h1);
      l0 = _mm256_min_ps(v0, l0);
      l1 = _mm256_min_ps(v1, l1);
      p0 = _mm256_add_ps(p0, _mm256_mul_ps(v0, zero));
      p1 = _mm256_add_ps(p1, _mm256_mul_ps(v1, zero));
    }
    _mm256_storeu_ps(h, h0);
    _mm256_storeu_ps(h + 8, h1);
    _mm256_storeu_ps(l, l0);
    _mm256_storeu_ps(l + 8, l1);
    _mm256_storeu_ps(p, p0);
    _mm256_storeu_ps(p + 8, p1);
#else
    for (; k + kLanes <= n; k += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float v = f[k + j];
        h[j] = v > h[j] ? v : h[j];
        l[j] = v < l[j] ? v : l[j];
        p[j] += v * 0.f;   // NaN once any element is NaN or Inf
      }
    }
#endif
    for (; k < n; ++k) {
      const float v = f[k];
      h[0] = v > h[0] ? v : h[0];
      l[0] = v < l[0] ? v : l[0];
      p[0] += v * 0.f;
    }
    for (int j = 0; j < kLanes; ++j) {
      hi[j] = h[j];
      lo[j] = l[j];
      poison[j] = p[j];
    }
  }
  template <typename T>
  void add(const T* p, int64_t n) {
    float buf[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      add(as_f32(p + b, buf, m), m);
    }
  }
  void merge(const RangeAcc& o) {
    for (int j = 0; j < kLanes; ++j) {
      hi[j] = o.hi[j] > hi[j] ? o.hi[j] : hi[j];
      lo[j] = o.lo[j] < lo[j] ? o.lo[j] : lo[j];
      poison[j] += o.poison[j];
    }
  }
  float max() const {
    float r = 0.f;
    for (int j = 0; j < kLanes; ++j) r = hi[j] > r ? hi[j] : r;
    return r;
  }
  float min() const {
    float r = 0.f;
    for (int j = 0; j < kLanes; ++j) r = lo[j] < r ? lo[j] : r;
    return r;
  }
  float absmax() const {
    const float a = max(), b = -min();
    return a > b ? a : b;
  }
  bool finite() const {
    float acc = 0.f;
    for (int j = 0; j < kLanes; ++j) acc += poison[j];
    return acc == 0.f;
  }
};

// Parallel work over a grid of groups [N, G] along K: each group is cut into tiles of
// at most kTile columns, so a few huge groups (per-tensor: one group of N * K) still
// spread across threads. Item i is tile i % tiles of group i / tiles.
struct GroupTiles {
  static constexpr int64_t kTile = 16384;
  int64_t k, g, group_size, tiles;
  GroupTiles(int64_t k_, int64_t group_size_)
      : k(k_), g(num_groups(k_, group_size_)), group_size(group_size_),
        tiles((std::min(group_size_, std::max<int64_t>(k_, 1)) + kTile - 1) / kTile) {}
  int64_t items(int64_t n) const { return n * g * tiles; }
  int64_t grain() const { return grain_for(std::min({group_size, k, kTile})); }
  // Group (row * g + group) of item i, and the columns [k0, k0 + len) it covers (len may
  // be <= 0 for a tile past the end of a ragged last group).
  int64_t group(int64_t i) const { return i / tiles; }
  int64_t begin(int64_t i) const { return (group(i) % g) * group_size + (i % tiles) * kTile; }
  int64_t length(int64_t i) const {
    const int64_t k0 = begin(i);
    const int64_t group_end = std::min(k, (group(i) % g + 1) * group_size);
    return std::min(group_end, k0 + kTile) - k0;
  }
};


}  // namespace lowbit::cpu
