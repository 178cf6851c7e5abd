// conv2d through the pipar::kernels entry points against the seven-loop double reference: exact on
// small integers (forward, input/weight/bias gradients, accumulation) for every ISA and 1-3 threads,
// real-valued gradients against central finite differences, and shape errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/gemm_configs.h"
#include "tests/random.h"
#include "tests/reference/conv_reference.h"

namespace pipar::test {
namespace {

using kernels::Conv2dParams;

struct ConvCase {
  int64_t n, c, h, w, k;
  Conv2dParams p;
  std::string str() const {
    return "x[" + std::to_string(n) + "," + std::to_string(c) + "," + std::to_string(h) + "," + std::to_string(w) +
           "] k=" + std::to_string(k) + " kernel " + std::to_string(p.kh) + "x" + std::to_string(p.kw) + " stride " +
           std::to_string(p.sh) + "x" + std::to_string(p.sw) + " pad " + std::to_string(p.ph) + "x" +
           std::to_string(p.pw) + " groups " + std::to_string(p.groups);
  }
  Shape4 xs() const { return {n, c, h, w}; }
  Shape4 ws() const { return {k, c / p.groups, p.kh, p.kw}; }
  Shape4 ys() const { return kernels::conv2d_out_shape(xs(), ws(), p); }
};

Conv2dParams params(int kh, int kw, int sh, int sw, int ph, int pw, int groups) {
  Conv2dParams p;
  p.kh = kh, p.kw = kw, p.sh = sh, p.sw = sw, p.ph = ph, p.pw = pw, p.groups = groups;
  return p;
}

// Batch 1, odd sizes, stride > 1 and > kernel, padding, non-square, 1x1, groups, depthwise (with a
// channel multiplier), and the VGG5 shapes.
const std::vector<ConvCase> kCases = {
    {1, 1, 5, 5, 1, params(3, 3, 1, 1, 0, 0, 1)},     {2, 3, 7, 9, 4, params(3, 3, 1, 1, 1, 1, 1)},
    {1, 3, 17, 13, 5, params(3, 5, 2, 3, 1, 2, 1)},   {3, 4, 8, 8, 6, params(1, 1, 1, 1, 0, 0, 1)},
    {2, 5, 9, 7, 3, params(1, 1, 2, 2, 0, 0, 1)},     {2, 6, 9, 9, 4, params(3, 3, 2, 2, 1, 1, 2)},
    {2, 8, 10, 7, 8, params(3, 3, 1, 1, 1, 1, 8)},    {2, 4, 9, 9, 8, params(3, 3, 2, 2, 1, 1, 4)},
    {1, 5, 6, 6, 3, params(2, 2, 3, 3, 0, 0, 1)},     {2, 3, 33, 33, 17, params(5, 5, 2, 2, 2, 2, 1)},
    {4, 1, 28, 28, 32, params(3, 3, 1, 1, 1, 1, 1)},  {3, 32, 14, 14, 64, params(3, 3, 1, 1, 1, 1, 1)},
    {5, 64, 7, 7, 64, params(3, 3, 1, 1, 1, 1, 1)},   {2, 3, 32, 32, 32, params(3, 3, 1, 1, 1, 1, 1)},
    {1, 16, 5, 5, 16, params(3, 3, 1, 1, 1, 1, 16)},  {13, 6, 6, 5, 9, params(3, 3, 1, 2, 1, 0, 3)},
    // The direct (indirect-kernel) passes on AVX-512: >= 64 taps and >= 16 vector channels, with
    // channel counts off multiples of 16 and above 64 (two channel blocks), pad 0 and 2, a 3x2
    // kernel, groups, stride 2 and 1x1 stride 2 (forward and weight only), batch 1, and padding >=
    // the kernel (backward-input falls back to col2im).
    {2, 16, 9, 11, 20, params(3, 3, 1, 1, 0, 0, 1)},  {1, 17, 8, 10, 18, params(5, 5, 1, 1, 2, 2, 1)},
    {2, 16, 6, 7, 16, params(3, 3, 1, 1, 2, 2, 1)},   {3, 20, 7, 5, 33, params(3, 2, 1, 1, 1, 0, 1)},
    {2, 32, 8, 8, 64, params(3, 3, 1, 1, 1, 1, 2)},   {2, 16, 9, 9, 32, params(3, 3, 2, 2, 1, 1, 1)},
    {2, 64, 6, 6, 16, params(1, 1, 2, 2, 0, 0, 1)},   {1, 8, 6, 6, 80, params(3, 3, 1, 1, 1, 1, 1)},
    {2, 16, 5, 5, 16, params(2, 2, 1, 1, 2, 2, 1)},   {4, 80, 5, 6, 17, params(3, 3, 1, 1, 1, 1, 1)},
};

// Small cases for finite differences (each gradient entry costs two reference convolutions).
const std::vector<ConvCase> kSmallCases = {
    {2, 3, 5, 6, 4, params(3, 3, 1, 1, 1, 1, 1)}, {1, 2, 7, 5, 3, params(3, 2, 2, 3, 1, 0, 1)},
    {2, 4, 5, 5, 4, params(3, 3, 1, 1, 1, 1, 2)}, {2, 3, 6, 6, 6, params(3, 3, 2, 1, 1, 1, 3)},
    {2, 3, 4, 4, 5, params(1, 1, 1, 1, 0, 0, 1)}, {1, 2, 6, 7, 2, params(2, 2, 3, 3, 0, 1, 1)},
};

View view(std::vector<float>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }
ConstView cview(const std::vector<float>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }

int64_t count_mismatches(const std::vector<float>& got, const std::vector<double>& want, double scale = 1.0) {
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) wrong += !(static_cast<double>(got[i]) == scale * want[i]);
  return wrong;
}

double norm1(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += std::abs(x);
  return s;
}

// --- exact: small integers, compared with == ------------------------------------------------------

TEST(Conv2dTest, ForwardExactOnSmallIntegers) {
  SCOPED_TRACE(seed_trace());
  Rng rng(21);
  for (const ConvCase& cc : kCases) {
    const auto x = rng.small_int_vec(cc.xs().numel()), w = rng.small_int_vec(cc.ws().numel()),
               b = rng.small_int_vec(cc.k);
    const std::vector<double> want = ref::conv2d_forward(cc.p, cc.xs(), x, cc.ws(), w, b);
    const std::vector<double> want_nb = ref::conv2d_forward(cc.p, cc.xs(), x, cc.ws(), w, std::vector<float>{});
    ASSERT_GT(norm1(want_nb), 0.0) << cc.str();  // anti-vacuity
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + cc.str());
      std::vector<float> y(cc.ys().numel(), std::nanf(""));  // garbage must be overwritten
      kernels::conv2d_forward(cc.p, cview(x, cc.xs()), cview(w, cc.ws()), cview(b, {cc.k, 1, 1, 1}), view(y, cc.ys()));
      EXPECT_EQ(count_mismatches(y, want), 0);
      std::vector<float> y2(cc.ys().numel(), std::nanf(""));
      kernels::conv2d_forward(cc.p, cview(x, cc.xs()), cview(w, cc.ws()), {}, view(y2, cc.ys()));
      EXPECT_EQ(count_mismatches(y2, want_nb), 0);
    }
  }
}

