// CPU softmax cross-entropy through the dispatching entry points: forward against the double reference
// (odd n and k, large logits for stability), backward = scale*(probs - onehot) checked against central
// differences of the double loss, thread counts 1 and 2, bad labels and wrong shapes throw.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/ops.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#include "tests/reference/ops_reference.h"

namespace pipar::test {
namespace {

struct LossCase {
  int64_t n, k;
  float lo, hi;  // logits range
};

std::vector<int32_t> random_labels(Rng& rng, int64_t n, int64_t k) {
  std::vector<int32_t> l(n);
  for (auto& v : l) v = rng.integer(0, static_cast<int>(k) - 1);
  return l;
}

// --- forward ----------------------------------------------------------------------------------------------

TEST(SoftmaxCrossEntropy, ForwardMatchesReference) {
  SCOPED_TRACE(seed_trace());
  Rng rng(601);
  // Odd n and k; k = 1 (loss 0); large and offset logits (a naive exp overflows); the last case (33,410
  // logits) is above the threading threshold.
  const std::vector<LossCase> cases = {{1, 1, -5, 5},       {3, 3, -5, 5},       {17, 10, -5, 5},     {1, 257, -5, 5},
                                       {5, 33, -100, 100}, {4, 7, 990, 1010},    {rng.integer(1, 9), rng.integer(1, 40), -8, 8},
                                       {130, 257, -5, 5}};
  for_each_thread_count([&](int) {
    for (const LossCase& c : cases) {
      SCOPED_TRACE(::testing::Message() << "n=" << c.n << " k=" << c.k << " logits in [" << c.lo << ", " << c.hi << "]");
      const Shape4 ls{c.n, c.k, 1, 1}, ns{c.n, 1, 1, 1};
      const std::vector<float> logits = rng.uniform_vec(c.n * c.k, c.lo, c.hi);
      const std::vector<int32_t> labels = random_labels(rng, c.n, c.k);
      std::vector<float> probs(c.n * c.k, NAN), losses(c.n, NAN);
      kernels::softmax_cross_entropy_forward(cview(logits, ls), ciview(labels, ns), view(probs, ls), view(losses, ns));
      std::vector<double> rp, rl;
      ref::softmax_cross_entropy(c.n, c.k, to_double(logits), labels, rp, rl);
      // exp in float after subtracting the max (~1 ulp), sum in double: probs good to a few ulp.
      EXPECT_TRUE(all_close(probs, rp, 1e-7, 1e-5));
      // loss = log(sum) - (l[label] - max): absolute error ~1e-6 from the float exps, plus rounding of
      // the logits' difference (exact, Sterbenz) — 1e-5 absolute covers logits near 1000.
      EXPECT_TRUE(all_close(losses, rl, 1e-5, 1e-5));
    }
  });
}

TEST(SoftmaxCrossEntropy, NonMatrixLogitsShape) {
  // logits [n, c, h, w] are read as [n, c*h*w].
  SCOPED_TRACE(seed_trace());
  Rng rng(602);
  const Shape4 ls{2, 3, 2, 2}, ns{2, 1, 1, 1};
  const std::vector<float> logits = rng.uniform_vec(ls.numel(), -3, 3);
  const std::vector<int32_t> labels = {11, 0};
  std::vector<float> probs(ls.numel()), losses(2);
  kernels::softmax_cross_entropy_forward(cview(logits, ls), ciview(labels, ns), view(probs, ls), view(losses, ns));
  std::vector<double> rp, rl;
  ref::softmax_cross_entropy(2, 12, to_double(logits), labels, rp, rl);
  EXPECT_TRUE(all_close(probs, rp, 1e-7, 1e-5));
  EXPECT_TRUE(all_close(losses, rl, 1e-6, 1e-5));
}

// --- backward ---------------------------------------------------------------------------------------------

TEST(SoftmaxCrossEntropy, BackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace());
  Rng rng(603);
  const std::vector<LossCase> cases = {{1, 1, -3, 3}, {3, 3, -3, 3}, {17, 10, -3, 3}, {2, 33, -6, 6}};
  for (const LossCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << "n=" << c.n << " k=" << c.k);
    const Shape4 ls{c.n, c.k, 1, 1}, ns{c.n, 1, 1, 1};
    const std::vector<float> logits = rng.uniform_vec(c.n * c.k, c.lo, c.hi);
    const std::vector<int32_t> labels = random_labels(rng, c.n, c.k);
    const float scale = 1.0f / static_cast<float>(c.n);  // the mean loss
    // L = scale * sum_n loss_n, in double.
    const auto loss = [&](const std::vector<double>& l) {
      std::vector<double> p, ls_;
      ref::softmax_cross_entropy(c.n, c.k, l, labels, p, ls_);
      double s = 0;
      for (double v : ls_) s += v;
      return scale * s;
    };
    const std::vector<double> expect = numeric_grad(loss, to_double(logits), 1e-4);
    for_each_thread_count([&](int) {
      std::vector<float> probs(c.n * c.k), losses(c.n), dl(c.n * c.k, NAN);
      kernels::softmax_cross_entropy_forward(cview(logits, ls), ciview(labels, ns), view(probs, ls), view(losses, ns));
      kernels::softmax_cross_entropy_backward(cview(probs, ls), ciview(labels, ns), scale, view(dl, ls));
      // Smooth: O(h^2) ~1e-8 truncation; the kernel's probs are good to ~1e-7.
      EXPECT_TRUE(all_close(dl, expect, 1e-6, 1e-5));
      if (c.k > 1) {
        EXPECT_GT(l2_norm(dl), 0.0);
      }
      // Exactly scale*(probs - onehot), in place too (dlogits aliasing probs).
      std::vector<double> direct(c.n * c.k);
      for (int64_t i = 0; i < c.n * c.k; ++i)
        direct[i] = scale * (static_cast<double>(probs[i]) - (labels[i / c.k] == i % c.k ? 1.0 : 0.0));
      EXPECT_TRUE(all_close(dl, direct, 0, 2e-7));  // one subtraction and one product in float
      kernels::softmax_cross_entropy_backward(cview(probs, ls), ciview(labels, ns), scale, view(probs, ls));
      EXPECT_TRUE(all_equal(probs, dl));
    });
  }
}

