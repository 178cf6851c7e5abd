// CPU dropout through the dispatching entry points: mask values are exactly 0 or 1/(1-p) and follow the
// counter-based RNG (seed, flat index), the kept fraction is close to 1-p, seeds reproduce and differ,
// thread counts 1 and 2 agree bit for bit, backward = dy*mask (and central differences), errors.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#include "tests/reference/ops_reference.h"

namespace pipar::test {
namespace {

struct DropoutResult {
  std::vector<float> y, mask;
};

DropoutResult run_dropout(float p, uint64_t seed, const std::vector<float>& x, Shape4 s) {
  DropoutResult r{std::vector<float>(x.size(), NAN), std::vector<float>(x.size(), NAN)};
  kernels::dropout_forward(p, seed, cview(x, s), view(r.y, s), view(r.mask, s));
  return r;
}

// --- forward ----------------------------------------------------------------------------------------------

TEST(Dropout, MaskValuesFractionAndReference) {
  SCOPED_TRACE(seed_trace());
  Rng rng(501);
  const Shape4 s{4, 16, 128, 128};  // 2^20 elements
  const std::vector<float> x = rng.uniform_vec(s.numel());
  const uint64_t seed = rng.engine()();
  for (const float p : {0.0f, 0.1f, 0.5f, 0.9f}) {
    SCOPED_TRACE(::testing::Message() << "p=" << p);
    const float keep = 1.0f / (1.0f - p);
    std::vector<std::vector<float>> masks;
    for_each_thread_count([&](int) {
      const DropoutResult r = run_dropout(p, seed, x, s);
      int64_t kept = 0, bad = 0, bad_y = 0;
      for (int64_t i = 0; i < s.numel(); ++i) {
        if (r.mask[i] == keep) ++kept;
        else if (r.mask[i] != 0.0f) ++bad;
        if (r.y[i] != x[i] * r.mask[i]) ++bad_y;  // exact: the same one float product
      }
      EXPECT_EQ(bad, 0) << "mask values other than 0 and 1/(1-p)";
      EXPECT_EQ(bad_y, 0) << "y != x*mask";
      // Binomial: sd of the kept fraction = sqrt(p(1-p)/2^20) <= 0.0005; 0.005 is 10 sd.
      const double fraction = static_cast<double>(kept) / static_cast<double>(s.numel());
      EXPECT_NEAR(fraction, 1.0 - p, 0.005);
      masks.push_back(r.mask);
    });
    ASSERT_EQ(masks.size(), 2u);
    EXPECT_TRUE(all_equal(masks[0], masks[1]));  // same bits for 1 and 2 threads
    // The mask is the counter-based rule on the flat index (what every backend computes).
    std::vector<double> expect = ref::dropout_mask(p, seed, s.numel());
    for (auto& e : expect) e = e == 0 ? 0.0 : static_cast<double>(keep);
    EXPECT_TRUE(all_equal(masks[0], expect));
  }
}

TEST(Dropout, SeedsReproduceAndDiffer) {
  SCOPED_TRACE(seed_trace());
  Rng rng(502);
  const Shape4 s{1, 3, 17, 33};
  const std::vector<float> x = rng.uniform_vec(s.numel());
  const uint64_t seed = rng.engine()();
  const DropoutResult a = run_dropout(0.5f, seed, x, s), b = run_dropout(0.5f, seed, x, s);
  const DropoutResult c = run_dropout(0.5f, seed + 1, x, s);
  EXPECT_TRUE(all_equal(a.mask, b.mask));
  EXPECT_TRUE(all_equal(a.y, b.y));
  int64_t differ = 0;
  for (int64_t i = 0; i < s.numel(); ++i) differ += a.mask[i] != c.mask[i];
  // Independent masks at p = 0.5 differ in about half of 1683 places; 25% is > 20 sd away.
  EXPECT_GT(differ, s.numel() / 4);
}

TEST(Dropout, OddSizesMatchReference) {
  SCOPED_TRACE(seed_trace());
  Rng rng(503);
  const std::vector<Shape4> shapes = {{1, 1, 1, 1}, {3, 1, 1, 17}, {2, 3, 5, 7},
                                      {rng.integer(1, 3), rng.integer(1, 9), rng.integer(1, 33), rng.integer(1, 33)}};
  for (const Shape4 s : shapes) {
    SCOPED_TRACE(s.str());
    const std::vector<float> x = rng.uniform_vec(s.numel());
    const float p = 0.3f;
    const DropoutResult r = run_dropout(p, 77, x, s);
    std::vector<double> y(s.numel());
    const std::vector<double> m = ref::dropout_mask(p, 77, s.numel());
    for (int64_t i = 0; i < s.numel(); ++i) y[i] = x[i] * m[i];
    EXPECT_TRUE(all_close(r.y, y, 0, 1e-6));  // 1/(1-p) rounded to float once, then one product
  }
}

// --- backward ---------------------------------------------------------------------------------------------

TEST(Dropout, BackwardIsDyTimesMask) {
  SCOPED_TRACE(seed_trace());
  Rng rng(504);
  const std::vector<Shape4> shapes = {{2, 3, 5, 7}, {2, 8, 64, 65}};
  for (const Shape4 s : shapes) {
    SCOPED_TRACE(s.str());
    const std::vector<float> x = rng.uniform_vec(s.numel()), dy = rng.uniform_vec(s.numel());
    const DropoutResult r = run_dropout(0.25f, 9, x, s);
    for_each_thread_count([&](int) {
      std::vector<float> dx(s.numel(), NAN);
      kernels::dropout_backward(cview(r.mask, s), cview(dy, s), view(dx, s));
      std::vector<double> expect(s.numel());
      for (int64_t i = 0; i < s.numel(); ++i) expect[i] = static_cast<double>(dy[i]) * r.mask[i];
      EXPECT_TRUE(all_close(dx, expect, 0, 1e-7));  // one float product (<= 0.5 ulp)
      if (s.numel() <= 4096) {
        // The forward is linear in x for a fixed mask: differences are exact up to double rounding.
        const std::vector<double> m = to_double(r.mask);
        const auto loss = [&](const std::vector<double>& xd) {
          double l = 0;
          for (size_t i = 0; i < xd.size(); ++i) l += xd[i] * m[i] * dy[i];
          return l;
        };
        EXPECT_TRUE(all_close(dx, numeric_grad(loss, to_double(x), 1e-3), 1e-7, 1e-6));
      }
    });
  }
}

// --- errors -----------------------------------------------------------------------------------------------

TEST(Dropout, BadArgumentsThrow) {
  std::vector<float> a(24), b(24), c(30);
  const Shape4 s{1, 2, 3, 4};
  EXPECT_THROW(kernels::dropout_forward(0.5f, 1, cview(a, s), view(b, s), view(c, {1, 2, 3, 5})), ShapeError);
  EXPECT_THROW(kernels::dropout_forward(0.5f, 1, cview(a, s), view(c, {1, 2, 3, 5}), view(b, s)), ShapeError);
  EXPECT_THROW(kernels::dropout_forward(1.0f, 1, cview(a, s), view(b, s), view(a, s)), Error);  // p must be < 1
  EXPECT_THROW(kernels::dropout_forward(-0.1f, 1, cview(a, s), view(b, s), view(a, s)), Error);
  EXPECT_THROW(kernels::dropout_backward(cview(a, s), cview(c, {1, 2, 3, 5}), view(b, s)), ShapeError);
}

}  // namespace
}  // namespace pipar::test
