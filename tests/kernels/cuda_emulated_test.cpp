// The hand-written CUDA GEMM kernels (kernels/cuda/gemm_kernels.cuh) run on the CPU through the kernel
// emulation (cuda_emulation.h): both tilings, every transpose, split-K and its reduction, two-level
// batches, padded leading dimensions and ragged edges, against a double reference. Runs everywhere
// (no GPU needed); the same kernels' GPU tests are OpsCuda.Gemm* in cuda_ops_test.cpp.
// Inputs are small integers (products and sums exact in float32, so results must match exactly) or
// uniform floats (tolerance 1e-5 relative to the largest reference entry: K <= 300 terms of size 1).
#include "tests/kernels/cuda_emulation.h"
// (the emulation must come first)
#include "kernels/cuda/gemm_kernels.cuh"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "tests/random.h"

namespace pipar {
namespace {

using kernels::cuda::gemm_detail::Batch2;
using kernels::cuda::gemm_detail::GemmPlan;
using kernels::cuda::gemm_detail::Tiling;
namespace gd = kernels::cuda::gemm_detail;
using test::Rng;
using test::seed_trace;

struct Problem {
  bool ta = false, tb = false;
  int64_t m = 1, n = 1, k = 1;
  int64_t outer = 1, inner = 1;  // batch = outer x inner matrices
};

std::string describe(const Problem& p, const GemmPlan& plan) {
  return std::string("ta=") + (p.ta ? "1" : "0") + " tb=" + (p.tb ? "1" : "0") + " m=" + std::to_string(p.m) +
         " n=" + std::to_string(p.n) + " k=" + std::to_string(p.k) + " batch=" + std::to_string(p.outer) + "x" +
         std::to_string(p.inner) + (plan.tiling == Tiling::kLarge ? " large" : " small") +
         " splits=" + std::to_string(plan.splits) + " k_chunk=" + std::to_string(plan.k_chunk);
}

using KernelFn = void (*)(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*,
                          int64_t, Batch2, int64_t, int, int64_t, float*, int64_t);

template <bool TA, bool TB>
KernelFn kernel_for(Tiling t) {
  return t == Tiling::kLarge ? &gd::gemm_large_kernel<TA, TB> : &gd::gemm_small_kernel<TA, TB>;
}
KernelFn kernel_for(bool ta, bool tb, Tiling t) {
  if (ta && tb) return kernel_for<true, true>(t);
  if (ta) return kernel_for<true, false>(t);
  if (tb) return kernel_for<false, true>(t);
  return kernel_for<false, false>(t);
}

// One GEMM batch laid out as gemm.cu's gemm_batched_2d sees it: matrix (o, i) of A at
// o * a_outer + i * a_inner, with leading dimensions padded past the matrix.
struct Operands {
  int64_t lda, ldb, ldc;
  Batch2 bt;
  std::vector<float> a, b, c;
};

Operands make_operands(const Problem& p, bool integers, Rng& rng) {
  Operands o;
  o.lda = (p.ta ? p.m : p.k) + 3, o.ldb = (p.tb ? p.k : p.n) + 1, o.ldc = p.n + 2;
  const int64_t a_size = (p.ta ? p.k : p.m) * o.lda, b_size = (p.tb ? p.n : p.k) * o.ldb, c_size = p.m * o.ldc;
  // inner matrices side by side, then outer blocks, with a gap between blocks
  o.bt = Batch2{p.inner, p.inner * a_size + 5, a_size, p.inner * b_size + 7, b_size, p.inner * c_size + 3, c_size};
  const int64_t batch = p.outer * p.inner;
  auto gen = [&](int64_t count) { return integers ? rng.small_int_vec(count) : rng.uniform_vec(count); };
  o.a = gen(o.bt.a(batch - 1) + a_size);
  o.b = gen(o.bt.b(batch - 1) + b_size);
  o.c = gen(o.bt.c(batch - 1) + c_size);
  return o;
}

// C as the GEMM must leave it (entries outside the matrices untouched), in double.
std::vector<double> reference(const Problem& p, const Operands& o, float alpha, float beta) {
  std::vector<double> out(o.c.begin(), o.c.end());
  for (int64_t bi = 0; bi < p.outer * p.inner; ++bi) {
    const float* a = o.a.data() + o.bt.a(bi);
    const float* b = o.b.data() + o.bt.b(bi);
    const int64_t c0 = o.bt.c(bi);
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < p.n; ++j) {
        double s = 0;
        for (int64_t q = 0; q < p.k; ++q)
          s += static_cast<double>(p.ta ? a[q * o.lda + i] : a[i * o.lda + q]) *
               (p.tb ? b[j * o.ldb + q] : b[q * o.ldb + j]);
        const int64_t e = c0 + i * o.ldc + j;
        out[e] = alpha * s + (beta == 0.0f ? 0.0 : beta * static_cast<double>(o.c[e]));
      }
  }
  return out;
}

// What gemm.cu's launcher does with a plan, through the emulation.
void run_plan(const Problem& p, const GemmPlan& plan, float alpha, float beta, Operands& o) {
  const int64_t batch = p.outer * p.inner;
  const KernelFn kernel = kernel_for(p.ta, p.tb, plan.tiling);
  const dim3 grid(static_cast<unsigned>(gd::gemm_ceil_div(p.n, plan.tile)),
                  static_cast<unsigned>(gd::gemm_ceil_div(p.m, plan.tile)), static_cast<unsigned>(batch * plan.splits));
  if (plan.splits == 1) {
    test::emu::launch(grid, dim3(gd::kThreads), kernel, p.m, p.n, p.k, alpha, o.a.data(), o.lda, o.b.data(), o.ldb, beta,
                      o.c.data(), o.ldc, o.bt, int64_t{0}, 1, p.k, static_cast<float*>(nullptr), batch);
    return;
  }
  // Partials start as NaN: an element the kernel fails to write poisons the sum.
  std::vector<float> partial(plan.splits * batch * p.m * p.n, std::nanf(""));
  test::emu::launch(grid, dim3(gd::kThreads), kernel, p.m, p.n, p.k, alpha, o.a.data(), o.lda, o.b.data(), o.ldb, beta,
                    o.c.data(), o.ldc, o.bt, int64_t{0}, static_cast<int>(plan.splits), plan.k_chunk, partial.data(),
                    batch);
  test::emu::launch(dim3(3), dim3(64), &gd::gemm_splitk_reduce, p.m, p.n, batch, static_cast<int>(plan.splits),
                    static_cast<const float*>(partial.data()), alpha, beta, o.c.data(), o.ldc, o.bt);
}

void check(const Problem& p, const GemmPlan& plan, bool integers, uint64_t salt) {
  SCOPED_TRACE(describe(p, plan) + (integers ? " integers" : " floats"));
  test::emu::misaligned = 0;
  Rng rng(salt);
  Operands o = make_operands(p, integers, rng);
  const float alpha = integers ? 1.0f : 0.75f, beta = integers ? 2.0f : (salt % 2 ? 0.0f : -1.5f);
  const std::vector<double> ref = reference(p, o, alpha, beta);
  run_plan(p, plan, alpha, beta, o);
  double scale = 0;
  for (double r : ref) scale = std::max(scale, std::fabs(r));
  const double tol = integers ? 0.0 : 1e-5 * std::max(scale, 1.0);
  int64_t bad = 0, first = -1;
  for (size_t e = 0; e < ref.size(); ++e)
    if (!(std::fabs(o.c[e] - ref[e]) <= tol)) {
      if (first < 0) first = static_cast<int64_t>(e);
      ++bad;
    }
  EXPECT_EQ(test::emu::misaligned.load(), 0) << "16-byte shared reads at unaligned addresses";
  EXPECT_EQ(bad, 0) << "first wrong element at " << first << ": got " << (first >= 0 ? o.c[first] : 0.0f)
                    << ", want " << (first >= 0 ? ref[first] : 0.0);
}

GemmPlan forced(Tiling t, int64_t splits, int64_t k) {
  GemmPlan p;
  p.tiling = t;
  p.tile = t == Tiling::kLarge ? gd::kLargeTile : gd::kSmallTile;
  const int64_t depth = t == Tiling::kLarge ? gd::kLargeK : gd::kSmallK;
  p.k_chunk = splits > 1 ? gd::gemm_ceil_div(gd::gemm_ceil_div(k, depth), splits) * depth : k;
  p.splits = splits > 1 ? gd::gemm_ceil_div(k, p.k_chunk) : 1;
  return p;
}

TEST(CudaKernelsEmulated, GemmTilingsMatchReferenceExactly) {
  SCOPED_TRACE(seed_trace());
  // edges inside a tile, across tiles, a column or row of one, a K that is not a multiple of a slice
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 17, 33}, {130, 129, 19}, {17, 1, 64}, {1, 140, 9}, {65, 64, 8}};
  uint64_t salt = 0;
  for (int t = 0; t < 4; ++t)
    for (const auto& sh : shapes)
      for (Tiling tiling : {Tiling::kSmall, Tiling::kLarge}) {
        Problem p{(t & 1) != 0, (t & 2) != 0, sh[0], sh[1], sh[2], 1, 1};
        check(p, forced(tiling, 1, p.k), true, ++salt);
      }
}