// --- errors -----------------------------------------------------------------------------------------------

TEST(SoftmaxCrossEntropy, BadLabelThrows) {
  const Shape4 ls{3, 5, 1, 1}, ns{3, 1, 1, 1};
  std::vector<float> logits(15, 0.0f), probs(15), losses(3);
  for (const int32_t bad : {5, -1, 1000}) {
    SCOPED_TRACE(::testing::Message() << "label " << bad);
    const std::vector<int32_t> labels = {0, bad, 4};
    try {
      kernels::softmax_cross_entropy_forward(cview(logits, ls), ciview(labels, ns), view(probs, ls), view(losses, ns));
      ADD_FAILURE() << "forward accepted label " << bad;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << msg;  // names the label
      EXPECT_NE(msg.find("5"), std::string::npos) << msg;                  // and k
    }
    EXPECT_THROW(kernels::softmax_cross_entropy_backward(cview(probs, ls), ciview(labels, ns), 1.0f, view(probs, ls)),
                 Error);
  }
}

TEST(SoftmaxCrossEntropy, WrongShapesThrow) {
  std::vector<float> logits(15), probs(15), losses(3), small(14);
  std::vector<int32_t> labels = {0, 1, 2, 3};
  const Shape4 ls{3, 5, 1, 1}, ns{3, 1, 1, 1};
  EXPECT_THROW(kernels::softmax_cross_entropy_forward(cview(logits, ls), ciview(labels, {4, 1, 1, 1}), view(probs, ls),
                                                      view(losses, ns)),
               ShapeError);
  EXPECT_THROW(kernels::softmax_cross_entropy_forward(cview(logits, ls), ciview(labels, ns), view(small, {2, 7, 1, 1}),
                                                      view(losses, ns)),
               ShapeError);
  EXPECT_THROW(kernels::softmax_cross_entropy_forward(cview(logits, ls), ciview(labels, ns), view(probs, ls),
                                                      view(losses, {2, 1, 1, 1})),
               ShapeError);
  EXPECT_THROW(kernels::softmax_cross_entropy_backward(cview(probs, ls), ciview(labels, ns), 1.0f,
                                                       view(small, {2, 7, 1, 1})),
               ShapeError);
}

}  // namespace
}  // namespace pipar::test
