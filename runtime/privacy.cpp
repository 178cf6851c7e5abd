// Differential privacy: activation clipping and noise, DP-SGD, and the RDP accountant.
#include "runtime/privacy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>

#include "kernels/rng.h"

namespace pipar {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

void require_cpu(const Tensor& t, const char* what) {
  if (!t.defined() || t.device() != Device::kCpu || t.dtype() != DType::kF32)
    throw Error(std::string(what) + ": needs a defined float32 CPU tensor");
}

// log(exp(a) + exp(b)) and log(exp(a) - exp(b)) (a >= b) without overflow.
double log_add(double a, double b) {
  if (a == -kInf) return b;
  if (b == -kInf) return a;
  const double hi = std::max(a, b);
  return hi + std::log1p(std::exp(std::min(a, b) - hi));
}
double log_sub(double a, double b) {
  if (b == -kInf) return a;
  if (b >= a) return -kInf;  // only rounding can get here: the series' partial sums stay positive
  return a + std::log1p(-std::exp(b - a));
}

// log(erfc(x)); for large x erfc underflows, so use its asymptotic series (relative error < 1e-9
// at x >= 20).
double log_erfc(double x) {
  if (x < 20.0) return std::log(std::erfc(x));
  const double r = 1.0 / (x * x);
  return -x * x - std::log(x) - 0.5 * std::log(std::numbers::pi) +
         std::log1p(r * (-0.5 + r * (0.75 + r * (-1.875 + r * 6.5625))));
}

// log A_alpha for integer alpha: A = sum_i C(a,i) (1-q)^(a-i) q^i exp((i^2 - i) / (2 sigma^2)).
double log_a_int(double q, double sigma, int64_t alpha) {
  double log_a = -kInf;
  const double lq = std::log(q), l1q = std::log1p(-q), a = static_cast<double>(alpha);
  for (int64_t i = 0; i <= alpha; ++i) {
    const double di = static_cast<double>(i);
    const double log_coef = std::lgamma(a + 1) - std::lgamma(di + 1) - std::lgamma(a - di + 1);
    log_a = log_add(log_a, log_coef + di * lq + (a - di) * l1q + (di * di - di) / (2 * sigma * sigma));
  }
  return log_a;
}

// log A_alpha for fractional alpha: the series of Mironov, Talwar, Zhang 2019 (Sec. 3.3), split at
// z0 = sigma^2 log(1/q - 1) + 1/2, summed until both terms fall below e^-30.
double log_a_frac(double q, double sigma, double alpha) {
  double log_a0 = -kInf, log_a1 = -kInf;
  const double z0 = sigma * sigma * std::log(1 / q - 1) + 0.5;
  const double lq = std::log(q), l1q = std::log1p(-q), s2 = std::sqrt(2.0) * sigma;
  double log_coef = 0;  // log |C(alpha, i)|, by the recurrence C(a,i) = C(a,i-1) (a-i+1)/i
  bool positive = true;
  for (int i = 0; i < 100000; ++i) {
    if (i > 0) {
      const double f = (alpha - i + 1) / i;
      log_coef += std::log(std::abs(f));
      if (f < 0) positive = !positive;
    }
    const double di = i, j = alpha - di;
    const double log_t0 = log_coef + di * lq + j * l1q;
    const double log_t1 = log_coef + j * lq + di * l1q;
    const double log_e0 = std::log(0.5) + log_erfc((di - z0) / s2);
    const double log_e1 = std::log(0.5) + log_erfc((z0 - j) / s2);
    const double log_s0 = log_t0 + (di * di - di) / (2 * sigma * sigma) + log_e0;
    const double log_s1 = log_t1 + (j * j - j) / (2 * sigma * sigma) + log_e1;
    if (positive) {
      log_a0 = log_add(log_a0, log_s0);
      log_a1 = log_add(log_a1, log_s1);
    } else {
      log_a0 = log_sub(log_a0, log_s0);
      log_a1 = log_sub(log_a1, log_s1);
    }
    if (std::max(log_s0, log_s1) < -30) break;
  }
  return log_add(log_a0, log_a1);
}

}  // namespace

