// linear through the pipar::kernels entry points against the double reference: exact on small
// integers (forward, input/weight/bias gradients, accumulation) for every ISA and 1-3 threads,
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

struct LinearCase {
  int64_t n, in, out;
  std::string str() const {
    return "n=" + std::to_string(n) + " in=" + std::to_string(in) + " out=" + std::to_string(out);
  }
};
// Batch 1, odd sizes, and the VGG5 layers (3136→128, 4096→128, 128→10) at micro-batch 10.
const std::vector<LinearCase> kCases = {{1, 1, 1},     {1, 17, 3},    {3, 33, 17},  {10, 3136, 128},
                                        {10, 128, 10}, {17, 257, 33}, {100, 64, 5}, {2, 4096, 128}};

View view(std::vector<float>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }
ConstView cview(const std::vector<float>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }

int64_t count_mismatches(const std::vector<float>& got, const std::vector<double>& want, double scale = 1.0) {
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) wrong += !(static_cast<double>(got[i]) == scale * want[i]);
  return wrong;
}

// Reference gradients of sum(dy ⊙ (x W^T + b)).
struct LinearGrads {
  std::vector<double> dx, dw, db;
};
LinearGrads reference_grads(const LinearCase& lc, const std::vector<float>& x, const std::vector<float>& w,
                            const std::vector<float>& dy) {
  LinearGrads g{std::vector<double>(lc.n * lc.in), std::vector<double>(lc.out * lc.in), std::vector<double>(lc.out)};
  for (int64_t s = 0; s < lc.n; ++s)
    for (int64_t o = 0; o < lc.out; ++o) {
      const double d = dy[s * lc.out + o];
      g.db[o] += d;
      for (int64_t i = 0; i < lc.in; ++i) {
        g.dx[s * lc.in + i] += d * w[o * lc.in + i];
        g.dw[o * lc.in + i] += d * x[s * lc.in + i];
      }
    }
  return g;
}

TEST(LinearTest, ExactOnSmallIntegersAndParameterGradientsAccumulate) {
  SCOPED_TRACE(seed_trace());
  Rng rng(31);
  for (const LinearCase& lc : kCases) {
    // x given as [n, c, h, w] with c*h*w = in (a flattened conv output) when in factors.
    const Shape4 xs = lc.in % 49 == 0 ? Shape4{lc.n, lc.in / 49, 7, 7} : Shape4{lc.n, lc.in, 1, 1};
    const Shape4 ws{lc.out, lc.in, 1, 1}, ys{lc.n, lc.out, 1, 1}, bs{lc.out, 1, 1, 1};
    const auto x = rng.small_int_vec(lc.n * lc.in), w = rng.small_int_vec(lc.out * lc.in), b = rng.small_int_vec(lc.out),
               dy = rng.small_int_vec(lc.n * lc.out);
    const std::vector<double> want_y = ref::linear_forward(lc.n, lc.in, lc.out, x, w, b);
    const LinearGrads want = reference_grads(lc, x, w, dy);
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + lc.str());
      std::vector<float> y(lc.n * lc.out, std::nanf("")), dx(lc.n * lc.in, std::nanf("")), dw(lc.out * lc.in, 0.0f),
          db(lc.out, 0.0f);
      kernels::linear_forward(cview(x, xs), cview(w, ws), cview(b, bs), view(y, ys));
      EXPECT_EQ(count_mismatches(y, want_y), 0);
      kernels::linear_backward_input(cview(dy, ys), cview(w, ws), view(dx, xs));
      EXPECT_EQ(count_mismatches(dx, want.dx), 0);
      for (int rep = 1; rep <= 2; ++rep) {  // accumulate: the second call doubles
        kernels::linear_backward_weight(cview(x, xs), cview(dy, ys), view(dw, ws));
        kernels::linear_backward_bias(cview(dy, ys), view(db, bs));
        EXPECT_EQ(count_mismatches(dw, want.dw, rep), 0) << "call " << rep;
        EXPECT_EQ(count_mismatches(db, want.db, rep), 0) << "call " << rep;
      }
      std::vector<float> y_nb(lc.n * lc.out, std::nanf(""));
      kernels::linear_forward(cview(x, xs), cview(w, ws), {}, view(y_nb, ys));
      const std::vector<double> want_nb = ref::linear_forward(lc.n, lc.in, lc.out, x, w, std::vector<float>{});
      EXPECT_EQ(count_mismatches(y_nb, want_nb), 0);
    }
  }
}

