// CPU pooling (max, average, global average) through the dispatching entry points: forward against the
// double reference on odd shapes, strides, padding and overlapping windows (exact on integer inputs),
// backward against central differences, thread counts 1 and 2, shape errors.
#include <gtest/gtest.h>

#include <cmath>

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#include "tests/reference/ops_reference.h"

namespace pipar::test {
namespace {

using kernels::Pool2dParams;

struct PoolCase {
  Shape4 x;
  Pool2dParams p;
};

std::string describe(const PoolCase& c) {
  return c.x.str() + " k" + std::to_string(c.p.kh) + "x" + std::to_string(c.p.kw) + " s" +
         std::to_string(c.p.sh) + "x" + std::to_string(c.p.sw) + " p" + std::to_string(c.p.ph) + "x" +
         std::to_string(c.p.pw);
}

// Odd sizes, padding, stride < kernel (overlapping windows), stride > kernel, non-square; the last one
// (131,072 inputs) is above the threading threshold.
std::vector<PoolCase> cases(Rng& rng) {
  const int k = rng.integer(1, 4);
  return {
      {{1, 1, 1, 1}, {1, 1, 1, 1, 0, 0}},
      {{2, 3, 17, 33}, {3, 3, 2, 2, 1, 1}},
      {{1, 2, 7, 9}, {3, 3, 1, 1, 1, 1}},   // overlapping windows
      {{1, 2, 9, 11}, {3, 3, 2, 2, 1, 1}},  // overlapping, strided, padded
      {{2, 3, 8, 8}, {2, 2, 2, 2, 0, 0}},
      {{3, 2, 7, 9}, {2, 2, 2, 2, 0, 0}},   // 2x2 stride 2 (its own path) on odd planes: last row, column dropped
      {{1, 1, 5, 6}, {2, 3, 3, 1, 1, 1}},   // stride > kernel in h, overlap in w, non-square
      {{2, 4, 33, 17}, {3, 2, 2, 3, 0, 1}},
      {{1, 3, 4, 4}, {4, 4, 1, 1, 2, 2}},   // padding = kernel/2, windows mostly padding
      {{rng.integer(1, 2), rng.integer(1, 5), rng.integer(k, 20), rng.integer(k, 20)},
       {k, k, rng.integer(1, 3), rng.integer(1, 3), k / 2, k / 2}},
      {{2, 16, 64, 64}, {3, 3, 2, 2, 1, 1}},
  };
}

// Distinct values with gaps of 0.01 (> 2h for h = 1e-3), shuffled: no ties, no kink crossed.
std::vector<float> distinct_values(Rng& rng, int64_t n) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(i - n / 2) * 0.01f;
  std::shuffle(v.begin(), v.end(), rng.engine());
  return v;
}

// --- max pooling ----------------------------------------------------------------------------------------

TEST(Pool2d, MaxForwardMatchesReferenceExactly) {
  SCOPED_TRACE(seed_trace());
  Rng rng(201);
  for_each_thread_count([&](int) {
    for (const PoolCase& c : cases(rng)) {
      SCOPED_TRACE(describe(c));
      // Small integers: many ties, so argmax also checks the first-maximum rule.
      const std::vector<float> x = rng.small_int_vec(c.x.numel(), -3, 3);
      const Shape4 ys = kernels::pool2d_out_shape(c.x, c.p);
      std::vector<float> y(ys.numel(), NAN);
      std::vector<int32_t> am(ys.numel(), -7);
      kernels::max_pool2d_forward(c.p, cview(x, c.x), view(y, ys), iview(am, ys));
      std::vector<double> ry;
      std::vector<int32_t> ram;
      ref::max_pool2d(c.p, c.x, to_double(x), ry, ram);
      EXPECT_TRUE(all_equal(y, ry));  // exact: max copies a value
      EXPECT_TRUE(all_equal(am, ram));
    }
  });
}

TEST(Pool2d, MaxNegativeInputsIgnorePadding) {
  // All inputs negative: a zero-padded implementation would return 0 at the borders.
  const Shape4 xs{1, 1, 3, 3};
  const Pool2dParams p{3, 3, 1, 1, 1, 1};
  const std::vector<float> x = {-9, -8, -7, -6, -5, -4, -3, -2, -1};
  std::vector<float> y(9);
  std::vector<int32_t> am(9);
  kernels::max_pool2d_forward(p, cview(x, xs), view(y, xs), iview(am, xs));
  EXPECT_TRUE(all_equal(y, std::vector<float>{-5, -4, -4, -2, -1, -1, -2, -1, -1}));
  EXPECT_TRUE(all_equal(am, std::vector<int32_t>{4, 5, 5, 7, 8, 8, 7, 8, 8}));
}

// NaN propagates (PyTorch's rule: taken when v > best or v is NaN, so a window's last NaN), on the 2x2
// stride-2 path and on the general one (padded).
TEST(Pool2d, MaxPropagatesNaN) {
  const Shape4 xs{1, 1, 4, 4};
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  x[1] = NAN, x[10] = NAN, x[15] = NAN;
  for (const Pool2dParams& p : {Pool2dParams{2, 2, 2, 2, 0, 0}, Pool2dParams{2, 2, 2, 2, 1, 1}}) {
    const Shape4 ys = kernels::pool2d_out_shape(xs, p);
    std::vector<float> y(ys.numel());
    std::vector<int32_t> am(ys.numel());
    kernels::max_pool2d_forward(p, cview(x, xs), view(y, ys), iview(am, ys));
    std::vector<float> want_y;
    std::vector<int32_t> want_am;
    if (p.ph == 0) {
      want_y = {NAN, 8, 14, NAN}, want_am = {1, 7, 13, 15};  // window (1, 1): NaNs at 10 and 15, the last
    } else {  // windows of rows {0}, {1, 2}, {3} by the same columns
      want_y = {1, NAN, 4, 9, NAN, 12, 13, 15, NAN}, want_am = {0, 1, 3, 8, 10, 11, 12, 14, 15};
    }
    for (size_t i = 0; i < y.size(); ++i) {
      SCOPED_TRACE("output " + std::to_string(i) + " pad " + std::to_string(p.ph));
      EXPECT_EQ(std::isnan(y[i]), std::isnan(want_y[i]));
      if (!std::isnan(want_y[i])) {
        EXPECT_EQ(y[i], want_y[i]);
      }
      EXPECT_EQ(am[i], want_am[i]);
    }
  }
  // A row of 4 outputs (the 4-wide vector path of 2x2 stride 2): NaN in the second row, in both rows,
  // none (ties: the first maximum), in the first row.
  const Shape4 ws{1, 1, 2, 8};
  const std::vector<float> xw = {1, 2, 5, 5, 0, 0, NAN, 1, 3, NAN, NAN, 0, 5, 5, 2, 2};
  std::vector<float> y(4);
  std::vector<int32_t> am(4);
  kernels::max_pool2d_forward(Pool2dParams{2, 2, 2, 2, 0, 0}, cview(xw, ws), view(y, {1, 1, 1, 4}), iview(am, {1, 1, 1, 4}));
  EXPECT_TRUE(std::isnan(y[0]) && std::isnan(y[1]) && std::isnan(y[3]));
  EXPECT_EQ(y[2], 5.0f);
  EXPECT_TRUE(all_equal(am, std::vector<int32_t>{9, 10, 12, 6}));
}

TEST(Pool2d, MaxBackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace());
  Rng rng(202);
  for (const PoolCase& c : cases(rng)) {
    if (c.x.numel() > 1200) continue;  // finite differences cost numel^2 (large: BackwardLargeMatchesGather)
    SCOPED_TRACE(describe(c));
    const std::vector<float> x = distinct_values(rng, c.x.numel());
    const Shape4 ys = kernels::pool2d_out_shape(c.x, c.p);
    const std::vector<float> dy = rng.uniform_vec(ys.numel());
    const auto loss = [&](const std::vector<double>& xd) {
      std::vector<double> y;
      std::vector<int32_t> am;
      ref::max_pool2d(c.p, c.x, xd, y, am);
      return dot(y, to_double(dy));
    };
    const std::vector<double> expect = numeric_grad(loss, to_double(x), 1e-3);
    for_each_thread_count([&](int) {
      std::vector<float> y(ys.numel());
      std::vector<int32_t> am(ys.numel());
      kernels::max_pool2d_forward(c.p, cview(x, c.x), view(y, ys), iview(am, ys));
      std::vector<float> dx(c.x.numel(), NAN);  // must be overwritten, not accumulated into
      kernels::max_pool2d_backward(c.p, cview(dy, ys), ciview(am, ys), view(dx, c.x));
      // Piecewise linear and no tie within h: the differences are exact up to double rounding; the
      // kernel sums at most kh*kw float dy per input (~1e-7 relative).
      EXPECT_TRUE(all_close(dx, expect, 1e-6, 1e-5));
      EXPECT_GT(l2_norm(dx), 0.0);
    });
  }
}