// --- noise -----------------------------------------------------------------------------------------

float gaussian(uint64_t seed, uint64_t index) {
  const uint64_t pair = index >> 1;
  constexpr double k53 = 1.0 / 9007199254740992.0;  // 2^-53
  const double u1 = static_cast<double>((hash64(seed, 2 * pair) >> 11) + 1) * k53;  // (0, 1]
  const double u2 = static_cast<double>(hash64(seed, 2 * pair + 1) >> 11) * k53;    // [0, 1)
  const double r = std::sqrt(-2.0 * std::log(u1)), t = 2.0 * std::numbers::pi * u2;
  return static_cast<float>((index & 1) ? r * std::sin(t) : r * std::cos(t));
}

void add_gaussian_noise(Tensor& x, float stddev, uint64_t seed) {
  require_cpu(x, "add_gaussian_noise");
  if (stddev == 0.0f) return;
  float* p = x.data();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] += stddev * gaussian(seed, static_cast<uint64_t>(i));
}

// --- cut-layer activation privacy ------------------------------------------------------------------

std::vector<float> clip_per_sample(Tensor& x, float clip) {
  require_cpu(x, "clip_per_sample");
  if (!(clip > 0.0f)) throw Error(detail::concat("clip_per_sample: the clip norm must be > 0, got ", clip));
  const int64_t n = x.shape().n, d = x.shape().per_sample();
  std::vector<float> scales(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float* row = x.data() + i * d;
    double ss = 0;
    for (int64_t k = 0; k < d; ++k) ss += static_cast<double>(row[k]) * row[k];
    const double norm = std::sqrt(ss);
    const float s = norm > clip ? static_cast<float>(clip / norm) : 1.0f;
    if (s != 1.0f)
      for (int64_t k = 0; k < d; ++k) row[k] *= s;
    scales[static_cast<size_t>(i)] = s;
  }
  return scales;
}

std::vector<float> clip_and_noise(Tensor& activation, float clip, float sigma, uint64_t seed) {
  if (sigma < 0.0f) throw Error(detail::concat("clip_and_noise: sigma must be >= 0, got ", sigma));
  std::vector<float> scales = clip_per_sample(activation, clip);
  add_gaussian_noise(activation, sigma * clip, seed);
  return scales;
}

void clip_backward(Tensor& grad, const std::vector<float>& scales) {
  require_cpu(grad, "clip_backward");
  if (static_cast<int64_t>(scales.size()) != grad.shape().n)
    throw Error(detail::concat("clip_backward: ", scales.size(), " scales for a gradient of ", grad.shape().str()));
  const int64_t d = grad.shape().per_sample();
  for (size_t i = 0; i < scales.size(); ++i)
    if (scales[i] != 1.0f)
      for (int64_t k = 0; k < d; ++k) grad.data()[static_cast<int64_t>(i) * d + k] *= scales[i];
}

// --- DP-SGD ----------------------------------------------------------------------------------------

DpSgd::DpSgd(std::vector<Param*> params, float clip, float sigma, uint64_t seed)
    : params_(std::move(params)), clip_(clip), sigma_(sigma), seed_(seed) {
  if (!(clip > 0.0f) || sigma < 0.0f) throw Error(detail::concat("DP-SGD needs clip > 0 and sigma >= 0, got ", clip, ", ", sigma));
  for (Param* p : params_) {
    require_cpu(p->grad, "DP-SGD");
    sum_.push_back(Tensor::zeros(p->grad.shape()));
  }
}

void DpSgd::begin_sample() { Sgd::zero_grad(params_); }

