// The hand-written CUDA GEMM kernels (kernels/cuda/gemm_kernels.cuh) run on the CPU through the kernel
// emulation (cuda_emulation.h): both tilings, every transpose, split-K and its reduction, two-level
// batches, padded leading dimensions and ragged edges, against a double reference; and a
// convolution's forward and backward-input passes with the samples side by side as GEMM columns
// (kernels/cuda/conv_kernels.cuh), kernel by kernel in conv2d.cu's order, against the CPU backend.
// Runs everywhere (no GPU needed); the GPU tests of the same code are OpsCuda.Gemm* and
// OpsCuda.Conv2d* in cuda_ops_test.cpp.
// Inputs are small integers (products and sums exact in float32, so results must match exactly) or
// uniform floats (tolerance 1e-5 relative to the largest reference entry: K <= 300 terms of size 1).
#include "tests/kernels/cuda_emulation.h"
// (the emulation must come first)
#include "kernels/cuda/conv_kernels.cuh"
#include "kernels/cuda/gemm_kernels.cuh"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/op_test_util.h"
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
void run_gemm(const GemmPlan& plan, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const Batch2& bt,
              int64_t batch) {
  const KernelFn kernel = kernel_for(ta, tb, plan.tiling);
  const dim3 grid(static_cast<unsigned>(gd::gemm_ceil_div(n, plan.tile)),
                  static_cast<unsigned>(gd::gemm_ceil_div(m, plan.tile)), static_cast<unsigned>(batch * plan.splits));
  if (plan.splits == 1) {
    test::emu::launch(grid, dim3(gd::kThreads), kernel, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt, int64_t{0}, 1,
                      k, static_cast<float*>(nullptr), batch);
    return;
  }
  // Partials start as NaN: an element the kernel fails to write poisons the sum.
  std::vector<float> partial(plan.splits * batch * m * n, std::nanf(""));
  test::emu::launch(grid, dim3(gd::kThreads), kernel, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt, int64_t{0},
                    static_cast<int>(plan.splits), plan.k_chunk, partial.data(), batch);
  test::emu::launch(dim3(3), dim3(64), &gd::gemm_splitk_reduce, m, n, batch, static_cast<int>(plan.splits),
                    static_cast<const float*>(partial.data()), alpha, beta, c, ldc, bt);
}

void run_plan(const Problem& p, const GemmPlan& plan, float alpha, float beta, Operands& o) {
  run_gemm(plan, p.ta, p.tb, p.m, p.n, p.k, alpha, o.a.data(), o.lda, o.b.data(), o.ldb, beta, o.c.data(), o.ldc, o.bt,
           p.outer * p.inner);
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
  // Forced tilings (GemmPlanning::kBaseline, kLarge): that tile whatever the shape, K still split.
  EXPECT_EQ(gd::plan_gemm(512, 1600, 4608, 1, 132, true, gd::TilingRule::kSmallOnly).tiling, Tiling::kSmall);
  p = gd::plan_gemm(10, 128, 3136, 1, 132, true, gd::TilingRule::kLargeOnly);
  EXPECT_EQ(p.tiling, Tiling::kLarge);
  EXPECT_GT(p.splits, 1);
  EXPECT_EQ(p.k_chunk % gd::kLargeK, 0);
  // No room for chunks in the grid: no split, whatever the shape.
  p = gd::plan_gemm(10, 128, 3136, 1, 132, false);
  EXPECT_EQ(p.splits, 1);
  EXPECT_EQ(p.k_chunk, 3136);
  // K = 0 (C = beta C): one chunk.
  EXPECT_EQ(gd::plan_gemm(5, 7, 0, 1, 132, true).splits, 1);
}

TEST(CudaKernelsEmulated, SmallOutputsFoldSamplesIntoColumns) {
  // outputs that leave the 64-column tiles mostly empty, with more than one sample
  EXPECT_TRUE(gd::fold_samples_as_columns(16, 100));  // 4x4: 16 of 64 columns
  EXPECT_TRUE(gd::fold_samples_as_columns(4, 10));    // 2x2
  EXPECT_TRUE(gd::fold_samples_as_columns(1, 2));     // 1x1
  EXPECT_TRUE(gd::fold_samples_as_columns(49, 25));   // 7x7: 49 of 64
  EXPECT_TRUE(gd::fold_samples_as_columns(196, 10));  // 14x14: 196 of 256
  // full tiles, nearly full ones, or one sample: the per-sample GEMMs
  EXPECT_FALSE(gd::fold_samples_as_columns(64, 100));
  EXPECT_FALSE(gd::fold_samples_as_columns(1024, 100));
  EXPECT_FALSE(gd::fold_samples_as_columns(784, 10));  // 28x28: 784 of 832
  EXPECT_FALSE(gd::fold_samples_as_columns(16, 1));
}

// --- convolution passes with the samples side by side as columns -------------------------------------

namespace cd = kernels::cuda::conv_detail;
using kernels::Conv2dParams;
using kernels::ConvGeom;
using test::cview;
using test::view;

