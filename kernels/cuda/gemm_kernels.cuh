// The hand-written GEMM kernels of gemm.cu (tilings described in gemm_plan.h), in a header that both
// nvcc (gemm.cu) and the host compiler (tests/kernels/cuda_emulated_test.cpp, through
// tests/kernels/cuda_emulation.h, which runs a kernel's threads as CPU threads) can read: so the
// tiling, the edges, the double buffering and the split-K arithmetic are tested on machines without
// a GPU too. Nothing here may include a CUDA header; device builtins come from nvcc or the emulation.
// The kernels have internal linkage (an unnamed namespace): the emulation's host copies in the test
// binary must never be confused with the CUDA library's.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/cuda/gemm_plan.h"

namespace pipar::kernels::cuda::gemm_detail {
namespace {

// --- device ---------------------------------------------------------------------------------------

// r[0..3] = p[0..3], one 16-byte shared-memory read (p 16-byte aligned).
__device__ __forceinline__ void load4(const float* p, float* r) {
#ifdef PIPAR_CUDA_EMULATION
  PIPAR_EMULATION_CHECK_ALIGNED(p, 16);
  r[0] = p[0], r[1] = p[1], r[2] = p[2], r[3] = p[3];
#else
  const float4 v = *reinterpret_cast<const float4*>(p);
  r[0] = v.x, r[1] = v.y, r[2] = v.z, r[3] = v.w;
#endif
}

// Where a block's result goes: C (alpha, beta applied) or, under split-K, its chunk's raw partial.
__device__ __forceinline__ void store_result(float v, int64_t row, int64_t col, int64_t n, float alpha, float beta,
                                             float* c, int64_t ldc, float* out) {
  if (out) {
    out[row * n + col] = v;
    return;
  }
  float* p = c + row * ldc + col;
  *p = beta == 0.0f ? alpha * v : alpha * v + beta * *p;
}

// kSmall. Block (x, y, z) computes a 64x64 tile of matrix batch0 + z / splits. Thread (ty, tx) of the
// 16x16 block owns rows ty + 16i and columns tx + 16j (i, j < 4) of the tile, so shared-memory reads
// broadcast along A and run across banks along B. Tiles are zero-filled past the matrix edges, so
// every shared element read in the K loop was written in the same slice. Split-K (splits > 1): the
// block sums K range [chunk * k_chunk, (chunk + 1) * k_chunk), chunk = z % splits, only, and stores
// its raw sums (no alpha, no beta) at partial[((chunk * batches + batch) * m + row) * n + col].
template <bool TransA, bool TransB>
__global__ void __launch_bounds__(kThreads)
    gemm_small_kernel(int64_t m, int64_t n, int64_t k, float alpha, const float* __restrict__ a, int64_t lda,
                      const float* __restrict__ b, int64_t ldb, float beta, float* c, int64_t ldc, Batch2 bt,
                      int64_t batch0, int splits, int64_t k_chunk, float* partial, int64_t batches) {
  __shared__ float as[kSmallK][kSmallTile + 1];  // as[kk][r] = op(A)[m0 + r, k0 + kk]; +1 against bank conflicts
  __shared__ float bs[kSmallK][kSmallTile + 1];  // bs[kk][j] = op(B)[k0 + kk, n0 + j]
  const int64_t batch = batch0 + blockIdx.z / splits, chunk = blockIdx.z % splits;
  const int64_t k_begin = chunk * k_chunk, k_end = k_begin + k_chunk < k ? k_begin + k_chunk : k;
  a += bt.a(batch);
  b += bt.b(batch);
  c += bt.c(batch);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSmallTile, n0 = static_cast<int64_t>(blockIdx.x) * kSmallTile;
  const int tid = threadIdx.x, tx = tid % (kSmallTile / kSmallMicro), ty = tid / (kSmallTile / kSmallMicro);

  float acc[kSmallMicro][kSmallMicro];
#pragma unroll
  for (int i = 0; i < kSmallMicro; ++i)
#pragma unroll
    for (int j = 0; j < kSmallMicro; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kSmallK) {
    // Load mapping follows the memory layout so that consecutive threads read consecutive addresses.
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = tid + l * kThreads;
      const int r = TransA ? idx % kSmallTile : idx / kSmallK;
      const int kk = TransA ? idx / kSmallTile : idx % kSmallK;
      const int64_t gr = m0 + r, gk = k0 + kk;
      float v = 0.0f;
      if (gr < m && gk < k_end) v = TransA ? a[gk * lda + gr] : a[gr * lda + gk];
      as[kk][r] = v;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = tid + l * kThreads;
      const int j = TransB ? idx / kSmallK : idx % kSmallTile;
      const int kk = TransB ? idx % kSmallK : idx / kSmallTile;
      const int64_t gc = n0 + j, gk = k0 + kk;
      float v = 0.0f;
      if (gc < n && gk < k_end) v = TransB ? b[gc * ldb + gk] : b[gk * ldb + gc];
      bs[kk][j] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSmallK; ++kk) {
      float ra[kSmallMicro], rb[kSmallMicro];
#pragma unroll
      for (int i = 0; i < kSmallMicro; ++i) ra[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kSmallMicro; ++j) rb[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kSmallMicro; ++i)
#pragma unroll
        for (int j = 0; j < kSmallMicro; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
    }
    __syncthreads();  // the next slice overwrites as/bs
  }

  float* out = splits > 1 ? partial + (chunk * batches + batch) * m * n : nullptr;
#pragma unroll
  for (int i = 0; i < kSmallMicro; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < kSmallMicro; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col < n) store_result(acc[i][j], row, col, n, alpha, beta, c, ldc, out);
    }
  }
}