float DpSgd::end_sample(float grad_scale) {
  double ss = 0;
  for (Param* p : params_) {
    const float* g = p->grad.data();
    for (int64_t k = 0; k < p->grad.numel(); ++k) ss += static_cast<double>(g[k]) * g[k];
  }
  const double norm = std::sqrt(ss) / grad_scale;
  const double s = (norm > clip_ ? clip_ / norm : 1.0) / grad_scale;
  for (size_t i = 0; i < params_.size(); ++i)
    kernels::axpy(static_cast<float>(s), params_[i]->grad.view(), sum_[i].view());
  ++samples_;
  return static_cast<float>(norm);
}

void DpSgd::finish(int64_t batch_size) {
  if (batch_size <= 0) throw Error(detail::concat("DP-SGD: batch size ", batch_size));
  const float inv = 1.0f / static_cast<float>(batch_size);
  // One noise stream per (step, parameter): the same seed gives the same noise on every run.
  const uint64_t step_seed = hash64(seed_, steps_++);
  for (size_t i = 0; i < params_.size(); ++i) {
    add_gaussian_noise(sum_[i], sigma_ * clip_, hash64(step_seed, i));
    kernels::copy(sum_[i].view(), params_[i]->grad.view());
    kernels::scale(inv, params_[i]->grad.view());
  }
  clear();
}

void DpSgd::clear() {
  for (Tensor& t : sum_) t.zero();
  samples_ = 0;
}

DpSgdPart::DpSgdPart(Model& m, size_t split, kernels::SgdParams sgd, float clip, float sigma, uint64_t seed)
    : m_(m), split_(split), opt_(sgd), params_((check_split(m, split), m.params(0, split))),
      dp_(params_, clip, sigma, seed) {
  if (!m.buffers().empty())
    throw Error("DP-SGD needs a model without batch-norm (per-sample gradients are ill-defined with it): use --norm none");
  ctx_.device = m.device();
  ctx_.training = true;
  Sgd::zero_grad(params_);
}

Tensor DpSgdPart::forward(int micro, const Tensor& x) {
  auto [it, fresh] = tapes_.try_emplace(micro);
  if (!fresh) throw Error(detail::concat("DP-SGD device part: micro-batch ", micro, " is already in flight"));
  require_cpu(x, "DP-SGD device part");
  const Shape4 s = x.shape();
  it->second.resize(static_cast<size_t>(s.n));
  Tensor out;
  for (int64_t i = 0; i < s.n; ++i) {
    Tensor xi = Tensor::empty({1, s.c, s.h, s.w});
    std::copy(x.data() + i * s.per_sample(), x.data() + (i + 1) * s.per_sample(), xi.data());
    ctx_.seed = hash64(static_cast<uint64_t>(micro), static_cast<uint64_t>(i));
    Tensor yi = m_.forward(xi, &it->second[static_cast<size_t>(i)], ctx_, 0, split_);
    const Shape4 ys = yi.shape();
    if (!out.defined()) out = Tensor::empty({s.n, ys.c, ys.h, ys.w});
    std::copy(yi.data(), yi.data() + ys.numel(), out.data() + i * ys.numel());
  }
  return out;
}

void DpSgdPart::backward(int micro, const Tensor& grad, int64_t batch_size) {
  auto it = tapes_.find(micro);
  if (it == tapes_.end())
    throw Error(detail::concat("DP-SGD device part: gradient for micro-batch ", micro, " that is not in flight"));
  require_cpu(grad, "DP-SGD device part");
  const Shape4 s = grad.shape();
  if (static_cast<size_t>(s.n) != it->second.size())
    throw Error(detail::concat("DP-SGD device part: gradient ", s.str(), " for a micro-batch of ", it->second.size()));
  Context c = ctx_;
  c.input_grad = false;
  norms_.clear();
  for (int64_t i = 0; i < s.n; ++i) {
    Tensor gi = Tensor::empty({1, s.c, s.h, s.w});
    std::copy(grad.data() + i * s.per_sample(), grad.data() + (i + 1) * s.per_sample(), gi.data());
    dp_.begin_sample();
    m_.backward(gi, it->second[static_cast<size_t>(i)], c, 0, split_);
    norms_.push_back(dp_.end_sample(1.0f / static_cast<float>(batch_size)));
  }
  tapes_.erase(it);
}

