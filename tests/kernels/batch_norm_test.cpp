// CPU batch normalization through the dispatching entry points: training and inference forward against
// the double reference, running statistics over several steps, backward against central differences of
// the double reference, accumulation of dgamma/dbeta, thread counts 1 and 2, shape errors.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#include "tests/reference/ops_reference.h"

namespace pipar::test {
namespace {

using kernels::BatchNormParams;

// Inputs and parameters of one batch-norm call, float, with a per-channel offset and spread.
struct BnInputs {
  Shape4 s;
  std::vector<float> x, gamma, beta;
};

BnInputs make_inputs(Rng& rng, Shape4 s) {
  BnInputs in{s, std::vector<float>(s.numel()), rng.uniform_vec(s.c, 0.5f, 1.5f), rng.uniform_vec(s.c, -1.0f, 1.0f)};
  for (int64_t c = 0; c < s.c; ++c) {
    const float offset = rng.uniform(-3.0f, 3.0f), spread = rng.uniform(0.5f, 2.0f);
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t i = 0; i < s.h * s.w; ++i) in.x[(n * s.c + c) * s.h * s.w + i] = offset + spread * rng.uniform(-1, 1);
  }
  return in;
}

// Odd sizes; the last one (33,792 values) is above the threading threshold.
std::vector<Shape4> shapes(Rng& rng) {
  return {{2, 3, 5, 7}, {1, 17, 3, 3}, {4, 33, 1, 1}, {1, 1, 1, 2},
          {rng.integer(1, 4), rng.integer(1, 9), rng.integer(1, 9), rng.integer(2, 9)}, {4, 8, 32, 33}};
}

// --- forward ----------------------------------------------------------------------------------------------

TEST(BatchNorm, ForwardTrainMatchesReference) {
  SCOPED_TRACE(seed_trace());
  Rng rng(301);
  const BatchNormParams p{1e-5f, 0.1f};
  for_each_thread_count([&](int) {
    for (const Shape4 s : shapes(rng)) {
      SCOPED_TRACE(s.str());
      const BnInputs in = make_inputs(rng, s);
      std::vector<float> rm = rng.uniform_vec(s.c), rv = rng.uniform_vec(s.c, 0.5f, 2.0f);
      std::vector<double> rrm = to_double(rm), rrv = to_double(rv);
      std::vector<float> sm(s.c, NAN), si(s.c, NAN), y(s.numel(), NAN);
      const Shape4 cs{s.c, 1, 1, 1};
      kernels::batch_norm_forward_train(p, cview(in.x, s), cview(in.gamma, cs), cview(in.beta, cs), view(rm, cs),
                                        view(rv, cs), view(sm, cs), view(si, cs), view(y, s));
      ref::BatchStats st;
      const std::vector<double> ry = ref::batch_norm_train(s, to_double(in.x), to_double(in.gamma),
                                                           to_double(in.beta), p.eps, p.momentum, rrm, rrv, &st);
      // Outputs are O(1) after normalization; statistics are summed in double and rounded once, the
      // affine step adds a few float roundings: 1e-5 absolute covers it with ~50x margin.
      EXPECT_TRUE(all_close(y, ry, 1e-5, 1e-5));
      std::vector<double> invstd(s.c);
      for (int64_t c = 0; c < s.c; ++c) invstd[c] = 1.0 / std::sqrt(st.var[c] + p.eps);
      EXPECT_TRUE(all_close(sm, st.mean, 1e-6, 1e-6));  // one rounding of a double sum
      EXPECT_TRUE(all_close(si, invstd, 0, 1e-6));
      EXPECT_TRUE(all_close(rm, rrm, 1e-6, 1e-6));
      EXPECT_TRUE(all_close(rv, rrv, 1e-6, 1e-6));
      EXPECT_GT(l2_norm(y), 0.0);
    }
  });
}

TEST(BatchNorm, RunningStatisticsOverSeveralSteps) {
  SCOPED_TRACE(seed_trace());
  Rng rng(302);
  const Shape4 s{3, 5, 4, 3};
  const Shape4 cs{s.c, 1, 1, 1};
  const BatchNormParams p{1e-3f, 0.25f};
  std::vector<float> rm(s.c, 0.0f), rv(s.c, 1.0f), sm(s.c), si(s.c), y(s.numel());  // PyTorch's initial values
  std::vector<double> rrm(s.c, 0.0), rrv(s.c, 1.0);
  for (int step = 0; step < 5; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    const BnInputs in = make_inputs(rng, s);
    kernels::batch_norm_forward_train(p, cview(in.x, s), cview(in.gamma, cs), cview(in.beta, cs), view(rm, cs),
                                      view(rv, cs), view(sm, cs), view(si, cs), view(y, s));
    ref::batch_norm_train(s, to_double(in.x), to_double(in.gamma), to_double(in.beta), p.eps, p.momentum, rrm, rrv);
    // Each step rounds the running values to float once (~6e-8 relative); 5 steps stay far below 1e-6.
    EXPECT_TRUE(all_close(rm, rrm, 1e-6, 1e-6));
    EXPECT_TRUE(all_close(rv, rrv, 1e-6, 1e-6));
  }
  // The running variance uses the unbiased estimate: with m = 36 values, a biased update would differ
  // by var/35, i.e. by far more than the tolerance above; check one channel by hand on a known batch.
  std::vector<float> x(2 * 1 * 1 * 2);
  x = {1.0f, 3.0f, 5.0f, 7.0f};  // mean 4, biased var 5, unbiased var 20/3
  std::vector<float> g1{1.0f}, b1{0.0f}, m1{0.0f}, v1{1.0f}, s1(1), i1(1), y1(4);
  const Shape4 one{1, 1, 1, 1};
  kernels::batch_norm_forward_train({1e-5f, 0.1f}, cview(x, {2, 1, 1, 2}), cview(g1, one), cview(b1, one),
                                    view(m1, one), view(v1, one), view(s1, one), view(i1, one), view(y1, {2, 1, 1, 2}));
  EXPECT_NEAR(m1[0], 0.4, 1e-6);                           // 0.9*0 + 0.1*4
  EXPECT_NEAR(v1[0], 0.9 + 0.1 * 20.0 / 3.0, 1e-6);        // 0.9*1 + 0.1*(20/3)
  EXPECT_NEAR(s1[0], 4.0, 1e-6);
  EXPECT_NEAR(i1[0], 1.0 / std::sqrt(5.0 + 1e-5), 1e-6);   // saved invstd uses the biased var
}

TEST(BatchNorm, ForwardInferenceMatchesReference) {
  SCOPED_TRACE(seed_trace());
  Rng rng(303);
  const BatchNormParams p{1e-5f, 0.1f};
  for_each_thread_count([&](int) {
    for (const Shape4 s : shapes(rng)) {
      SCOPED_TRACE(s.str());
      const BnInputs in = make_inputs(rng, s);
      const std::vector<float> rm = rng.uniform_vec(s.c, -3.0f, 3.0f), rv = rng.uniform_vec(s.c, 0.2f, 4.0f);
      const Shape4 cs{s.c, 1, 1, 1};
      std::vector<float> y(s.numel(), NAN);
      kernels::batch_norm_forward_inference(p, cview(in.x, s), cview(in.gamma, cs), cview(in.beta, cs), cview(rm, cs),
                                            cview(rv, cs), view(y, s));
      const std::vector<double> ry = ref::batch_norm_apply(s, to_double(in.x), to_double(rm), to_double(rv),
                                                           to_double(in.gamma), to_double(in.beta), p.eps);
      // |y| up to ~10 here (running stats differ from the batch's); a few float roundings.
      EXPECT_TRUE(all_close(y, ry, 1e-5, 1e-5));
    }
  });
}

// --- backward ---------------------------------------------------------------------------------------------

TEST(BatchNorm, BackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace());
  Rng rng(304);
  const BatchNormParams p{1e-5f, 0.1f};
  const std::vector<Shape4> small = {{2, 3, 5, 7}, {1, 4, 3, 3}, {5, 2, 1, 1}, {1, 1, 1, 3}};
  for (const Shape4 s : small) {
    SCOPED_TRACE(s.str());
    const Shape4 cs{s.c, 1, 1, 1};
    const BnInputs in = make_inputs(rng, s);
    const std::vector<float> dy = rng.uniform_vec(s.numel());
    const std::vector<double> w = to_double(dy), xd = to_double(in.x), gd = to_double(in.gamma),
                              bd = to_double(in.beta);
    // L = sum(y*dy), y from the batch statistics of x (the training forward), all in double.
    const auto loss = [&](const std::vector<double>& x, const std::vector<double>& g, const std::vector<double>& b) {
      const ref::BatchStats st = ref::batch_stats(s, x);
      return dot(ref::batch_norm_apply(s, x, st.mean, st.var, g, b, p.eps), w);
    };
    const double h = 1e-4;  // smooth function: O(h^2) truncation ~1e-8, rounding ~1e-16/h ~1e-12
    const auto gx = numeric_grad([&](const std::vector<double>& v) { return loss(v, gd, bd); }, xd, h);
    const auto gg = numeric_grad([&](const std::vector<double>& v) { return loss(xd, v, bd); }, gd, h);
    const auto gb = numeric_grad([&](const std::vector<double>& v) { return loss(xd, gd, v); }, bd, h);
    for_each_thread_count([&](int) {
      std::vector<float> rm(s.c, 0.0f), rv(s.c, 1.0f), sm(s.c), si(s.c), y(s.numel());
      kernels::batch_norm_forward_train(p, cview(in.x, s), cview(in.gamma, cs), cview(in.beta, cs), view(rm, cs),
                                        view(rv, cs), view(sm, cs), view(si, cs), view(y, s));
      std::vector<float> dx(s.numel(), NAN), dgamma(s.c, 0.0f), dbeta(s.c, 0.0f);
      kernels::batch_norm_backward(cview(in.x, s), cview(dy, s), cview(in.gamma, cs), cview(sm, cs), cview(si, cs),
                                   view(dx, s), view(dgamma, cs), view(dbeta, cs));
      // dx is a difference of O(gamma*invstd*|dy|) terms; the kernel's saved stats are float (~6e-8
      // relative) and its sums double: 2e-5 absolute + 1e-4 relative leaves ~20x margin.
      EXPECT_TRUE(all_close(dx, gx, 2e-5, 1e-4));
      EXPECT_TRUE(all_close(dgamma, gg, 2e-5, 1e-4));  // sums of up to ~70 O(1) terms
      EXPECT_TRUE(all_close(dbeta, gb, 2e-5, 1e-4));
      EXPECT_GT(l2_norm(dx), 0.0);

      // Parameter gradients accumulate: a second call doubles them (x + x is exact in float); dx is
      // overwritten, so it comes out the same.
      const std::vector<float> dx1 = dx, dg1 = dgamma, db1 = dbeta;
      kernels::batch_norm_backward(cview(in.x, s), cview(dy, s), cview(in.gamma, cs), cview(sm, cs), cview(si, cs),
                                   view(dx, s), view(dgamma, cs), view(dbeta, cs));
      for (int64_t c = 0; c < s.c; ++c) {
        EXPECT_EQ(dgamma[c], 2 * dg1[c]);
        EXPECT_EQ(dbeta[c], 2 * db1[c]);
      }
      EXPECT_TRUE(all_equal(dx, dx1));
    });
  }
}

