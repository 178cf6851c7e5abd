// Helpers private to the CPU backend's memory-bound ops: when to use threads, how to split a flat
// range among them, and PIPAR_TARGET_CLONES, which compiles a hot loop for AVX-512, AVX2 and the
// baseline and picks one at load time (x86-64 with glibc only; elsewhere it expands to nothing).
#pragma once
#include <cstdint>

#include "kernels/parallel.h"

#if defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
#define PIPAR_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PIPAR_TARGET_CLONES
#endif

namespace pipar::kernels::cpu::par {

// Below this many elements a memory-bound loop runs on the calling thread: waking a team costs a few
// microseconds, about what one core needs to stream 32K floats.
constexpr int64_t kParallelMinElements = 32 * 1024;

// Threads worth using for `work` element-operations (1 below the threshold).
inline int threads_for(int64_t work) {
  if (work < kParallelMinElements) return 1;
  const int t = kernels::num_threads();
  const int64_t useful = work / (kParallelMinElements / 2);  // at least ~16K elements per thread
  return static_cast<int>(useful < t ? (useful < 1 ? 1 : useful) : t);
}

// Calls f(begin, end) on disjoint chunks covering [0, n), one chunk per thread; chunk bounds are
// multiples of 16 elements (a 64-byte line) so that threads never share a cache line they write.
template <class F>
void parallel_chunks(int64_t n, F&& f) {
  const int t = threads_for(n);
  if (t <= 1) {
    f(int64_t{0}, n);
    return;
  }
  const int64_t chunk = ((n + t - 1) / t + 15) / 16 * 16;
#pragma omp parallel for num_threads(t) schedule(static)
  for (int i = 0; i < t; ++i) {
    const int64_t begin = i * chunk;
    const int64_t end = begin + chunk < n ? begin + chunk : n;
    if (begin < end) f(begin, end);
  }
}

// Calls f(i) for i in [0, count) of independent items of `work_per_item` elements each, threaded
// when the total work pays for it.
template <class F>
void parallel_items(int64_t count, int64_t work_per_item, F&& f) {
  const int t = threads_for(count * work_per_item);
  if (t <= 1 || count <= 1) {
    for (int64_t i = 0; i < count; ++i) f(i);
    return;
  }
#pragma omp parallel for num_threads(t) schedule(static)
  for (int64_t i = 0; i < count; ++i) f(i);
}

}  // namespace pipar::kernels::cpu::par
