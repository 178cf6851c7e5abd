// Helpers shared by the CUDA kernels: grid math, the explicit-stream check, and a block-wide sum.
// Device code; include from .cu files only.
#pragma once
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/grid_index.cuh"

namespace pipar::kernels::cuda {

constexpr int kThreads = 256;  // block size of every 1-D and reduction kernel (a multiple of 32)
// Grid-stride kernels cap their grid here: ~500 resident blocks of 256 on an H100, so 65536 blocks
// is far past saturation, and well within gridDim.x's 2^31-1 limit.
constexpr int64_t kMaxBlocks = 65536;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n items (n > 0).
inline unsigned grid_1d(int64_t n, int threads = kThreads) {
  const int64_t b = ceil_div(n, threads);
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

// The op's stream; CUDA ops never run on the default stream (see stream_ref.h).
inline cudaStream_t checked_stream(::pipar::StreamRef s, const char* op) {
  if (s.is_null())
    throw Error(detail::concat(op, ": CUDA ops need an explicit stream (got a null StreamRef)"));
  return native(s);
}

// db[ch] += sum over n samples and `plane` positions of dy[s, ch, :] (conv2d.cu; linear.cu uses it
// with plane = 1). One block per channel, sums in double, one writer per element.
void channel_sum_accumulate(const float* dy, float* db, int64_t n, int64_t k, int64_t plane, cudaStream_t s);

// Sum of v over the block, returned to every thread. Every thread of the block must call it (no
// divergence); blockDim.x must be a multiple of 32 and at most 1024. Safe to call repeatedly.
template <class T>
__device__ T block_reduce_sum(T v) {
  __shared__ T warp_sums[32];
  __shared__ T total;
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();  // readers of the previous call's `total` are done
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const unsigned nwarps = blockDim.x >> 5;
    T w = lane < nwarps ? warp_sums[lane] : T(0);
    for (int off = 16; off > 0; off >>= 1) w += __shfl_down_sync(0xffffffffu, w, off);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// Max of v over the block (same rules as block_reduce_sum). NaN propagates.
__device__ inline float block_reduce_max(float v) {
  __shared__ float warp_max[32];
  __shared__ float total;
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_down_sync(0xffffffffu, v, off);
    v = (o > v || o != o) ? o : v;
  }
  __syncthreads();
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const unsigned nwarps = blockDim.x >> 5;
    float w = lane < nwarps ? warp_max[lane] : -INFINITY;
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_down_sync(0xffffffffu, w, off);
      w = (o > w || o != o) ? o : w;
    }
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

}  // namespace pipar::kernels::cuda
