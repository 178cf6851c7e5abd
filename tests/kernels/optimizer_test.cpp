// CPU SGD step through the dispatching entry point: a hand-computed 3-step sequence with momentum and
// weight decay (PyTorch semantics), agreement with the double reference on a large odd-sized vector for
// 1 and 2 threads, plain SGD without momentum, shape errors.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#include "tests/reference/ops_reference.h"

namespace pipar::test {
namespace {

using kernels::SgdParams;

TEST(Sgd, HandComputedThreeSteps) {
  // lr 0.1, momentum 0.5, weight decay 0.1; p0 = (1, -2); buf starts at 0.
  //   step 1, g = (0.5, 1):    g' = (0.6, 0.8)           buf = (0.6, 0.8)        p = (0.94, -2.08)
  //   step 2, g = (0.25, -1):  g' = (0.344, -1.208)      buf = (0.644, -0.808)   p = (0.8756, -1.9992)
  //   step 3, g = (0, 0.5):    g' = (0.08756, 0.30008)   buf = (0.40956, -0.10392) p = (0.834644, -1.988808)
  const SgdParams p{0.1f, 0.5f, 0.1f};
  const Shape4 s{2, 1, 1, 1};
  std::vector<float> param = {1.0f, -2.0f}, buf = {0.0f, 0.0f};
  const std::vector<std::vector<float>> grads = {{0.5f, 1.0f}, {0.25f, -1.0f}, {0.0f, 0.5f}};
  const std::vector<std::vector<double>> want_p = {{0.94, -2.08}, {0.8756, -1.9992}, {0.834644, -1.988808}};
  const std::vector<std::vector<double>> want_b = {{0.6, 0.8}, {0.644, -0.808}, {0.40956, -0.10392}};
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step + 1);
    kernels::sgd_step(p, view(param, s), cview(grads[step], s), view(buf, s));
    // A handful of float roundings of O(1) values: 1e-6 is ~10 ulp.
    EXPECT_TRUE(all_close(param, want_p[step], 1e-6, 0));
    EXPECT_TRUE(all_close(buf, want_b[step], 1e-6, 0));
  }
}

TEST(Sgd, MatchesReference) {
  SCOPED_TRACE(seed_trace());
  Rng rng(701);
  const std::vector<Shape4> shapes = {{1, 1, 1, 1}, {17, 3, 3, 3}, {33, 1, 1, 1}, {257, 129, 1, 1}};  // last > 32K
  const SgdParams p{0.05f, 0.9f, 1e-4f};
  for_each_thread_count([&](int) {
    for (const Shape4 s : shapes) {
      SCOPED_TRACE(s.str());
      std::vector<float> param = rng.uniform_vec(s.numel()), buf(s.numel(), 0.0f);
      std::vector<double> rparam = to_double(param), rbuf(s.numel(), 0.0);
      for (int step = 0; step < 3; ++step) {
        const std::vector<float> grad = rng.uniform_vec(s.numel());
        kernels::sgd_step(p, view(param, s), cview(grad, s), view(buf, s));
        ref::sgd_step(p.lr, p.momentum, p.weight_decay, rparam, to_double(grad), rbuf);
      }
      // lr, momentum, wd are float in the kernel and their float values in the reference; the rest is
      // ~10 roundings of O(1) values over 3 steps.
      EXPECT_TRUE(all_close(param, rparam, 1e-6, 1e-6));
      EXPECT_TRUE(all_close(buf, rbuf, 1e-6, 1e-6));
    }
  });
}

TEST(Sgd, NoMomentumNoDecayIsPlainSgd) {
  const SgdParams p{0.5f, 0.0f, 0.0f};
  const Shape4 s{3, 1, 1, 1};
  std::vector<float> param = {1.0f, 2.0f, 3.0f}, buf = {7.0f, 7.0f, 7.0f};  // stale buffer must not matter
  const std::vector<float> grad = {2.0f, -2.0f, 0.5f};
  kernels::sgd_step(p, view(param, s), cview(grad, s), view(buf, s));
  EXPECT_TRUE(all_equal(param, std::vector<float>{0.0f, 3.0f, 2.75f}));  // exact: powers of two
}

TEST(Sgd, WrongShapesThrow) {
  std::vector<float> a(6), b(6), c(7);
  EXPECT_THROW(kernels::sgd_step({}, view(a, {6, 1, 1, 1}), cview(c, {7, 1, 1, 1}), view(b, {6, 1, 1, 1})), ShapeError);
  EXPECT_THROW(kernels::sgd_step({}, view(a, {6, 1, 1, 1}), cview(b, {2, 3, 1, 1}), view(c, {7, 1, 1, 1})), ShapeError);
}

}  // namespace
}  // namespace pipar::test
