// CPU element-wise and channel-wise ops (add, channel_mul forward/backward, axpy, scale, fill, copy)
// through the dispatching entry points: exact checks on integer inputs, aliasing, channel_mul's backward
// against central differences, thread counts 1 and 2, shape errors.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#include "tests/reference/ops_reference.h"

namespace pipar::test {
namespace {

// Odd sizes; the last one (66,560 elements) is above the threading threshold.
std::vector<Shape4> shapes(Rng& rng) {
  return {{1, 1, 1, 1}, {1, 3, 17, 33}, {3, 5, 1, 1}, {2, 17, 7, 3},
          {rng.integer(1, 3), rng.integer(1, 9), rng.integer(1, 17), rng.integer(1, 17)}, {2, 8, 64, 65}};
}

// --- add ------------------------------------------------------------------------------------------------

TEST(Elementwise, AddExactAndAliased) {
  SCOPED_TRACE(seed_trace());
  Rng rng(401);
  for_each_thread_count([&](int) {
    for (const Shape4 s : shapes(rng)) {
      SCOPED_TRACE(s.str());
      const std::vector<float> a = rng.small_int_vec(s.numel()), b = rng.small_int_vec(s.numel());
      std::vector<double> expect(s.numel());
      for (int64_t i = 0; i < s.numel(); ++i) expect[i] = static_cast<double>(a[i]) + b[i];
      std::vector<float> y(s.numel(), NAN);
      kernels::add_forward(cview(a, s), cview(b, s), view(y, s));
      EXPECT_TRUE(all_equal(y, expect));  // exact: small integers
      std::vector<float> ya = a;          // y aliases a
      kernels::add_forward(cview(ya, s), cview(b, s), view(ya, s));
      EXPECT_TRUE(all_equal(ya, expect));
      std::vector<float> yb = b;  // y aliases b
      kernels::add_forward(cview(a, s), cview(yb, s), view(yb, s));
      EXPECT_TRUE(all_equal(yb, expect));
    }
  });
}

// --- channel_mul ----------------------------------------------------------------------------------------

TEST(Elementwise, ChannelMulExact) {
  SCOPED_TRACE(seed_trace());
  Rng rng(402);
  for_each_thread_count([&](int) {
    for (const Shape4 s : shapes(rng)) {
      SCOPED_TRACE(s.str());
      const Shape4 ss{s.n, s.c, 1, 1};
      const std::vector<float> x = rng.small_int_vec(s.numel()), sc = rng.small_int_vec(ss.numel());
      const std::vector<float> dy = rng.small_int_vec(s.numel());
      std::vector<float> y(s.numel(), NAN);
      kernels::channel_mul_forward(cview(x, s), cview(sc, ss), view(y, s));
      EXPECT_TRUE(all_equal(y, ref::channel_mul(s, to_double(x), to_double(sc))));  // products of small ints

      std::vector<float> dx(s.numel(), NAN), dscale(ss.numel(), NAN);
      kernels::channel_mul_backward(cview(x, s), cview(sc, ss), cview(dy, s), view(dx, s), view(dscale, ss));
      EXPECT_TRUE(all_equal(dx, ref::channel_mul(s, to_double(dy), to_double(sc))));
      std::vector<double> eds(ss.numel(), 0);
      for (int64_t i = 0; i < s.numel(); ++i) eds[i / (s.h * s.w)] += static_cast<double>(dy[i]) * x[i];
      EXPECT_TRUE(all_equal(dscale, eds));  // integer sums below 2^24: exact
      // dscale overwrites (a second call gives the same, not twice), dx may alias dy.
      std::vector<float> inplace = dy;
      kernels::channel_mul_backward(cview(x, s), cview(sc, ss), cview(inplace, s), view(inplace, s), view(dscale, ss));
      EXPECT_TRUE(all_equal(inplace, dx));
      EXPECT_TRUE(all_equal(dscale, eds));
    }
  });
}

TEST(Elementwise, ChannelMulBackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace());
  Rng rng(403);
  const Shape4 s{2, 3, 5, 7}, ss{2, 3, 1, 1};
  const std::vector<float> x = rng.uniform_vec(s.numel()), sc = rng.uniform_vec(ss.numel());
  const std::vector<float> dy = rng.uniform_vec(s.numel());
  const std::vector<double> w = to_double(dy);
  const auto gx = numeric_grad([&](const std::vector<double>& v) { return dot(ref::channel_mul(s, v, to_double(sc)), w); },
                               to_double(x), 1e-3);
  const auto gs = numeric_grad([&](const std::vector<double>& v) { return dot(ref::channel_mul(s, to_double(x), v), w); },
                               to_double(sc), 1e-3);
  for_each_thread_count([&](int) {
    std::vector<float> dx(s.numel()), dscale(ss.numel());
    kernels::channel_mul_backward(cview(x, s), cview(sc, ss), cview(dy, s), view(dx, s), view(dscale, ss));
    // Bilinear: central differences are exact up to double rounding (~1e-12); dx is one float product,
    // dscale a 35-term sum done in double and rounded once.
    EXPECT_TRUE(all_close(dx, gx, 1e-7, 1e-6));
    EXPECT_TRUE(all_close(dscale, gs, 1e-6, 1e-6));
    EXPECT_GT(l2_norm(dscale), 0.0);
  });
}

// --- axpy, scale, fill, copy ------------------------------------------------------------------------------

TEST(Elementwise, AxpyScaleFillCopy) {
  SCOPED_TRACE(seed_trace());
  Rng rng(404);
  for_each_thread_count([&](int) {
    for (const Shape4 s : shapes(rng)) {
      SCOPED_TRACE(s.str());
      const std::vector<float> x = rng.small_int_vec(s.numel()), y0 = rng.small_int_vec(s.numel());
      std::vector<double> expect(s.numel());

      std::vector<float> y = y0;
      kernels::axpy(-2.5f, cview(x, s), view(y, s));
      for (int64_t i = 0; i < s.numel(); ++i) expect[i] = y0[i] - 2.5 * x[i];
      EXPECT_TRUE(all_equal(y, expect));  // exact: halves of small integers

      kernels::scale(0.5f, view(y, s));
      for (auto& e : expect) e *= 0.5;
      EXPECT_TRUE(all_equal(y, expect));  // exact: a power of two

      kernels::fill(3.25f, view(y, s));
      EXPECT_TRUE(all_equal(y, std::vector<float>(s.numel(), 3.25f)));

      // copy: same numel, another shape.
      std::vector<float> c(s.numel(), NAN);
      kernels::copy(cview(x, s), view(c, {s.numel(), 1, 1, 1}));
      EXPECT_TRUE(all_equal(c, x));
      kernels::copy(cview(c, s), view(c, s));  // onto itself: a no-op
      EXPECT_TRUE(all_equal(c, x));
    }
  });
}

// --- errors -----------------------------------------------------------------------------------------------

TEST(Elementwise, WrongShapesThrow) {
  std::vector<float> a(24), b(24), c(30), sc(6);
  const Shape4 s{1, 2, 3, 4};
  EXPECT_THROW(kernels::add_forward(cview(a, s), cview(b, {1, 2, 4, 3}), view(a, s)), ShapeError);
  EXPECT_THROW(kernels::add_forward(cview(a, s), cview(b, s), view(c, {1, 2, 3, 5})), ShapeError);
  EXPECT_THROW(kernels::channel_mul_forward(cview(a, s), cview(sc, {1, 6, 1, 1}), view(b, s)), ShapeError);
  EXPECT_THROW(kernels::channel_mul_forward(cview(a, s), cview(sc, {1, 2, 1, 1}), view(c, {1, 2, 3, 5})), ShapeError);
  EXPECT_THROW(kernels::channel_mul_backward(cview(a, s), cview(sc, {1, 2, 1, 1}), cview(b, s), view(a, s),
                                             view(sc, {2, 1, 1, 1})),
               ShapeError);
  EXPECT_THROW(kernels::axpy(1.0f, cview(a, s), view(c, {1, 2, 3, 5})), ShapeError);
  EXPECT_THROW(kernels::copy(cview(c, {1, 2, 3, 5}), view(a, s)), ShapeError);
}

}  // namespace
}  // namespace pipar::test
