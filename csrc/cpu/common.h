// Helpers shared by the CPU kernel files: parallel loops that report the first bad row.
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

// max |p[i]| over len elements, and whether all of them are finite.
template <typename T>
inline float absmax(const T* p, int64_t len, bool* finite) {
  float m[kLanes] = {}, poison[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = std::fabs(to_f32(p[k + j]));
      m[j] = v > m[j] ? v : m[j];
      poison[j] += v * 0.f;   // NaN once any element is NaN or Inf
    }
  }
  for (; k < len; ++k) {
    const float v = std::fabs(to_f32(p[k]));
    m[0] = v > m[0] ? v : m[0];
    poison[0] += v * 0.f;
  }
  float r = 0.f, acc = 0.f;
  for (int j = 0; j < kLanes; ++j) {
    r = m[j] > r ? m[j] : r;
    acc += poison[j];
  }
  *finite = acc == 0.f;
  return r;
}

template <typename T>
inline bool all_finite(const T* p, int64_t len) {
  bool finite;
  absmax(p, len, &finite);
  return finite;
}

}  // namespace lowbit::cpu