TEST(CudaKernelsEmulated, GemmSplitKAndTwoLevelBatches) {
  SCOPED_TRACE(seed_trace());
  uint64_t salt = 100;
  for (int t = 0; t < 4; ++t)
    for (Tiling tiling : {Tiling::kSmall, Tiling::kLarge}) {
      // K split in 3 chunks with a ragged last one; 2 x 3 matrices of a convolution's samples by groups
      Problem split{(t & 1) != 0, (t & 2) != 0, 9, 70, 300, 1, 1};
      check(split, forced(tiling, 3, split.k), true, ++salt);
      Problem batched{(t & 1) != 0, (t & 2) != 0, 5, 33, 21, 2, 3};
      check(batched, forced(tiling, 1, batched.k), true, ++salt);
      Problem both{(t & 1) != 0, (t & 2) != 0, 7, 5, 90, 2, 2};
      check(both, forced(tiling, 2, both.k), true, ++salt);
    }
}

TEST(CudaKernelsEmulated, GemmFloatsWithAlphaBetaAndZeroK) {
  SCOPED_TRACE(seed_trace());
  uint64_t salt = 200;
  for (Tiling tiling : {Tiling::kSmall, Tiling::kLarge}) {
    Problem p{true, false, 131, 67, 250, 1, 1};
    check(p, forced(tiling, 1, p.k), false, ++salt);
    check(p, forced(tiling, 1, p.k), false, ++salt);  // the other beta
    Problem zero_k{false, true, 5, 7, 0, 1, 1};       // C = beta * C
    check(zero_k, forced(tiling, 1, 0), true, ++salt);
  }
}