void DpSgdPart::step(int64_t batch_size) {
  dp_.finish(batch_size);
  opt_.step(params_);
  Sgd::zero_grad(params_);
}

// --- accounting ------------------------------------------------------------------------------------

double rdp_sampled_gaussian(double q, double sigma, double alpha) {
  if (!(q >= 0 && q <= 1) || !(sigma >= 0) || !(alpha > 1))
    throw Error(detail::concat("rdp_sampled_gaussian: needs 0 <= q <= 1, sigma >= 0, alpha > 1; got q=", q,
                               " sigma=", sigma, " alpha=", alpha));
  if (q == 0) return 0;
  if (sigma == 0 || std::isinf(alpha)) return kInf;
  if (q == 1) return alpha / (2 * sigma * sigma);
  const double log_a = alpha == std::floor(alpha) ? log_a_int(q, sigma, static_cast<int64_t>(alpha))
                                                  : log_a_frac(q, sigma, alpha);
  return log_a / (alpha - 1);
}

Epsilon rdp_to_epsilon(const std::vector<double>& orders, const std::vector<double>& rdp, double delta,
                       RdpConversion conversion) {
  if (orders.size() != rdp.size() || orders.empty())
    throw Error(detail::concat("rdp_to_epsilon: ", orders.size(), " orders and ", rdp.size(), " RDP values"));
  if (!(delta > 0 && delta < 1)) throw Error(detail::concat("rdp_to_epsilon: delta must be in (0, 1), got ", delta));
  Epsilon best{kInf, orders[0]};
  for (size_t i = 0; i < orders.size(); ++i) {
    const double a = orders[i], r = rdp[i];
    double eps = kInf;
    if (conversion == RdpConversion::kStandard) {
      eps = r + std::log(1 / delta) / (a - 1);
    } else if (delta * delta + std::expm1(-r) > 0) {
      eps = 0;  // delta <= sqrt(1 - exp(-KL)) already: pure bound via the KL divergence
    } else if (a > 1.01) {  // the bound is numerically unstable (and useless) as a -> 1
      eps = r + std::log1p(-1 / a) - std::log(delta * a) / (a - 1);
    }
    if (eps < best.epsilon) best = {eps, a};
  }
  best.epsilon = std::max(0.0, best.epsilon);
  return best;
}

std::vector<double> RdpAccountant::default_orders() {
  std::vector<double> o = {1.25, 1.5, 1.75, 2., 2.25, 2.5, 3., 3.5, 4., 4.5};
  for (int a = 5; a < 64; ++a) o.push_back(a);
  for (double a : {128., 256., 512.}) o.push_back(a);
  return o;
}

RdpAccountant::RdpAccountant(std::vector<double> orders) : orders_(std::move(orders)), rdp_(orders_.size(), 0.0) {}

void RdpAccountant::step(double q, double sigma, int64_t steps) {
  if (steps < 0) throw Error(detail::concat("RdpAccountant::step: ", steps, " steps"));
  if (steps == 0) return;
  for (size_t i = 0; i < orders_.size(); ++i) rdp_[i] += static_cast<double>(steps) * rdp_sampled_gaussian(q, sigma, orders_[i]);
}

double RdpAccountant::epsilon(double delta, RdpConversion conversion) const {
  return epsilon_and_order(delta, conversion).epsilon;
}

Epsilon RdpAccountant::epsilon_and_order(double delta, RdpConversion conversion) const {
  return rdp_to_epsilon(orders_, rdp_, delta, conversion);
}

}  // namespace pipar