TEST(Conv2dTest, BackwardExactOnSmallIntegersAndParameterGradientsAccumulate) {
  SCOPED_TRACE(seed_trace());
  Rng rng(22);
  for (const ConvCase& cc : kCases) {
    const auto x = rng.small_int_vec(cc.xs().numel()), w = rng.small_int_vec(cc.ws().numel()),
               dy = rng.small_int_vec(cc.ys().numel());
    const std::vector<double> want_dx = ref::conv2d_backward_input(cc.p, cc.xs(), cc.ws(), dy, w);
    const std::vector<double> want_dw = ref::conv2d_backward_weight(cc.p, cc.xs(), cc.ws(), x, dy);
    std::vector<double> want_db(cc.k, 0.0);
    const Shape4 ys = cc.ys();
    for (int64_t s = 0; s < ys.n; ++s)
      for (int64_t kk = 0; kk < ys.c; ++kk)
        for (int64_t e = 0; e < ys.h * ys.w; ++e) want_db[kk] += dy[(s * ys.c + kk) * ys.h * ys.w + e];
    ASSERT_GT(norm1(want_dx), 0.0) << cc.str();
    ASSERT_GT(norm1(want_dw), 0.0) << cc.str();
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + cc.str());
      std::vector<float> dx(cc.xs().numel(), std::nanf(""));
      kernels::conv2d_backward_input(cc.p, cview(dy, ys), cview(w, cc.ws()), view(dx, cc.xs()));
      EXPECT_EQ(count_mismatches(dx, want_dx), 0);
      // Parameter gradients accumulate: two calls from zero give exactly twice the gradient.
      std::vector<float> dw(cc.ws().numel(), 0.0f), db(cc.k, 0.0f);
      kernels::conv2d_backward_weight(cc.p, cview(x, cc.xs()), cview(dy, ys), view(dw, cc.ws()));
      kernels::conv2d_backward_bias(cview(dy, ys), view(db, {cc.k, 1, 1, 1}));
      EXPECT_EQ(count_mismatches(dw, want_dw), 0);
      EXPECT_EQ(count_mismatches(db, want_db), 0);
      kernels::conv2d_backward_weight(cc.p, cview(x, cc.xs()), cview(dy, ys), view(dw, cc.ws()));
      kernels::conv2d_backward_bias(cview(dy, ys), view(db, {cc.k, 1, 1, 1}));
      EXPECT_EQ(count_mismatches(dw, want_dw, 2.0), 0);
      EXPECT_EQ(count_mismatches(db, want_db, 2.0), 0);
    }
  }
}