// --- average pooling --------------------------------------------------------------------------------------

TEST(Pool2d, AvgForwardMatchesReference) {
  SCOPED_TRACE(seed_trace());
  Rng rng(203);
  for_each_thread_count([&](int) {
    for (const PoolCase& c : cases(rng)) {
      SCOPED_TRACE(describe(c));
      const std::vector<float> x = rng.small_int_vec(c.x.numel(), -3, 3);
      const Shape4 ys = kernels::pool2d_out_shape(c.x, c.p);
      std::vector<float> y(ys.numel(), NAN);
      kernels::avg_pool2d_forward(c.p, cview(x, c.x), view(y, ys));
      // Integer sums are exact; only the multiply by the rounded 1/(kh*kw) rounds (<= 2 ulp).
      EXPECT_TRUE(all_close(y, ref::avg_pool2d(c.p, c.x, to_double(x)), 1e-7, 3e-7));
    }
  });
}

TEST(Pool2d, AvgBackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace());
  Rng rng(204);
  for (const PoolCase& c : cases(rng)) {
    if (c.x.numel() > 1200) continue;
    SCOPED_TRACE(describe(c));
    const std::vector<float> x = rng.uniform_vec(c.x.numel());
    const Shape4 ys = kernels::pool2d_out_shape(c.x, c.p);
    const std::vector<float> dy = rng.uniform_vec(ys.numel());
    const auto loss = [&](const std::vector<double>& xd) { return dot(ref::avg_pool2d(c.p, c.x, xd), to_double(dy)); };
    const std::vector<double> expect = numeric_grad(loss, to_double(x), 1e-3);
    for_each_thread_count([&](int) {
      std::vector<float> dx(c.x.numel(), NAN);
      kernels::avg_pool2d_backward(c.p, cview(dy, ys), view(dx, c.x));
      // Linear: differences exact up to double rounding (~1e-12); kernel sums <= kh*kw float terms.
      EXPECT_TRUE(all_close(dx, expect, 1e-6, 1e-5));
      EXPECT_GT(l2_norm(dx), 0.0);
    });
  }
}