// The launcher's own choice, run as it would be on an H200 (132 multiprocessors) and on a small GPU.
TEST(CudaKernelsEmulated, PlannedLaunchesMatchReference) {
  SCOPED_TRACE(seed_trace());
  uint64_t salt = 300;
  const int64_t shapes[][3] = {{10, 128, 3136}, {200, 300, 40}, {64, 70, 490}, {260, 257, 33}};
  for (int64_t sms : {int64_t{132}, int64_t{4}})
    for (const auto& sh : shapes) {
      Problem p{false, true, sh[0], sh[1], sh[2], 1, 1};
      check(p, gd::plan_gemm(p.m, p.n, p.k, 1, sms, true), true, ++salt);
    }
}

TEST(CudaKernelsEmulated, PlanPicksTheLargeTileWhereItFillsTheGpu) {
  // A VGG16 convolution at 4x4, its 100 samples as columns: 512 x 1600 x 4608, large tiles.
  GemmPlan p = gd::plan_gemm(512, 1600, 4608, 1, 132, true);
  EXPECT_EQ(p.tiling, Tiling::kLarge);
  EXPECT_GE(gd::gemm_ceil_div(512, p.tile) * gd::gemm_ceil_div(1600, p.tile) * p.splits, 132);
  EXPECT_EQ(gd::gemm_ceil_div(4608, p.k_chunk), p.splits);
  // A dense layer of 10 samples: a 128-row tile would be 92% waste, so the small tile, K split.
  p = gd::plan_gemm(10, 128, 3136, 1, 132, true);
  EXPECT_EQ(p.tiling, Tiling::kSmall);
  EXPECT_GT(p.splits, 1);
  EXPECT_EQ(p.k_chunk % gd::kSmallK, 0);
  // Per-sample GEMMs of a 4x4 output (n = 16): large tiles waste 7/8 of their columns.
  EXPECT_EQ(gd::plan_gemm(512, 16, 4608, 100, 132, true).tiling, Tiling::kSmall);
  // No room for chunks in the grid: no split, whatever the shape.
  p = gd::plan_gemm(10, 128, 3136, 1, 132, false);
  EXPECT_EQ(p.splits, 1);
  EXPECT_EQ(p.k_chunk, 3136);
  // K = 0 (C = beta C): one chunk.
  EXPECT_EQ(gd::plan_gemm(5, 7, 0, 1, 132, true).splits, 1);
}

}  // namespace
}  // namespace pipar
