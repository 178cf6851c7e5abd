// The small-tap convolution passes (kernels/cpu/conv_small.h: forward and weight gradient of convs with
// cg·kh·kw <= 27) against the seven-loop double reference: exact on small integers through the public
// ops (every ISA, 1-3 threads, so the dispatch and each ISA's kernels run), real-valued with a stated
// tolerance, accumulation onto a nonzero dw, guard elements around y, the dispatch rule, and a weight
// gradient whose bits do not depend on the thread count.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/conv_geometry.h"
#include "kernels/cpu/conv_small.h"
#include "kernels/ops.h"
#include "tests/kernels/gemm_configs.h"
#include "tests/random.h"
#include "tests/reference/conv_reference.h"

namespace pipar::test {
namespace {

using kernels::Conv2dParams;

struct SmallCase {
  int64_t n, c, h, w, k;
  Conv2dParams p;
  std::string str() const {
    return "x[" + std::to_string(n) + "," + std::to_string(c) + "," + std::to_string(h) + "," + std::to_string(w) +
           "] k=" + std::to_string(k) + " kernel " + std::to_string(p.kh) + "x" + std::to_string(p.kw) + " stride " +
           std::to_string(p.sh) + "x" + std::to_string(p.sw) + " pad " + std::to_string(p.ph) + "x" +
           std::to_string(p.pw);
  }
  Shape4 xs() const { return {n, c, h, w}; }
  Shape4 ws() const { return {k, c, p.kh, p.kw}; }
  Shape4 ys() const { return kernels::conv2d_out_shape(xs(), ws(), p); }
  kernels::ConvGeom geom() const { return kernels::conv_geometry(p, xs(), ys()); }
};

Conv2dParams params(int kh, int kw, int sh, int sw, int ph, int pw) {
  Conv2dParams p;
  p.kh = kh, p.kw = kw, p.sh = sh, p.sw = sw, p.ph = ph, p.pw = pw;
  return p;
}

// c in {1, 2, 3}, k in {1, 5, 32, 33} (off multiples of the 4-channel block), odd planes (5x7, 1xN,
// Nx1, 28x28, 32x32), batch 1 and 3, stride 1 and 2 (and 2x1), pad 0, 1, 2, 1x1 / 3x3 / 5x5 / 3x5
// kernels up to the 27-tap limit, and the VGG5 first layers.
const std::vector<SmallCase> kCases = {
    {1, 1, 5, 7, 1, params(3, 3, 1, 1, 1, 1)},    {3, 2, 5, 7, 5, params(3, 3, 2, 2, 0, 0)},
    {3, 1, 28, 28, 32, params(3, 3, 1, 1, 1, 1)}, {1, 3, 28, 28, 33, params(3, 3, 2, 2, 2, 2)},
    {3, 3, 32, 32, 32, params(3, 3, 1, 1, 1, 1)}, {1, 2, 1, 37, 5, params(3, 3, 1, 1, 1, 1)},
    {3, 3, 1, 37, 33, params(1, 3, 1, 2, 0, 1)},  {1, 1, 29, 1, 32, params(3, 1, 2, 1, 2, 0)},
    {3, 1, 9, 11, 5, params(5, 5, 1, 1, 2, 2)},   {1, 1, 17, 13, 33, params(5, 5, 2, 2, 0, 2)},
    {3, 3, 5, 7, 1, params(1, 1, 1, 1, 0, 0)},    {1, 2, 6, 9, 32, params(1, 1, 2, 2, 1, 0)},
    {3, 1, 13, 19, 33, params(3, 5, 2, 1, 1, 2)}, {1, 3, 3, 3, 5, params(3, 3, 1, 1, 2, 2)},
    {3, 2, 7, 5, 32, params(3, 3, 2, 1, 1, 1)},
};

View view(std::vector<float>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }
ConstView cview(const std::vector<float>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }

int64_t count_mismatches(const std::vector<float>& got, const std::vector<double>& want) {
  int64_t wrong = 0;
  for (size_t i = 0; i < want.size(); ++i) wrong += !(static_cast<double>(got[i]) == want[i]);
  return wrong;
}

// Elements with |got - ref| > rtol · mag (mag: the reference over |inputs|, the sum of |terms|).
int64_t count_outside(const std::vector<float>& got, const std::vector<double>& ref, const std::vector<double>& mag,
                      double rtol) {
  int64_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) bad += !(std::abs(got[i] - ref[i]) <= rtol * mag[i] + 1e-30);
  return bad;
}

std::vector<float> abs_of(const std::vector<float>& v) {
  std::vector<float> a(v.size());
  for (size_t i = 0; i < v.size(); ++i) a[i] = std::abs(v[i]);
  return a;
}

double norm1(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += std::abs(x);
  return s;
}

// --- dispatch rule ----------------------------------------------------------------------------------

TEST(ConvSmallTapsTest, DispatchRuleTakesFewTapsGroupsOneOnly) {
  for (const SmallCase& cc : kCases) EXPECT_TRUE(kernels::cpu::small_taps_applies(cc.geom())) << cc.str();
  const SmallCase four_channels{2, 4, 8, 8, 8, params(3, 3, 1, 1, 1, 1)};  // 36 taps: GEMM / direct paths
  EXPECT_FALSE(kernels::cpu::small_taps_applies(four_channels.geom()));
  const SmallCase wide{2, 2, 8, 8, 8, params(3, 5, 1, 1, 1, 1)};  // 30 taps
  EXPECT_FALSE(kernels::cpu::small_taps_applies(wide.geom()));
  Conv2dParams grouped = params(3, 3, 1, 1, 1, 1);
  grouped.groups = 2;
  EXPECT_FALSE(kernels::cpu::small_taps_applies(kernels::conv_geometry(grouped, {2, 2, 8, 8}, {2, 4, 8, 8})));
}

// --- exact: small integers through the public ops, every ISA and 1-3 threads -----------------------

TEST(ConvSmallTapsTest, ForwardExactOnSmallIntegersThroughOps) {
  SCOPED_TRACE(seed_trace());
  Rng rng(41);
  constexpr int64_t kGuard = 37;  // sentinel elements after y: the partial last vector must not spill
  for (const SmallCase& cc : kCases) {
    const auto x = rng.small_int_vec(cc.xs().numel()), w = rng.small_int_vec(cc.ws().numel()),
               b = rng.small_int_vec(cc.k);
    const std::vector<double> want = ref::conv2d_forward(cc.p, cc.xs(), x, cc.ws(), w, b);
    const std::vector<double> want_nb = ref::conv2d_forward(cc.p, cc.xs(), x, cc.ws(), w, std::vector<float>{});
    ASSERT_GT(norm1(want_nb), 0.0) << cc.str();  // anti-vacuity
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + cc.str());
      const int64_t ny = cc.ys().numel();
      std::vector<float> y(ny + kGuard, std::nanf(""));  // garbage must be overwritten
      for (int64_t e = ny; e < ny + kGuard; ++e) y[e] = 12345.0f;
      kernels::conv2d_forward(cc.p, cview(x, cc.xs()), cview(w, cc.ws()), cview(b, {cc.k, 1, 1, 1}), view(y, cc.ys()));
      EXPECT_EQ(count_mismatches(y, want), 0);
      for (int64_t e = ny; e < ny + kGuard; ++e) ASSERT_EQ(y[e], 12345.0f) << "guard element " << e - ny << " written";
      std::vector<float> y2(ny, std::nanf(""));
      kernels::conv2d_forward(cc.p, cview(x, cc.xs()), cview(w, cc.ws()), {}, view(y2, cc.ys()));
      EXPECT_EQ(count_mismatches(y2, want_nb), 0);
    }
  }
}