// --- real values ----------------------------------------------------------------------------------

TEST(Conv2dTest, ForwardRealValuesWithinTolerance) {
  SCOPED_TRACE(seed_trace());
  Rng rng(23);
  for (const ConvCase& cc : kCases) {
    const auto x = rng.uniform_vec(cc.xs().numel()), w = rng.uniform_vec(cc.ws().numel()), b = rng.uniform_vec(cc.k);
    const std::vector<double> want = ref::conv2d_forward(cc.p, cc.xs(), x, cc.ws(), w, b);
    const int64_t terms = cc.ws().per_sample() + 1;
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + cc.str());
      std::vector<float> y(cc.ys().numel());
      kernels::conv2d_forward(cc.p, cview(x, cc.xs()), cview(w, cc.ws()), cview(b, {cc.k, 1, 1, 1}), view(y, cc.ys()));
      int64_t wrong = 0;
      // Inputs in [-1, 1]: each term is at most 1 in size, so the fp32 sum of `terms` terms errs by at
      // most terms^2 * 2^-24 in the worst case; we allow terms * 2^-20 (16 ulps per term, far below
      // any indexing error, which is O(1)).
      const double tol = terms * std::ldexp(1.0, -20);
      for (size_t i = 0; i < y.size(); ++i) wrong += !(std::abs(y[i] - want[i]) <= tol);
      EXPECT_EQ(wrong, 0);
    }
  }
}