TEST(LinearTest, BackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace());
  Rng rng(32);
  for (const LinearCase& lc : {LinearCase{1, 5, 3}, LinearCase{3, 17, 7}, LinearCase{4, 33, 10}}) {
    const Shape4 xs{lc.n, lc.in, 1, 1}, ws{lc.out, lc.in, 1, 1}, ys{lc.n, lc.out, 1, 1}, bs{lc.out, 1, 1, 1};
    const auto x = rng.uniform_vec(lc.n * lc.in), w = rng.uniform_vec(lc.out * lc.in), b = rng.uniform_vec(lc.out),
               dy = rng.uniform_vec(lc.n * lc.out);
    const std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end()), bd(b.begin(), b.end());
    const auto fd_x = ref::finite_differences(
        xd, [&](const std::vector<double>& t) { return ref::dot(ref::linear_forward(lc.n, lc.in, lc.out, t, wd, bd), dy); });
    const auto fd_w = ref::finite_differences(
        wd, [&](const std::vector<double>& t) { return ref::dot(ref::linear_forward(lc.n, lc.in, lc.out, xd, t, bd), dy); });
    const auto fd_b = ref::finite_differences(
        bd, [&](const std::vector<double>& t) { return ref::dot(ref::linear_forward(lc.n, lc.in, lc.out, xd, wd, t), dy); });
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + lc.str());
      std::vector<float> dx(x.size()), dw(w.size(), 0.0f), db(b.size(), 0.0f);
      kernels::linear_backward_input(cview(dy, ys), cview(w, ws), view(dx, xs));
      kernels::linear_backward_weight(cview(x, xs), cview(dy, ys), view(dw, ws));
      kernels::linear_backward_bias(cview(dy, ys), view(db, bs));
      // Sums of at most 33 products of values in [-1, 1]: 1e-5 absolute + 1e-5 relative is ~100 fp32
      // ulps, far below an indexing error; the differences are exact to ~1e-12 (the loss is linear).
      auto close = [](double got, double want) { return std::abs(got - want) <= 1e-5 + 1e-5 * std::abs(want); };
      for (size_t i = 0; i < dx.size(); ++i) EXPECT_PRED2(close, dx[i], fd_x[i]) << "dx " << i;
      for (size_t i = 0; i < dw.size(); ++i) EXPECT_PRED2(close, dw[i], fd_w[i]) << "dw " << i;
      for (size_t i = 0; i < db.size(); ++i) EXPECT_PRED2(close, db[i], fd_b[i]) << "db " << i;
    }
  }
}

TEST(LinearTest, WrongShapesThrowShapeError) {
  std::vector<float> x(4 * 12), w(5 * 12), y(4 * 5), b(5);
  const Shape4 xs{4, 12, 1, 1}, ws{5, 12, 1, 1}, ys{4, 5, 1, 1};
  EXPECT_THROW(kernels::linear_forward(cview(x, xs), cview(w, {5, 11, 1, 1}), {}, view(y, ys)), ShapeError);
  EXPECT_THROW(kernels::linear_forward(cview(x, xs), cview(w, ws), {}, view(y, {4, 4, 1, 1})), ShapeError);
  EXPECT_THROW(kernels::linear_forward(cview(x, xs), cview(w, ws), cview(b, {4, 1, 1, 1}), view(y, ys)), ShapeError);
  EXPECT_THROW(kernels::linear_backward_input(cview(y, {3, 5, 1, 1}), cview(w, ws), view(x, xs)), ShapeError);
  EXPECT_THROW(kernels::linear_backward_weight(cview(x, xs), cview(y, ys), view(w, {5, 13, 1, 1})), ShapeError);
  EXPECT_THROW(kernels::linear_backward_bias(cview(y, ys), view(b, {4, 1, 1, 1})), ShapeError);
}

}  // namespace
}  // namespace pipar::test