// The shared tiles of kLarge, two of each (double buffering); rows padded by kLargePad floats so that
// the transposing stores of a warp hit 32 different banks and every row starts 16-byte aligned.
struct alignas(16) LargeTiles {
  float a[2][kLargeK][kLargeTile + kLargePad];  // a[buf][kk][r] = op(A)[m0 + r, k0 + kk]
  float b[2][kLargeK][kLargeTile + kLargePad];  // b[buf][kk][j] = op(B)[k0 + kk, n0 + j]
};

// kLarge. Block (x, y, z) computes a 128x128 tile of matrix batch0 + z / splits (split-K as kSmall).
// Thread (ty, tx) of the 16x16 block owns rows 4ty + {0..3} and 64 + 4ty + {0..3} and the columns
// 4tx + {0..3} and 64 + 4tx + {0..3}: per K step it reads two float4 of A and two of B from shared
// memory (A's are broadcast within each half-warp) and does 64 FMAs. Each thread stages 4 elements of
// A's slice and 4 of B's in registers: read from global memory for slice s + 1 before the FMAs of
// slice s, written to the other shared buffer after them, then one barrier.
template <bool TransA, bool TransB>
__global__ void __launch_bounds__(kThreads, 2)
    gemm_large_kernel(int64_t m, int64_t n, int64_t k, float alpha, const float* __restrict__ a, int64_t lda,
                      const float* __restrict__ b, int64_t ldb, float beta, float* c, int64_t ldc, Batch2 bt,
                      int64_t batch0, int splits, int64_t k_chunk, float* partial, int64_t batches) {
  __shared__ LargeTiles sm;
  const int64_t batch = batch0 + blockIdx.z / splits, chunk = blockIdx.z % splits;
  const int64_t k_begin = chunk * k_chunk, k_end = k_begin + k_chunk < k ? k_begin + k_chunk : k;
  a += bt.a(batch);
  b += bt.b(batch);
  c += bt.c(batch);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kLargeTile, n0 = static_cast<int64_t>(blockIdx.x) * kLargeTile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  // This thread's 4 staged elements of each slice: element l of A's is (row a_r + l * a_dr, depth
  // a_k + l * a_dk) of the tile, at a[a_off + l * a_step_l] for the slice a_off points at (likewise
  // B's, column b_j + l * b_dj). The mapping follows the memory layout, so that consecutive threads
  // read consecutive addresses; elements past an edge are not read but zeroed.
  constexpr int a_dr = TransA ? 0 : kThreads / kLargeK, a_dk = TransA ? kThreads / kLargeTile : 0;
  constexpr int b_dj = TransB ? kThreads / kLargeK : 0, b_dk = TransB ? 0 : kThreads / kLargeTile;
  const int a_r = TransA ? tid % kLargeTile : tid / kLargeK, a_k = TransA ? tid / kLargeTile : tid % kLargeK;
  const int b_j = TransB ? tid / kLargeK : tid % kLargeTile, b_k = TransB ? tid % kLargeK : tid / kLargeTile;
  const int64_t a_step_l = (TransA ? a_dk : a_dr) * lda, b_step_l = (TransB ? b_dj : b_dk) * ldb;
  const int64_t a_slice = TransA ? kLargeK * lda : kLargeK, b_slice = TransB ? kLargeK : kLargeK * ldb;
  int64_t a_off = TransA ? (k_begin + a_k) * lda + m0 + a_r : (m0 + a_r) * lda + k_begin + a_k;
  int64_t b_off = TransB ? (n0 + b_j) * ldb + k_begin + b_k : (k_begin + b_k) * ldb + n0 + b_j;
  float sa[4], sb[4];
  auto fetch = [&](int64_t k0) {  // slice k0's elements into sa, sb; the offsets move to the next slice
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const bool a_ok = m0 + a_r + l * a_dr < m && k0 + a_k + l * a_dk < k_end;
      const bool b_ok = n0 + b_j + l * b_dj < n && k0 + b_k + l * b_dk < k_end;
      sa[l] = a_ok ? a[a_off + l * a_step_l] : 0.0f;
      sb[l] = b_ok ? b[b_off + l * b_step_l] : 0.0f;
    }
    a_off += a_slice, b_off += b_slice;
  };
  auto stage = [&](int buf) {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      sm.a[buf][a_k + l * a_dk][a_r + l * a_dr] = sa[l];
      sm.b[buf][b_k + l * b_dk][b_j + l * b_dj] = sb[l];
    }
  };

  float acc[kLargeMicro][kLargeMicro];