// Our backward passes against central finite differences of the double reference forward:
// d/dθ sum(dy ⊙ conv(θ)). The loss is linear in x and in w, so the differences are exact up to
// double rounding; the tolerance covers our fp32 sums.
TEST(Conv2dTest, BackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace());
  Rng rng(24);
  for (const ConvCase& cc : kSmallCases) {
    const auto x = rng.uniform_vec(cc.xs().numel()), w = rng.uniform_vec(cc.ws().numel()),
               b = rng.uniform_vec(cc.k), dy = rng.uniform_vec(cc.ys().numel());
    const std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end()), bd(b.begin(), b.end());
    const auto fd_x = ref::finite_differences(xd, [&](const std::vector<double>& t) {
      return ref::dot(ref::conv2d_forward(cc.p, cc.xs(), t, cc.ws(), wd, bd), dy);
    });
    const auto fd_w = ref::finite_differences(wd, [&](const std::vector<double>& t) {
      return ref::dot(ref::conv2d_forward(cc.p, cc.xs(), xd, cc.ws(), t, bd), dy);
    });
    const auto fd_b = ref::finite_differences(bd, [&](const std::vector<double>& t) {
      return ref::dot(ref::conv2d_forward(cc.p, cc.xs(), xd, cc.ws(), wd, t), dy);
    });
    // The analytic reference agrees with the differences too (it is used on the big exact cases).
    const auto an_dx = ref::conv2d_backward_input(cc.p, cc.xs(), cc.ws(), dy, w);
    const auto an_dw = ref::conv2d_backward_weight(cc.p, cc.xs(), cc.ws(), x, dy);
    for (size_t i = 0; i < an_dx.size(); ++i) ASSERT_NEAR(an_dx[i], fd_x[i], 1e-8) << cc.str();  // double FD noise ~1e-12
    for (size_t i = 0; i < an_dw.size(); ++i) ASSERT_NEAR(an_dw[i], fd_w[i], 1e-8) << cc.str();
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + cc.str());
      std::vector<float> dx(x.size()), dw(w.size(), 0.0f), db(b.size(), 0.0f);
      kernels::conv2d_backward_input(cc.p, cview(dy, cc.ys()), cview(w, cc.ws()), view(dx, cc.xs()));
      kernels::conv2d_backward_weight(cc.p, cview(x, cc.xs()), cview(dy, cc.ys()), view(dw, cc.ws()));
      kernels::conv2d_backward_bias(cview(dy, cc.ys()), view(db, {cc.k, 1, 1, 1}));
      // Sums of at most a few hundred products of values in [-1, 1]: 1e-5 absolute + 1e-5 relative is
      // ~100 fp32 ulps of the largest partial sums, far below an indexing error.
      auto close = [](double got, double want) { return std::abs(got - want) <= 1e-5 + 1e-5 * std::abs(want); };
      for (size_t i = 0; i < dx.size(); ++i) EXPECT_PRED2(close, dx[i], fd_x[i]) << "dx " << i;
      for (size_t i = 0; i < dw.size(); ++i) EXPECT_PRED2(close, dw[i], fd_w[i]) << "dw " << i;
      for (size_t i = 0; i < db.size(); ++i) EXPECT_PRED2(close, db[i], fd_b[i]) << "db " << i;
    }
  }
}

// --- shapes ---------------------------------------------------------------------------------------

TEST(Conv2dTest, WrongShapesThrowShapeError) {
  std::vector<float> x(2 * 3 * 8 * 8), w(4 * 3 * 3 * 3), y(2 * 4 * 8 * 8), b(4);
  const Conv2dParams p = params(3, 3, 1, 1, 1, 1, 1);
  const Shape4 xs{2, 3, 8, 8}, ws{4, 3, 3, 3}, ys{2, 4, 8, 8};
  EXPECT_THROW(kernels::conv2d_forward(p, cview(x, xs), cview(w, ws), {}, view(y, {2, 4, 6, 6})), ShapeError);
  EXPECT_THROW(kernels::conv2d_forward(p, cview(x, xs), cview(w, {4, 2, 3, 3}), {}, view(y, ys)), ShapeError);
  EXPECT_THROW(kernels::conv2d_forward(p, cview(x, xs), cview(w, ws), cview(b, {3, 1, 1, 1}), view(y, ys)), ShapeError);
  EXPECT_THROW(kernels::conv2d_backward_input(p, cview(y, {2, 4, 7, 8}), cview(w, ws), view(x, xs)), ShapeError);
  EXPECT_THROW(kernels::conv2d_backward_weight(p, cview(x, xs), cview(y, {2, 5, 8, 8}), view(w, ws)), ShapeError);
  EXPECT_THROW(kernels::conv2d_backward_bias(cview(y, ys), view(b, {3, 1, 1, 1})), ShapeError);
  Conv2dParams g = p;
  g.groups = 2;  // 3 channels do not split into 2 groups
  EXPECT_THROW(kernels::conv2d_forward(g, cview(x, xs), cview(w, ws), {}, view(y, ys)), ShapeError);
}

}  // namespace
}  // namespace pipar::test
