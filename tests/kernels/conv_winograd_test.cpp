// Winograd F(2x2, 3x3) convolution (kernels/cpu/conv_winograd.h) against the double reference: called
// directly on odd shapes (planes 1xN to 13x13, pad 0, 1 and 2, channels off multiples of 16, more than
// one block of 64 output channels), forward with and without bias, backward-input through the
// transposed weights and the weight gradient (F(3x3, 2x2), accumulating); exact on small integers; independent of the thread count; and through the
// public conv2d entry points, where the dispatch must pick it for the VGG5 conv2/conv3 shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/conv_geometry.h"
#include "kernels/cpu/conv_winograd.h"
#include "kernels/ops.h"
#include "tests/kernels/gemm_configs.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#include "tests/reference/conv_reference.h"

namespace pipar::test {
namespace {

using kernels::Conv2dParams;
using kernels::ConvGeom;
namespace wino = kernels::cpu::detail;

struct Case {
  int64_t n, c, h, w, k;
  int ph, pw;
  std::string str() const {
    return "x[" + std::to_string(n) + "," + std::to_string(c) + "," + std::to_string(h) + "," + std::to_string(w) +
           "] k=" + std::to_string(k) + " pad " + std::to_string(ph) + "x" + std::to_string(pw);
  }
  Conv2dParams p() const {
    Conv2dParams q;
    q.kh = q.kw = 3, q.sh = q.sw = 1, q.ph = ph, q.pw = pw, q.groups = 1;
    return q;
  }
  Shape4 xs() const { return {n, c, h, w}; }
  Shape4 ws() const { return {k, c, 3, 3}; }
  Shape4 ys() const { return kernels::conv2d_out_shape(xs(), ws(), p()); }
};

// Odd planes (7x7, 5x9, 13x13), single rows and columns, outputs of one pixel (3x3 pad 0), pad 2 (the
// backward pass of pad 0), mixed padding, batch 1 and 3, channels 3, 17, 33, 80 (c past one 64-wide
// step of nothing; k past one 64-channel block of the kernel), and the VGG5 layers.
const std::vector<Case> kCases = {
    {1, 3, 7, 7, 5, 1, 1},    {3, 17, 5, 9, 33, 1, 1},  {1, 33, 13, 13, 17, 0, 0}, {3, 16, 1, 9, 16, 1, 1},
    {2, 17, 9, 1, 20, 1, 1},  {1, 20, 3, 3, 18, 0, 0},  {2, 17, 6, 5, 19, 2, 2},   {2, 16, 7, 8, 3, 1, 0},
    {1, 24, 6, 7, 80, 1, 1},  {1, 80, 5, 6, 17, 0, 1},  {3, 3, 1, 1, 17, 1, 1},    {2, 64, 7, 7, 64, 1, 1},
    {3, 32, 14, 14, 64, 1, 1}, {2, 32, 16, 16, 64, 1, 1}, {2, 64, 8, 8, 64, 1, 1},
};

bool have_winograd() { return wino::winograd_supported(); }

std::vector<float> abs_vec(const std::vector<float>& v) {
  std::vector<float> a(v.size());
  for (size_t i = 0; i < v.size(); ++i) a[i] = std::abs(v[i]);
  return a;
}

// Every tap of filter (k, c) replaced by the sum of |w| over that filter's 9 taps: a bound on every
// entry of the transformed filter G·g·Gᵀ. F(2x2, 3x3) multiplies those entries by the tile's
// transformed inputs and sums 16 such products (±1) into each output of a 2x2 tile, so its rounding
// follows the whole filter, not the 3x3 terms of one output: where those cancel or are small (a
// one-pixel plane with 3 channels, a lone small tap), a few ulps of the filter-wide sum can exceed 1e-5
// of the output's own |terms| (measured against that scale, forward errors reached 1.8e-6 of it over 40
// seeds: a heavy tail).
std::vector<float> filter_abs_sums(const std::vector<float>& w) {
  std::vector<float> s(w.size());
  for (size_t f = 0; f < w.size(); f += 9) {
    float sum = 0;
    for (size_t t = 0; t < 9; ++t) sum += std::abs(w[f + t]);
    for (size_t t = 0; t < 9; ++t) s[f + t] = sum;
  }
  return s;
}

// Every |got - want| <= rel · scale (scale: the sum of |terms| of that output).
int64_t count_outside(const std::vector<float>& got, const std::vector<double>& want, const std::vector<double>& scale,
                      double rel) {
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += !(std::abs(got[i] - want[i]) <= rel * scale[i]);
  return bad;
}

// y = conv(x, w) + b through conv2d_winograd directly.
std::vector<float> winograd_forward(const Case& cc, const std::vector<float>& x, const std::vector<float>& w,
                                    const float* bias, int threads) {
  const ConvGeom g = kernels::conv_geometry(cc.p(), cc.xs(), cc.ys());
  std::vector<float> y(cc.ys().numel(), std::nanf(""));  // every output must be written
  wino::conv2d_winograd(g, x.data(), w.data(), wino::WinogradWeights::kForward, bias, y.data(), threads);
  return y;
}

// dx = the input gradient of conv(x, w) for dy, as the Winograd convolution of dy with the transposed
// weights (pad 2 - p), the way conv2d_backward_input calls it.
std::vector<float> winograd_backward_input(const Case& cc, const std::vector<float>& dy, const std::vector<float>& w,
                                           int threads) {
  Conv2dParams t = cc.p();
  t.ph = 2 - cc.ph, t.pw = 2 - cc.pw;
  const ConvGeom g = kernels::conv_geometry(t, cc.ys(), cc.xs());
  std::vector<float> dx(cc.xs().numel(), std::nanf(""));
  wino::conv2d_winograd(g, dy.data(), w.data(), wino::WinogradWeights::kTransposed, nullptr, dx.data(), threads);
  return dx;
}

TEST(ConvWinogradTest, ForwardMatchesReferenceWithAndWithoutBias) {
  if (!have_winograd()) GTEST_SKIP() << "Winograd path needs AVX2 or AVX-512";
  SCOPED_TRACE(seed_trace());
  Rng rng(61);
  for (const Case& cc : kCases) {
    SCOPED_TRACE(cc.str());
    const auto x = rng.uniform_vec(cc.xs().numel()), w = rng.uniform_vec(cc.ws().numel()), b = rng.uniform_vec(cc.k);
    const std::vector<double> want = ref::conv2d_forward(cc.p(), cc.xs(), x, cc.ws(), w, b);
    const std::vector<double> want_nb = ref::conv2d_forward(cc.p(), cc.xs(), x, cc.ws(), w, std::vector<float>{});
    const std::vector<double> terms =
        ref::conv2d_forward(cc.p(), cc.xs(), abs_vec(x), cc.ws(), filter_abs_sums(w), abs_vec(b));
    const std::vector<double> terms_nb =
        ref::conv2d_forward(cc.p(), cc.xs(), abs_vec(x), cc.ws(), filter_abs_sums(w), std::vector<float>{});
    // Tolerance 1e-5 of each output's sum of |x| · (filter-wide sum of |w|) (filter_abs_sums): the
    // transforms add and scale by 1/2 only, so F(2, 3) errs by a few float ulps of that sum (seen: at
    // most 3.4e-8 of it over 41 seeds); a wrong tap or tile is O(1e-2) of it.
    EXPECT_EQ(count_outside(winograd_forward(cc, x, w, b.data(), 2), want, terms, 1e-5), 0);
    EXPECT_EQ(count_outside(winograd_forward(cc, x, w, nullptr, 1), want_nb, terms_nb, 1e-5), 0);
  }
}

TEST(ConvWinogradTest, BackwardInputMatchesReference) {
  if (!have_winograd()) GTEST_SKIP() << "Winograd path needs AVX2 or AVX-512";
  SCOPED_TRACE(seed_trace());
  Rng rng(62);
  for (const Case& cc : kCases) {
    SCOPED_TRACE(cc.str());
    const auto dy = rng.uniform_vec(cc.ys().numel()), w = rng.uniform_vec(cc.ws().numel());
    const std::vector<double> want = ref::conv2d_backward_input(cc.p(), cc.xs(), cc.ws(), dy, w);
    const std::vector<double> terms =
        ref::conv2d_backward_input(cc.p(), cc.xs(), cc.ws(), abs_vec(dy), filter_abs_sums(w));
    // Tolerance 1e-5 of each entry's sum of |dy| · (filter-wide sum of |w|), as for the forward pass.
    EXPECT_EQ(count_outside(winograd_backward_input(cc, dy, w, 2), want, terms, 1e-5), 0);
  }
}

// dw = start + the weight gradient, through conv2d_winograd_backward_weight directly (it accumulates).
std::vector<float> winograd_backward_weight(const Case& cc, const std::vector<float>& x, const std::vector<float>& dy,
                                            const std::vector<float>& start, int threads) {
  const ConvGeom g = kernels::conv_geometry(cc.p(), cc.xs(), cc.ys());
  std::vector<float> dw = start;
  wino::conv2d_winograd_backward_weight(g, x.data(), dy.data(), dw.data(), threads);
  return dw;
}

TEST(ConvWinogradTest, BackwardWeightMatchesReferenceAndAccumulates) {
  if (!have_winograd()) GTEST_SKIP() << "Winograd path needs AVX2 or AVX-512";
  SCOPED_TRACE(seed_trace());
  Rng rng(66);
  for (const Case& cc : kCases) {
    SCOPED_TRACE(cc.str());
    const auto x = rng.uniform_vec(cc.xs().numel()), dy = rng.uniform_vec(cc.ys().numel()),
               start = rng.uniform_vec(cc.ws().numel());
    std::vector<double> want = ref::conv2d_backward_weight(cc.p(), cc.xs(), cc.ws(), x, dy);
    std::vector<double> terms = ref::conv2d_backward_weight(cc.p(), cc.xs(), cc.ws(), abs_vec(x), abs_vec(dy));
    for (size_t i = 0; i < want.size(); ++i) want[i] += start[i], terms[i] += std::abs(start[i]);
    // Tolerance 1e-5 of the sum of |terms| (plus |start|) over the 9 taps of each filter (k, c). F(3x3,
    // 2x2) mixes the 16 inputs of a tile and its 4 gradients into every product it sums, so each of
    // the 9 results carries rounding of the size of all 9 tap sums, not of its own: with a 1x1 output
    // plane a tap is one product x·dy, and a small one errs by ~1.4e-5 of itself (seed 684175251)
    // while the filter's other products are O(1). The transforms add and halve only, and the sums over
    // tiles run in float, so the error stays a few ulps of that sum (seen: at most 5e-8 of it over 40
    // seeds); an indexing error is O(1e-1).
    for (size_t f = 0; f < terms.size(); f += 9) {
      double sum = 0;
      for (size_t t = 0; t < 9; ++t) sum += terms[f + t];
      for (size_t t = 0; t < 9; ++t) terms[f + t] = sum;
    }
    for (int threads : {1, 2, 3}) {
      SCOPED_TRACE("threads " + std::to_string(threads));
      EXPECT_EQ(count_outside(winograd_backward_weight(cc, x, dy, start, threads), want, terms, 1e-5), 0);
    }
  }
}

// G has halves, B and A only ±1: on small integers every intermediate is a multiple of 1/4 far below
// 2^24, so the Winograd results equal the exact sums (compared with ==).
TEST(ConvWinogradTest, ExactOnSmallIntegers) {
  if (!have_winograd()) GTEST_SKIP() << "Winograd path needs AVX2 or AVX-512";
  SCOPED_TRACE(seed_trace());
  Rng rng(63);
  for (const Case& cc : kCases) {
    SCOPED_TRACE(cc.str());
    const auto x = rng.small_int_vec(cc.xs().numel()), w = rng.small_int_vec(cc.ws().numel()),
               b = rng.small_int_vec(cc.k), dy = rng.small_int_vec(cc.ys().numel());
    const std::vector<double> want = ref::conv2d_forward(cc.p(), cc.xs(), x, cc.ws(), w, b);
    const std::vector<double> want_dx = ref::conv2d_backward_input(cc.p(), cc.xs(), cc.ws(), dy, w);
    const std::vector<double> zero_y(want.size(), 0.0), zero_x(want_dx.size(), 0.0);
    EXPECT_EQ(count_outside(winograd_forward(cc, x, w, b.data(), 3), want, zero_y, 0.0), 0);  // tolerance 0
    EXPECT_EQ(count_outside(winograd_backward_input(cc, dy, w, 3), want_dx, zero_x, 0.0), 0);
    // G^T's halves meet sums of products of small integers over at most a few hundred tiles: exact too.
    const std::vector<double> want_dw = ref::conv2d_backward_weight(cc.p(), cc.xs(), cc.ws(), x, dy);
    const std::vector<float> zero_w(want_dw.size(), 0.0f);
    EXPECT_EQ(count_outside(winograd_backward_weight(cc, x, dy, zero_w, 2), want_dw, std::vector<double>(want_dw.size(), 0.0), 0.0), 0);
  }
}

// Chunks depend on the thread count, but every tile is computed the same way whichever chunk holds
// it: results are bitwise equal for 1, 2 and 3 threads.
TEST(ConvWinogradTest, IndependentOfThreadCount) {
  if (!have_winograd()) GTEST_SKIP() << "Winograd path needs AVX2 or AVX-512";
  SCOPED_TRACE(seed_trace());
  Rng rng(64);
  for (const Case& cc : {kCases[1], kCases[12]}) {
    SCOPED_TRACE(cc.str());
    const auto x = rng.uniform_vec(cc.xs().numel()), w = rng.uniform_vec(cc.ws().numel()), b = rng.uniform_vec(cc.k);
    const std::vector<float> y1 = winograd_forward(cc, x, w, b.data(), 1);
    EXPECT_EQ(winograd_forward(cc, x, w, b.data(), 2), y1);
    EXPECT_EQ(winograd_forward(cc, x, w, b.data(), 3), y1);
  }
}

// The dispatch rule: 3x3 stride 1, one group, pad <= 2, 16+ channels in and out, c·k <= 128², 128+
// tiles, AVX2 or AVX-512.
TEST(ConvWinogradTest, AppliesToThreeByThreeStrideOneWithEnoughChannels) {
  auto applies = [](Case cc, int sh, int groups, int kernel) {
    Conv2dParams p = cc.p();
    p.sh = p.sw = sh, p.groups = groups, p.kh = p.kw = kernel;
    const Shape4 ws{cc.k, cc.c / groups, kernel, kernel};
    return wino::winograd_applies(kernels::conv_geometry(p, cc.xs(), kernels::conv2d_out_shape(cc.xs(), ws, p)));
  };
  const bool simd = kernels::cpu_isa() == kernels::Isa::kAvx512 || kernels::cpu_isa() == kernels::Isa::kAvx2;
  EXPECT_EQ(applies({10, 32, 14, 14, 64, 1, 1}, 1, 1, 3), simd);  // fmnist.conv2
  EXPECT_EQ(applies({10, 64, 7, 7, 64, 1, 1}, 1, 1, 3), simd);    // fmnist.conv3
  EXPECT_EQ(applies({10, 64, 7, 7, 32, 1, 1}, 1, 1, 3), simd);    // fmnist.conv2 backward-input (transposed)
  EXPECT_FALSE(applies({10, 1, 28, 28, 32, 1, 1}, 1, 1, 3));        // conv1: too few input channels
  EXPECT_FALSE(applies({10, 3, 32, 32, 32, 1, 1}, 1, 1, 3));
  EXPECT_FALSE(applies({10, 32, 14, 14, 8, 1, 1}, 1, 1, 3));        // too few output channels
  EXPECT_FALSE(applies({10, 32, 14, 14, 64, 1, 1}, 2, 1, 3));       // stride 2
  EXPECT_FALSE(applies({10, 32, 14, 14, 64, 1, 1}, 1, 2, 3));       // groups
  EXPECT_FALSE(applies({10, 32, 14, 14, 64, 2, 2}, 1, 1, 5));       // 5x5
  EXPECT_FALSE(applies({7, 64, 7, 7, 64, 1, 1}, 1, 1, 3));          // 112 tiles: too few to pay
  EXPECT_EQ(applies({8, 64, 7, 7, 64, 1, 1}, 1, 1, 3), simd);       // 128 tiles
  EXPECT_EQ(applies({10, 128, 14, 14, 128, 1, 1}, 1, 1, 3), simd);  // ResNet18 block 5
  EXPECT_FALSE(applies({10, 256, 7, 7, 256, 1, 1}, 1, 1, 3));       // block 7: U too large to stream
  EXPECT_FALSE(applies({100, 512, 4, 4, 512, 1, 1}, 1, 1, 3));
}

// Through kernels::conv2d_forward / _backward_input / _backward_weight under every ISA and 1-3 threads: within
// tolerance of the reference always, and on AVX2 and AVX-512 bitwise equal to conv2d_winograd (the dispatch
// took it; the direct path rounds differently). c = 3 takes the other paths.
TEST(ConvWinogradTest, PublicEntryPointsDispatchToWinograd) {
  SCOPED_TRACE(seed_trace());
  Rng rng(65);
  for (const Case& cc : {kCases[1], kCases[6], kCases[11], kCases[12], kCases[13], kCases[0]}) {
    const auto x = rng.uniform_vec(cc.xs().numel()), w = rng.uniform_vec(cc.ws().numel()), b = rng.uniform_vec(cc.k),
               dy = rng.uniform_vec(cc.ys().numel());
    const std::vector<double> want = ref::conv2d_forward(cc.p(), cc.xs(), x, cc.ws(), w, b);
    const std::vector<double> terms = ref::conv2d_forward(cc.p(), cc.xs(), abs_vec(x), cc.ws(), abs_vec(w), abs_vec(b));
    const std::vector<double> want_dx = ref::conv2d_backward_input(cc.p(), cc.xs(), cc.ws(), dy, w);
    const std::vector<double> terms_dx =
        ref::conv2d_backward_input(cc.p(), cc.xs(), cc.ws(), abs_vec(dy), abs_vec(w));
    const std::vector<double> want_dw = ref::conv2d_backward_weight(cc.p(), cc.xs(), cc.ws(), x, dy);
    const std::vector<double> terms_dw = ref::conv2d_backward_weight(cc.p(), cc.xs(), cc.ws(), abs_vec(x), abs_vec(dy));
    Conv2dParams t = cc.p();  // the transposed convolution of the backward-input pass
    t.ph = 2 - cc.ph, t.pw = 2 - cc.pw;

    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + cc.str());
      std::vector<float> y(cc.ys().numel(), std::nanf("")), dx(cc.xs().numel(), std::nanf(""));
      kernels::conv2d_forward(cc.p(), cview(x, cc.xs()), cview(w, cc.ws()), cview(b, {cc.k, 1, 1, 1}), view(y, cc.ys()));
      kernels::conv2d_backward_input(cc.p(), cview(dy, cc.ys()), cview(w, cc.ws()), view(dx, cc.xs()));
      std::vector<float> dw(cc.ws().numel(), 0.0f);
      kernels::conv2d_backward_weight(cc.p(), cview(x, cc.xs()), cview(dy, cc.ys()), view(dw, cc.ws()));
      EXPECT_EQ(count_outside(y, want, terms, 1e-5), 0);  // tolerance 1e-5 of the sum of |terms|
      EXPECT_EQ(count_outside(dx, want_dx, terms_dx, 1e-5), 0);
      EXPECT_EQ(count_outside(dw, want_dw, terms_dw, 1e-5), 0);
      // Under this configuration's ISA: did the entry points have to take Winograd?
      const bool eligible = wino::winograd_applies(kernels::conv_geometry(cc.p(), cc.xs(), cc.ys()));
      const bool eligible_dx = wino::winograd_applies(kernels::conv_geometry(t, cc.ys(), cc.xs()));
      if (eligible) {
        EXPECT_EQ(y, winograd_forward(cc, x, w, b.data(), cfg.threads));
        EXPECT_EQ(dw, winograd_backward_weight(cc, x, dy, std::vector<float>(dw.size(), 0.0f), cfg.threads));
      }
      if (eligible_dx) {
        EXPECT_EQ(dx, winograd_backward_input(cc, dy, w, cfg.threads));
      }
    }
  }
}

}  // namespace
}  // namespace pipar::test