#pragma unroll
  for (int i = 0; i < kLargeMicro; ++i)
#pragma unroll
    for (int j = 0; j < kLargeMicro; ++j) acc[i][j] = 0.0f;

  int buf = 0;
  if (k_begin < k_end) {
    fetch(k_begin);
    stage(0);
  }
  __syncthreads();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kLargeK) {
    const bool more = k0 + kLargeK < k_end;  // the same for every thread of the block
    if (more) fetch(k0 + kLargeK);
#pragma unroll
    for (int kk = 0; kk < kLargeK; ++kk) {
      float ra[kLargeMicro], rb[kLargeMicro];
      load4(&sm.a[buf][kk][4 * ty], ra);
      load4(&sm.a[buf][kk][64 + 4 * ty], ra + 4);
      load4(&sm.b[buf][kk][4 * tx], rb);
      load4(&sm.b[buf][kk][64 + 4 * tx], rb + 4);
#pragma unroll
      for (int i = 0; i < kLargeMicro; ++i)
#pragma unroll
        for (int j = 0; j < kLargeMicro; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
    }
    // The other buffer was last read in the previous slice, before the barrier that ended it.
    if (more) stage(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }

  float* out = splits > 1 ? partial + (chunk * batches + batch) * m * n : nullptr;
#pragma unroll
  for (int i = 0; i < kLargeMicro; ++i) {
    const int64_t row = m0 + (i < 4 ? 4 * ty + i : 64 + 4 * ty + i - 4);
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < kLargeMicro; ++j) {
      const int64_t col = n0 + (j < 4 ? 4 * tx + j : 64 + 4 * tx + j - 4);
      if (col < n) store_result(acc[i][j], row, col, n, alpha, beta, c, ldc, out);
    }
  }
}

// C = alpha * (sum over the splits' partials, in chunk order) + beta * C, grid-stride over elements.
__global__ void gemm_splitk_reduce(int64_t m, int64_t n, int64_t batches, int splits, const float* __restrict__ partial,
                                   float alpha, float beta, float* c, int64_t ldc, Batch2 bt) {
  const int64_t total = batches * m * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int sp = 0; sp < splits; ++sp) sum += partial[sp * total + e];
    const int64_t batch = e / (m * n), row = (e / n) % m, col = e % n;
    float* p = c + bt.c(batch) + row * ldc + col;
    *p = beta == 0.0f ? alpha * sum : alpha * sum + beta * *p;
  }
}

}  // namespace
}  // namespace pipar::kernels::cuda::gemm_detail
