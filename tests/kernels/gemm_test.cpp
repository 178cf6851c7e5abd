// cpu::gemm against the double-precision reference: exact on small integers (every ISA, 1-3 threads,
// every transpose, odd sizes, padded leading dimensions), and within the dot-product error bound on reals.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/ops.h"
#include "tests/kernels/gemm_configs.h"
#include "tests/random.h"
#include "tests/reference/conv_reference.h"

namespace pipar::test {
namespace {

struct GemmShape {
  int64_t m, n, k;
};
// Sizes that are not multiples of any micro-tile (6, 8, 16) or block (128, 256, 2048), plus a few that are.
const std::vector<GemmShape> kShapes = {{1, 1, 1},    {3, 17, 33},  {17, 3, 257},  {33, 257, 17}, {64, 49, 576},
                                        {100, 128, 300}, {257, 33, 3}, {6, 16, 256}, {16, 16, 512}, {7, 1, 1000},
                                        {1, 2100, 5}, {129, 40, 9}};

struct GemmCase {
  GemmShape s;
  bool ta, tb;
  int64_t lda, ldb, ldc;
  std::vector<float> a, b, c0;
};

GemmCase make_case(Rng& rng, GemmShape s, bool ta, bool tb, bool integers) {
  GemmCase g{s, ta, tb, 0, 0, 0, {}, {}, {}};
  const int64_t pad = rng.integer(0, 3);  // leading dimensions larger than the matrix
  g.lda = (ta ? s.m : s.k) + pad;
  g.ldb = (tb ? s.k : s.n) + pad;
  g.ldc = s.n + pad;
  const int64_t a_rows = ta ? s.k : s.m, b_rows = tb ? s.n : s.k;
  auto fill = [&](size_t count) { return integers ? rng.small_int_vec(count) : rng.uniform_vec(count); };
  g.a = fill(a_rows * g.lda);
  g.b = fill(b_rows * g.ldb);
  g.c0 = fill(s.m * g.ldc);
  return g;
}

std::vector<double> reference(const GemmCase& g, double alpha, double beta) {
  std::vector<double> c(g.c0.begin(), g.c0.end());
  ref::gemm(g.ta, g.tb, g.s.m, g.s.n, g.s.k, alpha, g.a, g.lda, g.b, g.ldb, beta, c, g.ldc);
  return c;
}

std::vector<float> run(const GemmCase& g, float alpha, float beta) {
  std::vector<float> c = g.c0;
  kernels::cpu::gemm(g.ta, g.tb, g.s.m, g.s.n, g.s.k, alpha, g.a.data(), g.lda, g.b.data(), g.ldb, beta, c.data(),
                     g.ldc);
  return c;
}

TEST(GemmTest, ExactOnSmallIntegersEveryIsaThreadsAndTranspose) {
  SCOPED_TRACE(seed_trace());
  Rng rng(11);
  for (const GemmShape& s : kShapes)
    for (int t = 0; t < 4; ++t) {
      const GemmCase g = make_case(rng, s, t & 1, t & 2, true);
      // alpha 2, beta -1 and 0.5 keep every partial sum an exact small float.
      const std::vector<double> r1 = reference(g, 1.0, 0.0), r2 = reference(g, 2.0, -1.0),
                                r3 = reference(g, 1.0, 0.5);
      for (const CpuConfig& cfg : cpu_configs()) {
        ScopedCpuConfig scope(cfg);
        SCOPED_TRACE(cfg.str() + " m=" + std::to_string(s.m) + " n=" + std::to_string(s.n) +
                     " k=" + std::to_string(s.k) + " ta=" + std::to_string(g.ta) + " tb=" + std::to_string(g.tb));
        const std::vector<float> c1 = run(g, 1.0f, 0.0f), c2 = run(g, 2.0f, -1.0f), c3 = run(g, 1.0f, 0.5f);
        int64_t wrong = 0;
        double norm = 0.0;
        for (int64_t i = 0; i < s.m; ++i)
          for (int64_t j = 0; j < s.n; ++j) {
            const int64_t e = i * g.ldc + j;
            wrong += (c1[e] != r1[e]) + (c2[e] != r2[e]) + (c3[e] != r3[e]);  // exact: == on integers
            norm += std::abs(r1[e]);
          }
        EXPECT_EQ(wrong, 0);
        // Padding columns of C past n are never written.
        int64_t touched = 0;
        for (int64_t i = 0; i < s.m; ++i)
          for (int64_t j = s.n; j < g.ldc; ++j) touched += c1[i * g.ldc + j] != g.c0[i * g.ldc + j];
        EXPECT_EQ(touched, 0);
        if (s.k >= 9) {
          EXPECT_GT(norm, 0.0);  // anti-vacuity
        }
      }
    }
}

TEST(GemmTest, RealValuesWithinDotProductErrorBound) {
  SCOPED_TRACE(seed_trace());
  Rng rng(12);
  for (const GemmShape& s : kShapes)
    for (int t = 0; t < 4; ++t) {
      const GemmCase g = make_case(rng, s, t & 1, t & 2, false);
      const float alpha = -1.5f, beta = 0.25f;
      const std::vector<double> r = reference(g, alpha, beta);
      // Bound: |err| <= gamma_k * |alpha| * sum_p |a_ip b_pj| + |beta c| * eps, with gamma_k = k * 2^-24
      // for any summation order (fp32, FMA or not); doubled for the alpha/beta roundings.
      std::vector<double> mag(g.c0.size(), 0.0);
      for (int64_t i = 0; i < s.m; ++i)
        for (int64_t j = 0; j < s.n; ++j) {
          double m = 0.0;
          for (int64_t p = 0; p < s.k; ++p)
            m += std::abs((g.ta ? g.a[p * g.lda + i] : g.a[i * g.lda + p]) *
                          (g.tb ? g.b[j * g.ldb + p] : g.b[p * g.ldb + j]));
          mag[i * g.ldc + j] = 2.0 * ((s.k + 2) * std::ldexp(1.0, -24) * (1.5 * m + 0.25 * std::abs(g.c0[i * g.ldc + j])));
        }
      for (const CpuConfig& cfg : cpu_configs()) {
        ScopedCpuConfig scope(cfg);
        SCOPED_TRACE(cfg.str() + " m=" + std::to_string(s.m) + " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k));
        const std::vector<float> c = run(g, alpha, beta);
        int64_t wrong = 0;
        for (int64_t i = 0; i < s.m; ++i)
          for (int64_t j = 0; j < s.n; ++j) {
            const int64_t e = i * g.ldc + j;
            wrong += !(std::abs(c[e] - r[e]) <= mag[e] + 1e-30);  // NaN counts as wrong
          }
        EXPECT_EQ(wrong, 0);
      }
    }
}

TEST(GemmTest, ZeroDepthScalesCAndBetaZeroIgnoresNaN) {
  SCOPED_TRACE(seed_trace());
  for (const CpuConfig& cfg : cpu_configs()) {
    ScopedCpuConfig scope(cfg);
    SCOPED_TRACE(cfg.str());
    std::vector<float> c(12, 3.0f);
    kernels::cpu::gemm(false, false, 3, 4, 0, 1.0f, nullptr, 1, nullptr, 4, 0.5f, c.data(), 4);
    for (float v : c) EXPECT_EQ(v, 1.5f);  // k = 0: C = beta C exactly
    // beta = 0 must overwrite C without reading it (NaN garbage stays out).
    std::vector<float> a(3 * 5, 1.0f), b(5 * 4, 2.0f), d(12, std::nanf(""));
    kernels::cpu::gemm(false, false, 3, 4, 5, 1.0f, a.data(), 5, b.data(), 4, 0.0f, d.data(), 4);
    for (float v : d) EXPECT_EQ(v, 10.0f);
  }
}

// The channels-last <-> planar transpose under the direct convolution: every ISA, sizes off and on the
// 16 x 16 blocks, a bias per output row, and a negative output stride (rows written bottom-up, which
// flips the kernel taps for the backward-input weights).
TEST(GemmTest, TransposeExactEveryIsaEdgesBiasAndNegativeStride) {
  SCOPED_TRACE(seed_trace());
  Rng rng(14);
  for (kernels::Isa isa : supported_isas())
    for (int64_t rows : {1, 5, 16, 17, 33})
      for (int64_t cols : {1, 9, 16, 20, 64})
        for (bool with_bias : {false, true})
          for (bool flip : {false, true}) {
            ScopedCpuConfig scope({isa, 1});
            SCOPED_TRACE(std::string(kernels::isa_name(isa)) + " " + std::to_string(rows) + "x" + std::to_string(cols));
            const int64_t lds = cols + 3, ldd = rows + 5;
            const auto src = rng.small_int_vec(rows * lds), bias = rng.small_int_vec(cols);
            std::vector<float> dst(cols * ldd, -100.0f);
            float* d0 = flip ? dst.data() + (cols - 1) * ldd : dst.data();
            kernels::cpu::detail::transpose(rows, cols, src.data(), lds, d0, flip ? -ldd : ldd,
                                            with_bias ? bias.data() : nullptr);
            int64_t wrong = 0;
            for (int64_t j = 0; j < cols; ++j)
              for (int64_t i = 0; i < ldd; ++i) {
                const int64_t row = flip ? cols - 1 - j : j;
                const float want = i < rows ? src[i * lds + j] + (with_bias ? bias[j] : 0.0f) : -100.0f;
                wrong += !(dst[row * ldd + i] == want);  // padding past rows untouched
              }
            EXPECT_EQ(wrong, 0);
          }
}

}  // namespace
}  // namespace pipar::test
