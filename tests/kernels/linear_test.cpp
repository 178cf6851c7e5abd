// linear through the pipar::kernels entry points against the double reference: exact on small
// integers (forward, input/weight/bias gradients, accumulation) for every ISA and 1-3 threads,
// real-valued gradients against central finite differences, and shape errors.
#include <gtest/gtest.h>

#include <algorithm>
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

// Grouped (grouped_linear_*: replicas stacked along the features): each group's outputs, input
// gradient and accumulated weight gradient are the plain layer's on its slices, against the double
// reference per group; exact on small integers, for every ISA and 1-3 threads.
TEST(LinearTest, GroupedIsEachGroupsOwnLayer) {
  SCOPED_TRACE(seed_trace());
  Rng rng(37);
  struct GroupedCase {
    LinearCase lc;
    int groups;
  };
  for (const GroupedCase& gc : {GroupedCase{{1, 1, 1}, 2}, GroupedCase{{3, 17, 5}, 3}, GroupedCase{{10, 64, 10}, 4},
                                GroupedCase{{7, 33, 17}, 5}, GroupedCase{{2, 200, 3}, 16}}) {
    const LinearCase& lc = gc.lc;
    const int64_t g = gc.groups, n = lc.n, in = lc.in, out = lc.out;
    const Shape4 xs{n, g * in, 1, 1}, ws{g * out, in, 1, 1}, ys{n, g * out, 1, 1}, bs{g * out, 1, 1, 1};
    const std::vector<float> x = rng.small_int_vec(static_cast<size_t>(xs.numel())),
                             w = rng.small_int_vec(static_cast<size_t>(ws.numel())),
                             b = rng.small_int_vec(static_cast<size_t>(bs.numel())),
                             dy = rng.small_int_vec(static_cast<size_t>(ys.numel())),
                             dw0 = rng.small_int_vec(static_cast<size_t>(ws.numel()));
    // The reference: group r's slices through the plain layer's reference.
    std::vector<double> y_ref(static_cast<size_t>(ys.numel())), dx_ref(static_cast<size_t>(xs.numel())),
        dw_ref(dw0.begin(), dw0.end());
    for (int64_t r = 0; r < g; ++r) {
      std::vector<float> xr(static_cast<size_t>(n * in)), wr(w.begin() + r * out * in, w.begin() + (r + 1) * out * in),
          dyr(static_cast<size_t>(n * out));
      for (int64_t s = 0; s < n; ++s) {
        std::copy_n(x.begin() + s * g * in + r * in, in, xr.begin() + s * in);
        std::copy_n(dy.begin() + s * g * out + r * out, out, dyr.begin() + s * out);
      }
      const LinearGrads gr = reference_grads(lc, xr, wr, dyr);
      for (int64_t s = 0; s < n; ++s) {
        for (int64_t o = 0; o < out; ++o) {
          double v = b[r * out + o];
          for (int64_t i = 0; i < in; ++i) v += static_cast<double>(xr[s * in + i]) * wr[o * in + i];
          y_ref[s * g * out + r * out + o] = v;
        }
        for (int64_t i = 0; i < in; ++i) dx_ref[s * g * in + r * in + i] = gr.dx[s * in + i];
      }
      for (int64_t j = 0; j < out * in; ++j) dw_ref[r * out * in + j] += gr.dw[j];
    }
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + lc.str() + " groups=" + std::to_string(g));
      std::vector<float> y(y_ref.size()), dx(dx_ref.size()), dw = dw0;
      kernels::grouped_linear_forward(gc.groups, cview(x, xs), cview(w, ws), cview(b, bs), view(y, ys));
      kernels::grouped_linear_backward_input(gc.groups, cview(dy, ys), cview(w, ws), view(dx, xs));
      kernels::grouped_linear_backward_weight(gc.groups, cview(x, xs), cview(dy, ys), view(dw, ws));
      EXPECT_EQ(count_mismatches(y, y_ref), 0);
      EXPECT_EQ(count_mismatches(dx, dx_ref), 0);
      EXPECT_EQ(count_mismatches(dw, dw_ref), 0);
    }
  }
  std::vector<float> x(2 * 12), w(6 * 4), y(2 * 6);
  // 6 outputs in 4 groups; 12 features for 2 groups of 4 inputs.
  EXPECT_THROW(kernels::grouped_linear_forward(4, cview(x, {2, 12, 1, 1}), cview(w, {6, 3, 1, 1}), {}, view(y, {2, 6, 1, 1})),
               ShapeError);
  EXPECT_THROW(kernels::grouped_linear_forward(2, cview(x, {2, 12, 1, 1}), cview(w, {6, 4, 1, 1}), {}, view(y, {2, 6, 1, 1})),
               ShapeError);
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
