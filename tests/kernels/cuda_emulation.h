// Runs CUDA kernel source on the CPU, for tests of a kernel's indexing, edges, tiling and barriers
// on machines without a GPU (CI has none). Include this before a kernel header written for it
// (kernels/cuda/gemm_kernels.cuh): the CUDA keywords become plain C++, each thread of a block is a
// std::thread with its own threadIdx, __syncthreads() is a std::barrier over the block's threads,
// and __shared__ variables are function statics, shared by the block's threads; blocks run one
// after another (the next starts when every thread has finished the last), so statics are never
// shared between blocks that run at once.
// Include it only in a test file of its own: it defines CUDA's names (threadIdx, __shared__, dim3 ...)
// for the whole translation unit. Kernel headers give their kernels internal linkage, so that their
// host copies here never meet the CUDA library's kernels at link time.
// What it checks: that every output is computed from the right inputs, with every thread's view of
// shared memory as the barriers order it (a missing barrier shows as wrong results where threads
// interleave, not reliably); 16-byte shared reads are checked aligned (emu::misaligned counts
// those that are not). What it cannot check: speed,
// warp-level behaviour (shuffles, divergence), memory coalescing, bank conflicts, register limits.
// The real test of a kernel remains its GPU test (tests/kernels/cuda_ops_test.cpp).
#pragma once
#define PIPAR_CUDA_EMULATION 1

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace pipar::test::emu {
// CUDA's dim3, under a name of our own: the test binary may link CUDA code, whose dim3 is another type.
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
}  // namespace pipar::test::emu
using dim3 = ::pipar::test::emu::Dim3;

namespace pipar::test::emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::atomic<int64_t> misaligned{0};  // vector accesses at an address their width does not divide

// Runs kernel<<<grid, block>>>(args...) to completion: block.x * block.y * block.z threads, which
// take the blocks in order, x fastest.
template <class... Params, class... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  std::barrier<> bar(threads);
  block_barrier = &bar;
  block_dim = block, grid_dim = grid;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            block_idx = dim3(bx, by, bz);
            kernel(static_cast<Params>(args)...);
            bar.arrive_and_wait();  // every thread is done with this block's shared memory
          }
    });
  for (std::thread& th : pool) th.join();
  block_barrier = nullptr;
}
}  // namespace pipar::test::emu

#define threadIdx ::pipar::test::emu::thread_idx
#define blockIdx ::pipar::test::emu::block_idx
#define blockDim ::pipar::test::emu::block_dim
#define gridDim ::pipar::test::emu::grid_dim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define PIPAR_EMULATION_CHECK_ALIGNED(p, bytes) \
  (void)(reinterpret_cast<uintptr_t>(p) % (bytes) == 0 || ++::pipar::test::emu::misaligned)
inline void __syncthreads() { ::pipar::test::emu::block_barrier->arrive_and_wait(); }
// Kernels mark loops `#pragma unroll` for nvcc; a test that includes them is compiled with
// -Wno-unknown-pragmas (tests/CMakeLists.txt).
