// CPU activations (ReLU, hard-swish, hard-sigmoid) through the dispatching entry points: forward
// against the double reference, backward against central differences away from the kinks, PyTorch's
// derivative convention at the kinks, in-place use, thread counts 1 and 2, shape errors.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#include "tests/reference/ops_reference.h"

namespace pipar::test {
namespace {

using Forward = void (*)(ConstView, View, StreamRef);
using Backward = void (*)(ConstView, ConstView, View, StreamRef);

struct Activation {
  const char* name;
  Forward forward;
  Backward backward;
  double (*f)(double);
  double (*grad)(double);  // derivative as a function of x (relu: of y, the same there)
  bool backward_takes_output;
  std::vector<double> kinks;
};

const std::vector<Activation>& activations() {
  static const std::vector<Activation> a = {
      {"relu", kernels::relu_forward, kernels::relu_backward, ref::relu, ref::relu_grad_from_output, true, {0.0}},
      {"hardswish", kernels::hardswish_forward, kernels::hardswish_backward, ref::hardswish, ref::hardswish_grad,
       false, {-3.0, 3.0}},
      {"hardsigmoid", kernels::hardsigmoid_forward, kernels::hardsigmoid_backward, ref::hardsigmoid,
       ref::hardsigmoid_grad, false, {-3.0, 3.0}},
  };
  return a;
}

// Odd sizes on purpose; the last one (66,560 elements) is above the threading threshold.
std::vector<Shape4> test_shapes(Rng& rng) {
  return {{1, 1, 1, 1},
          {1, 3, 17, 33},
          {2, 3, 5, 7},
          {3, 1, 1, 257},
          {rng.integer(1, 3), rng.integer(1, 9), rng.integer(1, 17), rng.integer(1, 17)},
          {2, 8, 64, 65}};
}

// Uniform in [-5, 5], every value at least `gap` away from each kink.
std::vector<float> away_from_kinks(Rng& rng, size_t n, const std::vector<double>& kinks, double gap) {
  std::vector<float> x(n);
  for (auto& v : x) {
    bool near;
    do {
      v = rng.uniform(-5.0f, 5.0f);
      near = false;
      for (double k : kinks) near = near || std::fabs(v - k) < gap;
    } while (near);
  }
  return x;
}

// --- forward --------------------------------------------------------------------------------------------

TEST(Activation, ForwardMatchesReference) {
  SCOPED_TRACE(seed_trace());
  Rng rng(101);
  for_each_thread_count([&](int) {
    for (const Shape4 s : test_shapes(rng)) {
      SCOPED_TRACE(s.str());
      std::vector<float> x = rng.uniform_vec(s.numel(), -5.0f, 5.0f);
      const float specials[] = {-3.0f, 3.0f, 0.0f, -6.0f, 6.0f};  // the kinks themselves
      for (size_t i = 0; i < x.size() && i < 5; ++i) x[i] = specials[i];
      for (const Activation& a : activations()) {
        SCOPED_TRACE(a.name);
        std::vector<float> y(x.size(), -1.0f);
        a.forward(cview(x, s), view(y, s), {});
        // float evaluation of a product of <= 3 rounded terms: a few ulp relative, plus 1e-7 near 0.
        EXPECT_TRUE(all_close(y, ref::map(to_double(x), a.f), 1e-7, 1e-6));
        // In place (x and y alias) gives the same bits.
        std::vector<float> inplace = x;
        a.forward(cview(inplace, s), view(inplace, s), {});
        EXPECT_TRUE(all_equal(inplace, y));
      }
    }
  });
}

TEST(Activation, ReluIsExact) {
  SCOPED_TRACE(seed_trace());
  Rng rng(102);
  const Shape4 s{2, 3, 17, 33};
  const std::vector<float> x = rng.small_int_vec(s.numel(), -4, 4);
  std::vector<float> y(x.size());
  kernels::relu_forward(cview(x, s), view(y, s));
  EXPECT_TRUE(all_equal(y, ref::map(to_double(x), ref::relu)));  // exact: max(x, 0) rounds nothing
  EXPECT_GT(l2_norm(y), 0.0);
}

// --- backward -------------------------------------------------------------------------------------------

TEST(Activation, BackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace());
  Rng rng(103);
  const Shape4 s{2, 3, 5, 7};
  for (const Activation& a : activations()) {
    SCOPED_TRACE(a.name);
    // 0.05 from any kink, far more than the step h = 1e-3: each difference sees one smooth piece.
    const std::vector<float> x = away_from_kinks(rng, s.numel(), a.kinks, 0.05);
    const std::vector<float> dy = rng.uniform_vec(s.numel());
    const std::vector<double> w = to_double(dy);
    const auto loss = [&](const std::vector<double>& xd) { return dot(ref::map(xd, a.f), w); };
    const std::vector<double> expect = numeric_grad(loss, to_double(x), 1e-3);
    for_each_thread_count([&](int) {
      std::vector<float> in = x;
      if (a.backward_takes_output) {
        std::vector<float> y(x.size());
        a.forward(cview(x, s), view(y, s), {});
        in = y;
      }
      std::vector<float> dx(x.size(), NAN);
      a.backward(cview(in, s), cview(dy, s), view(dx, s), {});
      // The pieces are at most quadratic, so central differences are exact up to double rounding
      // (~1e-12); the kernel's float product dy*f'(x) is good to ~1e-7 relative.
      EXPECT_TRUE(all_close(dx, expect, 1e-6, 1e-5));
      EXPECT_GT(l2_norm(dx), 0.0);
    });
  }
}

TEST(Activation, BackwardLargeAndInPlace) {
  SCOPED_TRACE(seed_trace());
  Rng rng(104);
  const Shape4 s{2, 8, 64, 65};  // above the threading threshold
  const std::vector<float> x = rng.uniform_vec(s.numel(), -5.0f, 5.0f);
  const std::vector<float> dy = rng.uniform_vec(s.numel());
  for_each_thread_count([&](int) {
    for (const Activation& a : activations()) {
      SCOPED_TRACE(a.name);
      std::vector<float> in = x;
      if (a.backward_takes_output) a.forward(cview(x, s), view(in, s), {});
      std::vector<double> expect(x.size());
      for (size_t i = 0; i < x.size(); ++i) expect[i] = a.grad(in[i]) * dy[i];
      std::vector<float> dx(x.size());
      a.backward(cview(in, s), cview(dy, s), view(dx, s), {});
      EXPECT_TRUE(all_close(dx, expect, 1e-7, 1e-6));  // one or two float roundings
      std::vector<float> inplace = dy;  // dx aliasing dy
      a.backward(cview(in, s), cview(inplace, s), view(inplace, s), {});
      EXPECT_TRUE(all_equal(inplace, dx));
    }
  });
}

TEST(Activation, DerivativeConventionAtKinks) {
  // PyTorch: hardswish' = 0 for x < -3, x/3 + 1/2 on [-3, 3] (both ends), 1 for x > 3;
  // hardsigmoid' = 1/6 on the open (-3, 3) only; relu' (from the output y) = 1 only where y > 0.
  const std::vector<float> x = {-3.5f, -3.0f, -1.0f, 0.0f, 1.0f, 3.0f, 3.5f};
  const Shape4 s{1, 1, 1, 7};
  const std::vector<float> ones(7, 1.0f);
  std::vector<float> dx(7);
  kernels::hardswish_backward(cview(x, s), cview(ones, s), view(dx, s));
  // Exact up to the float rounding of x/3 (<= 1e-7).
  EXPECT_TRUE(all_close(dx, {0.0, -0.5, 1.0 / 6, 0.5, 5.0 / 6, 1.5, 1.0}, 1e-7, 0));
  kernels::hardsigmoid_backward(cview(x, s), cview(ones, s), view(dx, s));
  EXPECT_TRUE(all_close(dx, {0.0, 0.0, 1.0 / 6, 1.0 / 6, 1.0 / 6, 0.0, 0.0}, 2e-8, 0));
  const std::vector<float> y = {0.0f, 0.0f, 0.0f, 0.0f, 1.0f, 3.0f, 3.5f};
  kernels::relu_backward(cview(y, s), cview(ones, s), view(dx, s));
  EXPECT_TRUE(all_equal(dx, std::vector<float>{0, 0, 0, 0, 1, 1, 1}));
}

// --- errors ---------------------------------------------------------------------------------------------

TEST(Activation, WrongShapesThrow) {
  std::vector<float> a(24), b(30), c(24);
  EXPECT_THROW(kernels::relu_forward(cview(a, {1, 2, 3, 4}), view(b, {1, 2, 3, 5})), ShapeError);
  EXPECT_THROW(kernels::hardswish_forward(cview(a, {1, 2, 3, 4}), view(c, {1, 2, 4, 3})), ShapeError);
  EXPECT_THROW(kernels::hardsigmoid_backward(cview(a, {1, 2, 3, 4}), cview(b, {1, 2, 3, 5}), view(c, {1, 2, 3, 4})),
               ShapeError);
  EXPECT_THROW(kernels::relu_backward(cview(a, {1, 2, 3, 4}), cview(c, {1, 2, 3, 4}), view(b, {1, 2, 3, 5})),
               ShapeError);
}

}  // namespace
}  // namespace pipar::test