TEST(ConvSmallTapsTest, WeightGradientExactOnSmallIntegersAndAccumulatesThroughOps) {
  SCOPED_TRACE(seed_trace());
  Rng rng(42);
  for (const SmallCase& cc : kCases) {
    const auto x = rng.small_int_vec(cc.xs().numel()), dy = rng.small_int_vec(cc.ys().numel()),
               dw0 = rng.small_int_vec(cc.ws().numel());
    std::vector<double> want = ref::conv2d_backward_weight(cc.p, cc.xs(), cc.ws(), x, dy);
    ASSERT_GT(norm1(want), 0.0) << cc.str();
    for (size_t i = 0; i < want.size(); ++i) want[i] += dw0[i];  // parameter gradients accumulate
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + cc.str());
      std::vector<float> dw = dw0;
      kernels::conv2d_backward_weight(cc.p, cview(x, cc.xs()), cview(dy, cc.ys()), view(dw, cc.ws()));
      EXPECT_EQ(count_mismatches(dw, want), 0);
    }
  }
}

// --- real-valued: the small-tap entry points themselves, and the ops reaching them -------------------

// Tolerance, relative to the sum of |terms| of each output (the reference run on |x|, |w|, |dy|):
// forward 1e-5: at most 27 products and a bias summed in float, worst case 28 · 2^-24 ≈ 1.7e-6;
// weight gradient 1e-5: each vector lane sums n·ohw/vec products in order (≤ 3·32·32/4 = 768 here,
// typical error √768 · 2^-24 ≈ 1.7e-6; the worst case is not reached by random signs), then ≤ 8
// chunks and ≤ 16 lanes.
constexpr double kForwardRtol = 1e-5;
constexpr double kWeightRtol = 1e-5;