TEST(BatchNorm, BackwardLargeAgreesAcrossThreadCounts) {
  // Above the threading threshold: each channel is summed by one thread in a fixed order, so the
  // result is bit-identical for 1 and 2 threads; and it matches the closed form in double.
  SCOPED_TRACE(seed_trace());
  Rng rng(305);
  const Shape4 s{4, 8, 32, 33}, cs{s.c, 1, 1, 1};
  const BnInputs in = make_inputs(rng, s);
  const std::vector<float> dy = rng.uniform_vec(s.numel());
  std::vector<float> rm(s.c, 0.0f), rv(s.c, 1.0f), sm(s.c), si(s.c), y(s.numel());
  kernels::batch_norm_forward_train({}, cview(in.x, s), cview(in.gamma, cs), cview(in.beta, cs), view(rm, cs),
                                    view(rv, cs), view(sm, cs), view(si, cs), view(y, s));
  // Closed form in double from the kernel's saved statistics.
  const int64_t plane = s.h * s.w;
  const double m = static_cast<double>(s.n * plane);
  std::vector<double> edx(s.numel()), edg(s.c), edb(s.c);
  for (int64_t c = 0; c < s.c; ++c) {
    double sdy = 0, sdyx = 0;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t i = 0; i < plane; ++i) {
        const int64_t k = (n * s.c + c) * plane + i;
        sdy += dy[k];
        sdyx += dy[k] * (in.x[k] - static_cast<double>(sm[c])) * si[c];
      }
    edg[c] = sdyx;
    edb[c] = sdy;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t i = 0; i < plane; ++i) {
        const int64_t k = (n * s.c + c) * plane + i;
        const double xhat = (in.x[k] - static_cast<double>(sm[c])) * si[c];
        edx[k] = in.gamma[c] * static_cast<double>(si[c]) * (dy[k] - sdy / m - xhat * sdyx / m);
      }
  }
  std::vector<std::vector<float>> results;
  for_each_thread_count([&](int) {
    std::vector<float> dx(s.numel()), dg(s.c, 0.0f), db(s.c, 0.0f);
    kernels::batch_norm_backward(cview(in.x, s), cview(dy, s), cview(in.gamma, cs), cview(sm, cs), cview(si, cs),
                                 view(dx, s), view(dg, cs), view(db, cs));
    EXPECT_TRUE(all_close(dx, edx, 1e-6, 1e-5));  // a few float roundings of O(1) terms
    EXPECT_TRUE(all_close(dg, edg, 1e-4, 1e-5));  // 4224-term sums, rounded once from double
    EXPECT_TRUE(all_close(db, edb, 1e-4, 1e-5));
    results.push_back(dx);
  });
  ASSERT_EQ(results.size(), 2u);
  EXPECT_TRUE(all_equal(results[0], results[1]));
}

