// The hand-written GEMM's tilings and the host-side choice of tile and K split (gemm.cu), and when a
// convolution lays its samples side by side as GEMM columns (conv2d.cu). Plain C++, no CUDA: the
// kernels that use these constants are in gemm_kernels.cuh; the CPU tests read both
// (tests/kernels/cuda_emulated_test.cpp).
//
// Two tilings, both row-major C[m,n] = alpha * op(A) op(B) + beta * C over a batch in gridDim.z:
//   kSmall  64x64 block tile, 16-deep K slices, 4x4 outputs per thread (strided, so that one 4-byte
//           shared read per operand and step feeds 4 FMAs: bound by shared-memory bandwidth);
//   kLarge  128x128 block tile, 8-deep K slices, 8x8 outputs per thread from 16-byte shared reads
//           (64 FMAs per four 16-byte reads), double-buffered shared tiles: the next slice is read
//           from global memory into registers while the current one is multiplied, one barrier per
//           slice.
// Split-K: where the output has too few tiles to fill the GPU but K is long, K is cut into chunks,
// each block writes its raw partial tile to scratch, and gemm_splitk_reduce sums the partials in a
// fixed order (deterministic, no atomics) and applies alpha and beta.
#pragma once
#include <cstdint>

namespace pipar::kernels::cuda::gemm_detail {

constexpr int64_t gemm_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kThreads = 256;  // both tilings: 16 x 16 threads

// kSmall
constexpr int kSmallTile = 64, kSmallK = 16, kSmallMicro = 4;
static_assert((kSmallTile / kSmallMicro) * (kSmallTile / kSmallMicro) == kThreads, "one output block per thread");
static_assert(kSmallTile * kSmallK == 4 * kThreads, "each thread loads 4 elements of each tile");
// kLarge
constexpr int kLargeTile = 128, kLargeK = 8, kLargeMicro = 8, kLargePad = 4;
static_assert((kLargeTile / kLargeMicro) * (kLargeTile / kLargeMicro) == kThreads, "one output block per thread");
static_assert(kLargeTile * kLargeK == 4 * kThreads, "each thread loads 4 elements of each tile");
static_assert((kLargeTile + kLargePad) % 4 == 0, "rows of the shared tiles stay 16-byte aligned");

#if defined(__CUDACC__) || defined(PIPAR_CUDA_EMULATION)
#define PIPAR_GEMM_HD __host__ __device__
#else
#define PIPAR_GEMM_HD
#endif

// Matrix number i of a batch is (i / inner_count, i % inner_count): A's starts at
// a + outer * a_outer + inner * a_inner (likewise B and C). One level (inner_count 1, inner strides 0)
// is a plain strided batch; two are a convolution's samples by its groups.
struct Batch2 {
  int64_t inner_count;
  int64_t a_outer, a_inner, b_outer, b_inner, c_outer, c_inner;
  PIPAR_GEMM_HD int64_t a(int64_t i) const { return (i / inner_count) * a_outer + (i % inner_count) * a_inner; }
  PIPAR_GEMM_HD int64_t b(int64_t i) const { return (i / inner_count) * b_outer + (i % inner_count) * b_inner; }
  PIPAR_GEMM_HD int64_t c(int64_t i) const { return (i / inner_count) * c_outer + (i % inner_count) * c_inner; }
};

// --- host: which tiling, how many K chunks --------------------------------------------------------

enum class Tiling { kSmall, kLarge };

struct GemmPlan {
  Tiling tiling = Tiling::kSmall;
  int64_t tile = kSmallTile;  // the block tile's edge
  int64_t splits = 1;         // K chunks actually used (1: no split)
  int64_t k_chunk = 0;        // K per chunk, a whole number of slices (the last chunk may be shorter)
};

// Share of the computed tile area that lies inside the m x n output.
inline double tile_efficiency(int64_t m, int64_t n, int64_t tile) {
  return static_cast<double>(m) * static_cast<double>(n) /
         (static_cast<double>(gemm_ceil_div(m, tile) * tile) * static_cast<double>(gemm_ceil_div(n, tile) * tile));
}

// How many K chunks for `blocks` output tiles: enough blocks for about two waves of the
// multiprocessors, each chunk at least kMinChunk of K (shorter chunks cost more in partials than they
// gain), at most kMaxSplits.
constexpr int64_t kMinChunk = 64, kMaxSplits = 64;
inline int64_t split_count(int64_t blocks, int64_t k, int64_t sms) {
  const int64_t want = 2 * sms;
  if (blocks >= want || k <= 0) return 1;
  int64_t s = gemm_ceil_div(want, blocks);
  const int64_t by_k = k / kMinChunk;
  if (s > by_k) s = by_k;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 2 ? 1 : s;
}

// The large tile does about twice the useful work per cycle of the small one where both are full
// (four times the FMAs per shared-memory byte); it is taken where its edge waste leaves it at least
// kLargeAdvantage^-1 of the small tile's efficiency, and the blocks (with K chunks) still fill one
// wave. kLargeAdvantage is an estimate from the instruction mix, to be replaced by the measured
// ratio (bench/cuda_bench.cpp --layer); the results are the same either way.
constexpr double kLargeAdvantage = 1.5;

// Which tilings plan_gemm may take: by shape, or one everywhere (GemmPlanning::kBaseline and kLarge,
// ops_cuda.h: the A/B benchmarks, and the GPU tests of each kernel on every shape).
enum class TilingRule { kByShape, kSmallOnly, kLargeOnly };

// split_ok: the batch leaves room in gridDim.z for K chunks (the launcher's limit).
inline GemmPlan plan_gemm(int64_t m, int64_t n, int64_t k, int64_t batch, int64_t sms, bool split_ok,
                          TilingRule rule = TilingRule::kByShape) {
  GemmPlan p;
  const int64_t small_blocks = gemm_ceil_div(m, kSmallTile) * gemm_ceil_div(n, kSmallTile) * batch;
  const int64_t large_blocks = gemm_ceil_div(m, kLargeTile) * gemm_ceil_div(n, kLargeTile) * batch;
  const int64_t large_splits = split_ok ? split_count(large_blocks, k, sms) : 1;
  const bool by_shape = tile_efficiency(m, n, kLargeTile) * kLargeAdvantage >= tile_efficiency(m, n, kSmallTile) &&
                        large_blocks * large_splits >= sms;
  if (rule == TilingRule::kLargeOnly || (rule == TilingRule::kByShape && by_shape)) {
    p.tiling = Tiling::kLarge, p.tile = kLargeTile, p.splits = large_splits;
  } else {
    p.splits = split_ok ? split_count(small_blocks, k, sms) : 1;
  }
  const int64_t depth = p.tiling == Tiling::kLarge ? kLargeK : kSmallK;
  if (p.splits > 1) {
    // whole K slices per chunk, so that only the last chunk is ragged; then as many chunks as it takes
    p.k_chunk = gemm_ceil_div(gemm_ceil_div(k, depth), p.splits) * depth;
    p.splits = gemm_ceil_div(k, p.k_chunk);
  }
  if (p.splits <= 1) p.splits = 1, p.k_chunk = k;
  return p;
}

// A convolution's forward and backward-input passes are a GEMM per sample with n = oh * ow columns
// (the output positions). Where that leaves more than a tenth of the small tile's columns empty (a
// 4x4 output fills 16 of 64, a 7x7 one 49 of 64), the samples are laid side by side as the columns of
// one GEMM instead (n = samples * oh * ow), for the price of one pass that reorders the output.
inline bool fold_samples_as_columns(int64_t positions, int64_t samples) {
  if (samples < 2 || positions <= 0) return false;
  const double filled = static_cast<double>(positions) / static_cast<double>(gemm_ceil_div(positions, kSmallTile) * kSmallTile);
  return filled < 0.9;
}

}  // namespace pipar::kernels::cuda::gemm_detail