TEST(ConvSmallTapsTest, ForwardMatchesReferenceOnRealValues) {
  SCOPED_TRACE(seed_trace());
  Rng rng(43);
  for (const SmallCase& cc : kCases) {
    const auto x = rng.uniform_vec(cc.xs().numel()), w = rng.uniform_vec(cc.ws().numel()), b = rng.uniform_vec(cc.k);
    const std::vector<double> want = ref::conv2d_forward(cc.p, cc.xs(), x, cc.ws(), w, b);
    const std::vector<double> mag = ref::conv2d_forward(cc.p, cc.xs(), abs_of(x), cc.ws(), abs_of(w), abs_of(b));
    for (const CpuConfig& cfg : cpu_configs()) {
      ScopedCpuConfig scope(cfg);
      SCOPED_TRACE(cfg.str() + " " + cc.str());
      std::vector<float> y(cc.ys().numel(), std::nanf(""));
      kernels::cpu::conv2d_forward_small_taps(cc.geom(), x.data(), w.data(), b.data(), y.data());
      EXPECT_EQ(count_outside(y, want, mag, kForwardRtol), 0);
      // The public op takes this path: the same bits.
      std::vector<float> y_op(cc.ys().numel(), std::nanf(""));
      kernels::conv2d_forward(cc.p, cview(x, cc.xs()), cview(w, cc.ws()), cview(b, {cc.k, 1, 1, 1}),
                              view(y_op, cc.ys()));
      EXPECT_EQ(std::memcmp(y.data(), y_op.data(), sizeof(float) * y.size()), 0);
    }
  }
}

TEST(ConvSmallTapsTest, WeightGradientMatchesReferenceAndIsTheSameForAnyThreadCount) {
  SCOPED_TRACE(seed_trace());
  Rng rng(44);
  for (const SmallCase& cc : kCases) {
    const auto x = rng.uniform_vec(cc.xs().numel()), dy = rng.uniform_vec(cc.ys().numel()),
               dw0 = rng.uniform_vec(cc.ws().numel());
    std::vector<double> want = ref::conv2d_backward_weight(cc.p, cc.xs(), cc.ws(), x, dy);
    std::vector<double> mag = ref::conv2d_backward_weight(cc.p, cc.xs(), cc.ws(), abs_of(x), abs_of(dy));
    for (size_t i = 0; i < want.size(); ++i) want[i] += dw0[i], mag[i] += std::abs(dw0[i]);
    for (kernels::Isa isa : supported_isas()) {
      std::vector<float> first;
      for (int threads : {1, 2, 3}) {
        ScopedCpuConfig scope({isa, threads});
        SCOPED_TRACE((CpuConfig{isa, threads}.str() + " " + cc.str()));
        std::vector<float> dw = dw0;
        kernels::cpu::conv2d_backward_weight_small_taps(cc.geom(), x.data(), dy.data(), dw.data());
        EXPECT_EQ(count_outside(dw, want, mag, kWeightRtol), 0);
        std::vector<float> dw_op = dw0;
        kernels::conv2d_backward_weight(cc.p, cview(x, cc.xs()), cview(dy, cc.ys()), view(dw_op, cc.ws()));
        EXPECT_EQ(std::memcmp(dw.data(), dw_op.data(), sizeof(float) * dw.size()), 0) << "op took another path";
        // Chunks are fixed by the shapes, not the threads: bit-identical sums.
        if (first.empty()) first = dw;
        else EXPECT_EQ(std::memcmp(dw.data(), first.data(), sizeof(float) * dw.size()), 0) << "depends on threads";
      }
    }
  }
}

// The VGG5 first layers at a training batch (several tiles per plane, 2+ chunks per thread).
TEST(ConvSmallTapsTest, Vgg5FirstLayersAtBatch10) {
  SCOPED_TRACE(seed_trace());
  Rng rng(45);
  for (const SmallCase& cc : {SmallCase{10, 1, 28, 28, 32, params(3, 3, 1, 1, 1, 1)},
                              SmallCase{10, 3, 32, 32, 32, params(3, 3, 1, 1, 1, 1)}}) {
    SCOPED_TRACE(cc.str());
    const auto x = rng.uniform_vec(cc.xs().numel()), w = rng.uniform_vec(cc.ws().numel()), b = rng.uniform_vec(cc.k),
               dy = rng.uniform_vec(cc.ys().numel());
    const std::vector<double> want_y = ref::conv2d_forward(cc.p, cc.xs(), x, cc.ws(), w, b);
    const std::vector<double> mag_y = ref::conv2d_forward(cc.p, cc.xs(), abs_of(x), cc.ws(), abs_of(w), abs_of(b));
    const std::vector<double> want_dw = ref::conv2d_backward_weight(cc.p, cc.xs(), cc.ws(), x, dy);
    const std::vector<double> mag_dw = ref::conv2d_backward_weight(cc.p, cc.xs(), cc.ws(), abs_of(x), abs_of(dy));
    std::vector<float> y(cc.ys().numel(), std::nanf("")), dw(cc.ws().numel(), 0.0f);
    kernels::conv2d_forward(cc.p, cview(x, cc.xs()), cview(w, cc.ws()), cview(b, {cc.k, 1, 1, 1}), view(y, cc.ys()));
    kernels::conv2d_backward_weight(cc.p, cview(x, cc.xs()), cview(dy, cc.ys()), view(dw, cc.ws()));
    EXPECT_EQ(count_outside(y, want_y, mag_y, kForwardRtol), 0);
    // 10·784/16 ≈ 490 products per lane and chunk at most: the same 1e-5 bound (typical √490 · 2^-24).
    EXPECT_EQ(count_outside(dw, want_dw, mag_dw, kWeightRtol), 0);
  }
}

}  // namespace
}  // namespace pipar::test
