// Differential privacy: the noise's moments, per-sample clipping, DP-SGD against plain SGD, and the
// RDP accountant against the values published in TensorFlow Privacy's tests.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "runtime/modes/distributed.h"
#include "runtime/privacy.h"
#include "runtime/split.h"
#include "tests/random.h"
#include "tests/scratch.h"

namespace pipar {
namespace {

std::vector<float> row_norms(const Tensor& x) {
  const int64_t n = x.shape().n, d = x.shape().per_sample();
  std::vector<float> out;
  for (int64_t i = 0; i < n; ++i) {
    double ss = 0;
    for (int64_t k = 0; k < d; ++k) ss += static_cast<double>(x.data()[i * d + k]) * x.data()[i * d + k];
    out.push_back(static_cast<float>(std::sqrt(ss)));
  }
  return out;
}

// --- noise -----------------------------------------------------------------------------------------

TEST(Privacy, NoiseHasTheStatedMoments) {
  SCOPED_TRACE(test::seed_trace());
  const uint64_t seed = test::base_seed();
  constexpr int64_t kN = 1 << 20;
  const float clip = 0.7f, sigma = 1.3f, sd = sigma * clip;
  Tensor x = Tensor::zeros({kN / 64, 4, 4, 4});  // zero rows: clipping leaves them, noise alone remains
  clip_and_noise(x, clip, sigma, seed);
  double s1 = 0, s2 = 0, s4 = 0;
  int64_t beyond3 = 0;
  for (float v : x.to_vector()) {
    const double z = v / sd;
    s1 += z, s2 += z * z, s4 += z * z * z * z;
    beyond3 += std::abs(z) > 3;
  }
  const double mean = s1 / kN, var = s2 / kN - mean * mean, kurt = s4 / kN;
  // Standard errors of a standard normal's sample moments: mean 1/sqrt(N), variance sqrt(2/N),
  // fourth moment sqrt(96/N); bounds at 5 standard errors (a false alarm ~1 in 1.7 million).
  const double n = static_cast<double>(kN);
  EXPECT_LT(std::abs(mean), 5 / std::sqrt(n));
  EXPECT_LT(std::abs(var - 1), 5 * std::sqrt(2 / n));
  EXPECT_LT(std::abs(kurt - 3), 5 * std::sqrt(96 / n));
  // P(|z| > 3) = 0.0026998; binomial standard error sqrt(p(1-p)/N).
  const double p3 = 0.0026997960632601866;
  EXPECT_LT(std::abs(static_cast<double>(beyond3) / n - p3), 5 * std::sqrt(p3 * (1 - p3) / n));
}

TEST(Privacy, NoiseIsDeterministicBySeed) {
  SCOPED_TRACE(test::seed_trace());
  test::Rng rng(1);
  const std::vector<float> v = rng.uniform_vec(3 * 17 * 5);
  auto run = [&](uint64_t seed) {
    Tensor a = Tensor::from_vector(v, {3, 17, 5, 1});
    const std::vector<float> scales = clip_and_noise(a, 0.5f, 1.0f, seed);
    EXPECT_EQ(scales.size(), 3u);
    return a.to_vector();
  };
  EXPECT_EQ(run(42), run(42));
  EXPECT_NE(run(42), run(43));
  EXPECT_EQ(gaussian(7, 12345), gaussian(7, 12345));
}

// --- clipping --------------------------------------------------------------------------------------

TEST(Privacy, ClippingBoundsEverySampleAndKeepsSmallOnes) {
  SCOPED_TRACE(test::seed_trace());
  test::Rng rng(2);
  const int64_t n = 33, d = 257;
  std::vector<float> v = rng.uniform_vec(static_cast<size_t>(n * d), -2.0f, 2.0f);
  // Some rows small (norm well under the clip), one all-zero.
  for (int64_t i = 0; i < n; i += 3)
    for (int64_t k = 0; k < d; ++k) v[static_cast<size_t>(i * d + k)] *= 1e-3f;
  for (int64_t k = 0; k < d; ++k) v[static_cast<size_t>(5 * d + k)] = 0;
  const Tensor orig = Tensor::from_vector(v, {n, d, 1, 1});
  const std::vector<float> before = row_norms(orig);
  const float clip = 3.0f;
  Tensor x = orig.clone();
  const std::vector<float> scales = clip_per_sample(x, clip);
  const std::vector<float> after = row_norms(x);
  int clipped = 0;
  for (int64_t i = 0; i < n; ++i) {
    const size_t u = static_cast<size_t>(i);
    // float rounding of d products: relative 1e-5.
    EXPECT_LE(after[u], clip * (1 + 1e-5f)) << "row " << i;
    if (before[u] <= clip) {
      EXPECT_EQ(scales[u], 1.0f);
      for (int64_t k = 0; k < d; ++k) EXPECT_EQ(x.data()[i * d + k], orig.data()[i * d + k]);
    } else {
      ++clipped;
      EXPECT_NEAR(after[u], clip, clip * 1e-5f);
      EXPECT_NEAR(scales[u], clip / before[u], 1e-6f);
    }
  }
  EXPECT_GT(clipped, 10);  // anti-vacuity: most rows (norm ~ 1.15 * sqrt(257/3) ~ 10.7) were clipped

  // The backward scales each row's gradient by its clip factor.
  Tensor g = Tensor::from_vector(std::vector<float>(static_cast<size_t>(n * d), 1.0f), {n, d, 1, 1});
  clip_backward(g, scales);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(g.data()[i * d + 7], scales[static_cast<size_t>(i)]);
  EXPECT_THROW(clip_per_sample(x, 0.0f), Error);
}

// --- DP-SGD ----------------------------------------------------------------------------------------

struct SplitFixture {
  std::unique_ptr<Model> model;
  Tensor x, y;
  explicit SplitFixture(int64_t n) {
    ModelOptions o;
    o.batch_norm = false;
    o.seed = 5;
    model = build_model("vgg5", o);
    test::Rng rng(3);
    x = Tensor::from_vector(rng.uniform_vec(static_cast<size_t>(n * 784)), {n, 1, 28, 28});
    std::vector<int32_t> ys(static_cast<size_t>(n));
    for (auto& l : ys) l = rng.integer(0, 9);
    y = Tensor::from_vector(ys, {n, 1, 1, 1});
  }
  // The device gradients of one batch, via `dev_forward`/`dev_backward`, with a fresh server part.
  template <class Fwd, class Bwd>
  void run(size_t p, Fwd dev_forward, Bwd dev_backward) {
    auto server_model = build_model("vgg5", model->options());
    ServerPart srv(*server_model, p, {});
    const int64_t n = x.shape().n;
    Tensor a = dev_forward(x);
    ServerPart::Result r = srv.train_micro(a, y, n);
    dev_backward(r.grad);
  }
  std::vector<std::vector<float>> grads(size_t p) {
    std::vector<std::vector<float>> g;
    for (Param* q : model->params(0, p)) g.push_back(q->grad.to_vector());
    return g;
  }
};

TEST(Privacy, DpSgdWithoutNoiseAndHugeClipIsPlainSgd) {
  SCOPED_TRACE(test::seed_trace());
  const size_t p = 2;
  const int64_t n = 5;
  SplitFixture f(n);
  DevicePart dev(*f.model, p, {});
  f.run(p, [&](const Tensor& x) { return dev.forward(0, x); }, [&](const Tensor& g) { dev.backward(0, g); });
  const auto plain = f.grads(p);
  f.model->zero_grad();
  DpSgdPart dp(*f.model, p, {}, 1e30f, 0.0f, 9);
  f.run(p, [&](const Tensor& x) { return dp.forward(0, x); }, [&](const Tensor& g) { dp.backward(0, g, n); });
  dp.finish(n);
  const auto priv = f.grads(p);
  ASSERT_EQ(plain.size(), priv.size());
  double norm = 0;
  for (size_t i = 0; i < plain.size(); ++i)
    for (size_t k = 0; k < plain[i].size(); ++k) {
      // Same math, different summation order (n=1 GEMMs vs n=5) and a *n then /n: fp32 rounding.
      EXPECT_NEAR(priv[i][k], plain[i][k], 1e-5f + 1e-3f * std::abs(plain[i][k])) << "param " << i << " [" << k << "]";
      norm += plain[i][k] * plain[i][k];
    }
  EXPECT_GT(norm, 0);  // anti-vacuity
  EXPECT_EQ(dp.last_norms().size(), static_cast<size_t>(n));
}

TEST(Privacy, DpSgdBoundsEverySampleContribution) {
  SCOPED_TRACE(test::seed_trace());
  const size_t p = 2;
  const int64_t n = 6;
  const float clip = 1e-3f;  // far below the per-sample gradient norms
  SplitFixture f(n);
  // Sum of the per-sample contributions: with sigma 0, finish(1) leaves it in the grads.
  DpSgdPart dp(*f.model, p, {}, clip, 0.0f, 9);
  f.run(p, [&](const Tensor& x) { return dp.forward(0, x); }, [&](const Tensor& g) { dp.backward(0, g, n); });
  for (float norm : dp.last_norms()) EXPECT_GT(norm, clip);
  dp.finish(1);
  double ss = 0;
  for (const auto& g : f.grads(p))
    for (float v : g) ss += static_cast<double>(v) * v;
  EXPECT_LE(std::sqrt(ss), n * clip * (1 + 1e-4));
  EXPECT_GT(std::sqrt(ss), 0.0);

  // One sample alone: its contribution has norm exactly the clip.
  SplitFixture one(1);
  DpSgdPart dp1(*one.model, p, {}, clip, 0.0f, 9);
  one.run(p, [&](const Tensor& x) { return dp1.forward(0, x); }, [&](const Tensor& g) { dp1.backward(0, g, 1); });
  dp1.finish(1);
  ss = 0;
  for (const auto& g : one.grads(p))
    for (float v : g) ss += static_cast<double>(v) * v;
  EXPECT_NEAR(std::sqrt(ss), clip, clip * 1e-4);

  // Noise: with sigma > 0 the grads differ from the noiseless ones by sigma*clip/batch per element.
  SplitFixture f2(n);
  DpSgdPart noisy(*f2.model, p, {}, clip, 2.0f, 9);
  f2.run(p, [&](const Tensor& x) { return noisy.forward(0, x); }, [&](const Tensor& g) { noisy.backward(0, g, n); });
  noisy.finish(n);
  double s2 = 0;
  int64_t count = 0;
  for (const auto& g : f2.grads(p))
    for (float v : g) s2 += static_cast<double>(v) * v, ++count;
  const double sd = 2.0 * clip / n, rms = std::sqrt(s2 / count);
  // The signal is at most n*clip/n = clip spread over ~19k elements: the rms is the noise's sd (2% = 4 standard errors).
  EXPECT_NEAR(rms, sd, 0.02 * sd);
}

TEST(Privacy, DpSgdRefusesBatchNorm) {
  ModelOptions o;
  o.batch_norm = true;
  auto m = build_model("vgg5", o);
  EXPECT_THROW(DpSgdPart(*m, 2, {}, 1.0f, 1.0f, 1), Error);
}

// --- accountant ------------------------------------------------------------------------------------

// Expected values: tensorflow/privacy, tensorflow_privacy/privacy/analysis/rdp_accountant_test.py
// (test_compute_rdp_no_data, _no_sampling, _scalar, _sequence; get_privacy_spent_check_target_delta).
TEST(Privacy, RdpMatchesTensorFlowPrivacy) {
  EXPECT_EQ(rdp_sampled_gaussian(0, 10, 20), 0.0);
  EXPECT_DOUBLE_EQ(rdp_sampled_gaussian(1, 10, 20), 0.1);
  // compute_rdp(0.1, 2, 10, 5) = 0.07737 (assertAlmostEqual places=5).
  EXPECT_NEAR(10 * rdp_sampled_gaussian(0.1, 2, 5), 0.07737, 5e-6);
  // compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100]) (assertAllClose rtol=1e-4): fractional and
  // integer orders.
  const std::vector<double> orders = {1.5, 2.5, 5, 50, 100};
  const std::vector<double> expected = {6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e+02};
  for (size_t i = 0; i < orders.size(); ++i)
    EXPECT_NEAR(50 * rdp_sampled_gaussian(0.01, 2.5, orders[i]), expected[i], 1e-4 * expected[i]) << "order " << orders[i];
  // Constant RDP 1.1 at orders 2..32, delta 1e-5: improved conversion picks order 32, eps 1.32783806176.
  std::vector<double> o2, r2;
  for (int a = 2; a <= 32; ++a) o2.push_back(a), r2.push_back(1.1);
  const Epsilon e = rdp_to_epsilon(o2, r2, 1e-5, RdpConversion::kImproved);
  EXPECT_NEAR(e.epsilon, 1.32783806176, 1e-9);
  EXPECT_EQ(e.order, 32);
  // Standard conversion, by hand: 1.1 + log(1e5)/31.
  EXPECT_NEAR(rdp_to_epsilon(o2, r2, 1e-5, RdpConversion::kStandard).epsilon, 1.1 + std::log(1e5) / 31, 1e-12);
}

// compute_dp_sgd_privacy(n, batch, noise, epochs, delta) with steps = ceil(epochs*n/batch), q =
// batch/n and the orders of RdpAccountant::default_orders(). Expected values: tensorflow/privacy,
// tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py — the current file (dp_accounting,
// improved conversion) and its 2019 version (standard conversion); same optimal orders in both.
TEST(Privacy, AccountantMatchesComputeDpSgdPrivacy) {
  struct Case {
    double n, batch, noise, epochs, delta, eps_improved, eps_standard, order;
  };
  const Case cases[] = {
      {60000, 150, 1.3, 15, 1e-5, 0.7242234026109595, 0.941870567, 19},
      {100000, 100, 1.0, 30, 1e-7, 1.4154988495444845, 1.70928734, 13},
      {100000000, 1024, 0.1, 10, 1e-7, 5907982.31138195, 5907984.81339406, 1.25},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(detail::concat("n=", c.n, " batch=", c.batch, " noise=", c.noise));
    RdpAccountant acc;
    acc.step(c.batch / c.n, c.noise, static_cast<int64_t>(std::ceil(c.epochs * c.n / c.batch)));
    const Epsilon imp = acc.epsilon_and_order(c.delta, RdpConversion::kImproved);
    const Epsilon std_ = acc.epsilon_and_order(c.delta, RdpConversion::kStandard);
    // Published to 7+ significant digits; ours differs only in libm rounding: relative 1e-7.
    EXPECT_NEAR(imp.epsilon, c.eps_improved, 1e-7 * c.eps_improved);
    EXPECT_NEAR(std_.epsilon, c.eps_standard, 1e-7 * c.eps_standard);
    EXPECT_EQ(imp.order, c.order);
    EXPECT_EQ(std_.order, c.order);
  }
}

// The classic Abadi et al. MNIST setting: TF-Privacy's tutorial (tensorflow/privacy, tutorials/README.md,
// "Select Parameters" table, standard conversion, delta 1e-5, batch 256 of 60000, steps = epochs *
// 60000 // 256, orders 1.1..10.9 by 0.1 and 12..63) lists eps 2.92 for noise 1.12 and 60 epochs, and
// 1.20 for noise 1.2 and 10 epochs (published to 2 decimals: tolerance 0.005).
TEST(Privacy, AccountantMatchesTheMnistTutorialTable) {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1 + x / 10.0);
  for (int a = 12; a < 64; ++a) orders.push_back(a);
  const double q = 256 / 60000.0;
  RdpAccountant a60(orders), a10(orders);
  a60.step(q, 1.12, 60 * 60000 / 256);
  a10.step(q, 1.2, 10 * 60000 / 256);
  EXPECT_NEAR(a60.epsilon(1e-5, RdpConversion::kStandard), 2.92, 0.005);
  EXPECT_NEAR(a10.epsilon(1e-5, RdpConversion::kStandard), 1.20, 0.005);
  EXPECT_LT(a60.epsilon(1e-5), a60.epsilon(1e-5, RdpConversion::kStandard));  // improved is never looser
}

TEST(Privacy, AccountantComposesAdditively) {
  RdpAccountant once, split, more, none;
  const int64_t steps = 14063;
  once.step(256 / 60000.0, 1.1, steps);
  split.step(256 / 60000.0, 1.1, steps / 2);
  split.step(256 / 60000.0, 1.1, steps - steps / 2);
  EXPECT_NEAR(once.epsilon(1e-5), split.epsilon(1e-5), 1e-9);
  more.step(256 / 60000.0, 1.1, 2 * steps);  // more steps or less noise cost more
  EXPECT_GT(more.epsilon(1e-5), once.epsilon(1e-5));
  EXPECT_EQ(none.epsilon(1e-5), 0.0);
  split.step(1.0, 0.0);  // no noise: no privacy
  EXPECT_TRUE(std::isinf(split.epsilon(1e-5)));
}

// --- wiring ----------------------------------------------------------------------------------------

// A pipar run with activation noise and DP-SGD, server and devices as threads: it trains, and every
// round's metrics line carries the epsilon of the accountant's composition for that many rounds.
TEST(Privacy, DistributedRunReportsEpsilon) {
  namespace fs = std::filesystem;
  TrainConfig c;
  c.mode = "pipar";
  c.dataset = "synthetic";
  c.norm = "none";
  c.limit_train = 400, c.limit_test = 200;
  c.epochs = 2, c.batch_size = 25, c.devices = 2, c.split = 2, c.micro_batches = 3, c.threads = 1;
  c.dp_clip = 5, c.dp_sigma = 1.5f, c.dp_sgd = true, c.dp_delta = 1e-5;
  c.out_dir = test::scratch_dir("privacy", "dp_sgd_run");
  NetConfig n;
  n.uplink_mbps = n.downlink_mbps = 0;
  n.connect_timeout_s = n.device_timeout_s = 30;
  std::vector<std::thread> threads;
  std::vector<int> codes(2, -1);
  run_server(c, n, nullptr, [&](const std::string& endpoint) {
    for (uint32_t d = 0; d < 2; ++d)
      threads.emplace_back([&, d, endpoint] {
        DeviceOptions o;
        o.connect = endpoint, o.id = d, o.timeout_s = 60;
        codes[d] = run_device(o);
      });
  });
  for (auto& t : threads) t.join();
  EXPECT_EQ(codes, (std::vector<int>{0, 0}));
  std::ifstream f(c.out_dir + "/metrics.jsonl");
  RdpAccountant expected;
  int rounds = 0;
  for (std::string line; std::getline(f, line); ++rounds) {
    const auto j = nlohmann::json::parse(line);
    // Per round and device (200 samples, 8 batches of 25): the activations once at sigma/2, then 8
    // DP-SGD steps at q = 25/200.
    expected.step(1.0, c.dp_sigma / 2.0, 1);
    expected.step(25 / 200.0, c.dp_sigma, 8);
    ASSERT_TRUE(j.contains("epsilon")) << line;
    EXPECT_NEAR(j["epsilon"].get<double>(), expected.epsilon(c.dp_delta), 1e-9);
  }
  EXPECT_EQ(rounds, 2);
  fs::remove_all(c.out_dir);
}

}  // namespace
}  // namespace pipar