TEST(Pool2d, BackwardLargeMatchesGather) {
  // Above the threading threshold: the scattered gradient equals a gather over windows in double.
  SCOPED_TRACE(seed_trace());
  Rng rng(205);
  const PoolCase c{{2, 16, 64, 64}, {3, 3, 2, 2, 1, 1}};
  const Shape4 ys = kernels::pool2d_out_shape(c.x, c.p);
  const std::vector<float> x = distinct_values(rng, c.x.numel());
  const std::vector<float> dy = rng.small_int_vec(ys.numel(), -3, 3);
  std::vector<double> ry;
  std::vector<int32_t> ram;
  ref::max_pool2d(c.p, c.x, to_double(x), ry, ram);
  std::vector<double> expect_max(c.x.numel(), 0), expect_avg(c.x.numel(), 0);
  const int64_t in_plane = c.x.h * c.x.w, out_plane = ys.h * ys.w;
  for (int64_t i = 0; i < ys.numel(); ++i) expect_max[(i / out_plane) * in_plane + ram[i]] += dy[i];
  for (int64_t pl = 0; pl < c.x.n * c.x.c; ++pl)
    for (int64_t oh = 0; oh < ys.h; ++oh)
      for (int64_t ow = 0; ow < ys.w; ++ow)
        for (int i = 0; i < c.p.kh; ++i)
          for (int j = 0; j < c.p.kw; ++j) {
            const int64_t h = oh * c.p.sh - c.p.ph + i, w = ow * c.p.sw - c.p.pw + j;
            if (h >= 0 && h < c.x.h && w >= 0 && w < c.x.w)
              expect_avg[pl * in_plane + h * c.x.w + w] += dy[pl * out_plane + oh * ys.w + ow] / 9.0;
          }
  for_each_thread_count([&](int) {
    std::vector<float> y(ys.numel());
    std::vector<int32_t> am(ys.numel());
    kernels::max_pool2d_forward(c.p, cview(x, c.x), view(y, ys), iview(am, ys));
    std::vector<float> dx(c.x.numel(), NAN);
    kernels::max_pool2d_backward(c.p, cview(dy, ys), ciview(am, ys), view(dx, c.x));
    EXPECT_TRUE(all_equal(dx, expect_max));  // exact: sums of <= 4 small integers
    kernels::avg_pool2d_backward(c.p, cview(dy, ys), view(dx, c.x));
    EXPECT_TRUE(all_close(dx, expect_avg, 1e-6, 1e-6));  // <= 4 terms of dy*(1/9) in float
  });
}