// --- errors -----------------------------------------------------------------------------------------------

TEST(BatchNorm, WrongShapesThrow) {
  const Shape4 s{2, 3, 4, 4}, cs{3, 1, 1, 1}, bad{4, 1, 1, 1};
  std::vector<float> x(s.numel()), y(s.numel()), c3(3), c4(4), a(3), b(3), d(3), e(3);
  EXPECT_THROW(kernels::batch_norm_forward_train({}, cview(x, s), cview(c4, bad), cview(c3, cs), view(a, cs),
                                                 view(b, cs), view(d, cs), view(e, cs), view(y, s)),
               ShapeError);
  EXPECT_THROW(kernels::batch_norm_forward_train({}, cview(x, s), cview(c3, cs), cview(c3, cs), view(a, cs),
                                                 view(b, cs), view(d, cs), view(e, cs), view(y, {2, 3, 4, 3})),
               ShapeError);
  // One value per channel: the batch variance is undefined in training.
  EXPECT_THROW(kernels::batch_norm_forward_train({}, cview(x, {1, 3, 1, 1}), cview(c3, cs), cview(c3, cs),
                                                 view(a, cs), view(b, cs), view(d, cs), view(e, cs),
                                                 view(y, {1, 3, 1, 1})),
               ShapeError);
  EXPECT_THROW(kernels::batch_norm_forward_inference({}, cview(x, s), cview(c3, cs), cview(c3, cs), cview(c4, bad),
                                                     cview(c3, cs), view(y, s)),
               ShapeError);
  EXPECT_THROW(kernels::batch_norm_backward(cview(x, s), cview(y, {2, 3, 2, 8}), cview(c3, cs), cview(c3, cs),
                                            cview(c3, cs), view(x, s), view(a, cs), view(b, cs)),
               ShapeError);
  EXPECT_THROW(kernels::batch_norm_backward(cview(x, s), cview(y, s), cview(c3, cs), cview(c3, cs), cview(c3, cs),
                                            view(x, s), view(c4, bad), view(b, cs)),
               ShapeError);
}

}  // namespace
}  // namespace pipar::test