// conv2d.cu's group GEMM (strided batch over the groups) as its launcher plans it for `sms`.
void run_group_gemm(const cd::GroupGemm& p, const float* a, const float* b, float* c, int64_t sms) {
  const Batch2 bt{1, p.stride_a, 0, p.stride_b, 0, p.stride_c, 0};
  run_gemm(gd::plan_gemm(p.m, p.n, p.k, p.batch, sms, true), p.trans_a, false, p.m, p.n, p.k, 1.0f, a, p.lda, b, p.ldb,
           0.0f, c, p.ldc, bt, p.batch);
}

struct FoldCase {
  Shape4 x, w;
  int k, s, pad, groups;
};

void check_folded_conv(const FoldCase& fc, int64_t sms, uint64_t salt) {
  SCOPED_TRACE("x " + fc.x.str() + " w " + fc.w.str() + " k" + std::to_string(fc.k) + " s" + std::to_string(fc.s) +
               " p" + std::to_string(fc.pad) + " g" + std::to_string(fc.groups) + " sms " + std::to_string(sms));
  Conv2dParams p;
  p.kh = p.kw = fc.k, p.sh = p.sw = fc.s, p.ph = p.pw = fc.pad, p.groups = fc.groups;
  const Shape4 ys = kernels::conv2d_out_shape(fc.x, fc.w, p), bs{fc.w.n, 1, 1, 1};
  const ConvGeom g = kernels::conv_geometry(p, fc.x, ys), all = cd::all_channels(g);
  ASSERT_TRUE(gd::fold_samples_as_columns(g.ohw, g.n)) << "the case must take the folded path";
  Rng rng(salt);
  const std::vector<float> x = rng.small_int_vec(fc.x.numel()), w = rng.small_int_vec(fc.w.numel()),
                           b = rng.small_int_vec(fc.w.n), dy = rng.small_int_vec(ys.numel());
  std::vector<float> y_ref(ys.numel()), dx_ref(fc.x.numel());
  kernels::conv2d_forward(p, cview(x, fc.x), cview(w, fc.w), cview(b, bs), view(y_ref, ys));
  kernels::conv2d_backward_input(p, cview(dy, ys), cview(w, fc.w), view(dx_ref, fc.x));

  // One chunk of all samples; scratch starts as NaN, so a position no kernel writes shows.
  const int64_t cs = g.n, len = cs * g.ohw;
  std::vector<float> col(all.ckk * len, std::nanf("")), scratch(g.k * len, std::nanf(""));
  std::vector<float> y(ys.numel(), std::nanf("")), dx(fc.x.numel(), std::nanf(""));
  const dim3 grid(5), block(64);  // a grid-stride loop: fewer threads than elements
  // forward: im2col, the group GEMM, unpack with the bias
  test::emu::launch(grid, block, &cd::conv2d_im2col_kernel, all, x.data(), col.data(), cs, cd::folded_layout(g, cs));
  run_group_gemm(cd::folded_forward_gemm(g, cs), w.data(), col.data(), scratch.data(), sms);
  test::emu::launch(grid, block, &cd::conv2d_unpack_y_kernel, static_cast<const float*>(scratch.data()), b.data(),
                    y.data(), cs, g.k, g.ohw);
  EXPECT_EQ(y, y_ref) << "forward";
  // backward input: pack dY, the group GEMM, col2im
  test::emu::launch(grid, block, &cd::conv2d_pack_dy_kernel, dy.data(), scratch.data(), cs, g.k, g.ohw);
  run_group_gemm(cd::folded_backward_input_gemm(g, cs), w.data(), scratch.data(), col.data(), sms);
  test::emu::launch(grid, block, &cd::conv2d_col2im_kernel, all, static_cast<const float*>(col.data()), dx.data(), cs,
                    cd::folded_layout(g, cs));
  EXPECT_EQ(dx, dx_ref) << "backward input";
}

TEST(CudaKernelsEmulated, FoldedConvolutionMatchesCpu) {
  SCOPED_TRACE(seed_trace());
  const FoldCase cases[] = {
      {{3, 5, 4, 4}, {6, 5, 3, 3}, 3, 1, 1, 1},     // VGG16's 4x4 layers, small
      {{2, 4, 9, 9}, {5, 4, 3, 3}, 3, 2, 1, 1},     // strided to 5x5
      {{3, 8, 2, 2}, {12, 2, 1, 1}, 1, 1, 0, 4},    // grouped pointwise at 2x2
      {{2, 3, 5, 5}, {4, 3, 5, 5}, 5, 1, 0, 1},     // 1x1 output
      {{4, 6, 7, 7}, {6, 2, 3, 3}, 3, 1, 1, 3},     // 7x7, grouped
      {{2, 140, 2, 2}, {130, 140, 1, 1}, 1, 1, 0, 1},  // more than one large tile of rows
  };
  uint64_t salt = 400;
  for (int64_t sms : {int64_t{132}, int64_t{2}})
    for (const FoldCase& fc : cases) check_folded_conv(fc, sms, ++salt);
}

}  // namespace
}  // namespace pipar