// --- global average pooling -------------------------------------------------------------------------------

TEST(Pool2d, GlobalAvgForwardBackward) {
  SCOPED_TRACE(seed_trace());
  Rng rng(206);
  const std::vector<Shape4> shapes = {{1, 1, 1, 1}, {2, 3, 7, 7}, {1, 17, 3, 33}, {3, 5, 1, 1}, {2, 32, 33, 17}};
  for_each_thread_count([&](int) {
    for (const Shape4 s : shapes) {
      SCOPED_TRACE(s.str());
      const std::vector<float> x = rng.uniform_vec(s.numel());
      const Shape4 ys{s.n, s.c, 1, 1};
      std::vector<float> y(ys.numel(), NAN);
      kernels::global_avg_pool_forward(cview(x, s), view(y, ys));
      // Summed in double by the kernel; one final rounding to float.
      EXPECT_TRUE(all_close(y, ref::global_avg_pool(s, to_double(x)), 1e-7, 1e-6));

      const std::vector<float> dy = rng.uniform_vec(ys.numel());
      std::vector<float> dx(s.numel(), NAN);
      kernels::global_avg_pool_backward(cview(dy, ys), view(dx, s));
      if (s.numel() <= 4096) {
        const auto loss = [&](const std::vector<double>& xd) { return dot(ref::global_avg_pool(s, xd), to_double(dy)); };
        // Linear: exact differences up to double rounding; dy*(1/hw) is one float rounding.
        EXPECT_TRUE(all_close(dx, numeric_grad(loss, to_double(x), 1e-3), 1e-7, 1e-5));
      } else {
        std::vector<double> expect(s.numel());
        for (int64_t i = 0; i < s.numel(); ++i) expect[i] = dy[i / (s.h * s.w)] / static_cast<double>(s.h * s.w);
        EXPECT_TRUE(all_close(dx, expect, 1e-8, 3e-7));
      }
    }
  });
}

// --- errors -----------------------------------------------------------------------------------------------

TEST(Pool2d, WrongShapesThrow) {
  std::vector<float> x(2 * 3 * 8 * 8), y(2 * 3 * 4 * 4), big(2 * 3 * 5 * 5);
  std::vector<int32_t> am(2 * 3 * 5 * 5);
  const Shape4 xs{2, 3, 8, 8};
  const Pool2dParams p{2, 2, 2, 2, 0, 0};
  EXPECT_THROW(kernels::max_pool2d_forward(p, cview(x, xs), view(big, {2, 3, 5, 5}), iview(am, {2, 3, 4, 4})),
               ShapeError);
  EXPECT_THROW(kernels::max_pool2d_forward(p, cview(x, xs), view(y, {2, 3, 4, 4}), iview(am, {2, 3, 5, 5})),
               ShapeError);
  EXPECT_THROW(kernels::avg_pool2d_forward(p, cview(x, xs), view(big, {2, 3, 5, 5})), ShapeError);
  EXPECT_THROW(kernels::avg_pool2d_forward({2, 2, 2, 2, 2, 0}, cview(x, xs), view(y, {2, 3, 4, 4})),
               ShapeError);  // padding more than half the kernel
  EXPECT_THROW(kernels::avg_pool2d_backward(p, cview(big, {2, 3, 5, 5}), view(x, xs)), ShapeError);
  EXPECT_THROW(kernels::max_pool2d_backward(p, cview(y, {2, 3, 4, 4}), ciview(am, {2, 3, 5, 5}), view(x, xs)),
               ShapeError);
  EXPECT_THROW(kernels::global_avg_pool_forward(cview(x, xs), view(y, {2, 3, 1, 2})), ShapeError);
  EXPECT_THROW(kernels::global_avg_pool_backward(cview(y, {3, 2, 1, 1}), view(x, xs)), ShapeError);
}

}  // namespace
}  // namespace pipar::test
