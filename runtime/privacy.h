// Differential privacy for split learning: per-sample clipping and Gaussian noise of the cut-layer
// activation before it leaves a device, DP-SGD (per-sample gradient clipping and noise) for the
// device-side weights that go to aggregation, and a Renyi-DP accountant of the sampled Gaussian
// mechanism converted to (epsilon, delta). CPU tensors only (the device side runs on the CPU).
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "runtime/loss.h"
#include "runtime/model.h"

namespace pipar {

// --- noise -----------------------------------------------------------------------------------------

// A standard normal value for (seed, index): Box-Muller over two 53-bit uniforms from hash64 (pair
// index/2; cosine for even indices, sine for odd), so it is the same for every thread count. The
// tails are cut at |z| = sqrt(2*53*ln 2) ~ 8.6, where the true mass is ~1e-17.
float gaussian(uint64_t seed, uint64_t index);

// x[i] += stddev * gaussian(seed, i) for every element of x.
void add_gaussian_noise(Tensor& x, float stddev, uint64_t seed);

// --- cut-layer activation privacy ------------------------------------------------------------------

// Scales each sample (row of x [n, ...]) to L2 norm at most `clip`: row i *= min(1, clip/||x_i||).
// Returns the scales (one per sample), which the backward pass needs.
std::vector<float> clip_per_sample(Tensor& x, float clip);

// The release mechanism for a cut activation: clip_per_sample to `clip`, then add N(0, (sigma*clip)^2)
// per element from `seed` (sigma = 0: clipping only). Returns the per-sample clip scales.
std::vector<float> clip_and_noise(Tensor& activation, float clip, float sigma, uint64_t seed);

// Backward through clip_and_noise, in place: grad row i *= scale[i]. The noise is additive, so the
// gradient w.r.t. the clipped activation is the one that came back. The clip factor is treated as a
// constant per sample (the usual choice in DP split learning); the exact Jacobian of a clipped row,
// s*(I - u u^T) with u the clipped row's direction, would also drop the radial component.
void clip_backward(Tensor& grad, const std::vector<float>& scales);

// --- DP-SGD ----------------------------------------------------------------------------------------

// Per-sample clipping and noise on a list of parameters (Abadi et al. 2016). For each sample of a
// batch: begin_sample() zeroes the params' grads, the caller runs that sample's backward (grads
// accumulate into the params), end_sample(grad_scale) clips that gradient, divided by grad_scale, to
// norm `clip` and adds it to a sum. finish(batch) writes (sum + N(0, (sigma*clip)^2)) / batch into the
// params' grads, ready for the ordinary SGD step, and clears the sum.
class DpSgd {
 public:
  DpSgd(std::vector<Param*> params, float clip, float sigma, uint64_t seed);
  void begin_sample();
  // grad_scale: what the per-sample loss was multiplied by before the backward (1/batch when the
  // gradient is that of the batch's mean loss). Returns the sample's unclipped gradient norm.
  float end_sample(float grad_scale = 1.0f);
  void finish(int64_t batch_size);
  void clear();  // drops the current sum (a batch that will not finish)
  int64_t samples() const { return samples_; }  // samples in the current sum

 private:
  std::vector<Param*> params_;
  std::vector<Tensor> sum_;
  float clip_, sigma_;
  uint64_t seed_, steps_ = 0;
  int64_t samples_ = 0;
};

// The device half of split training (as DevicePart) with DP-SGD: each micro-batch runs forward sample
// by sample (one tape per sample), so its backward yields exact per-sample gradients (slow: n=1 GEMMs).
// Batch-norm would make per-sample gradients ill-defined (a sample's output depends on the others in
// its batch): the model must have none (VGG with --norm none); the constructor checks.
class DpSgdPart {
 public:
  DpSgdPart(Model& m, size_t split, kernels::SgdParams sgd, float clip, float sigma, uint64_t seed);
  Tensor forward(int micro, const Tensor& x);
  // grad: the gradient of the batch's MEAN loss (what ServerPart returns) w.r.t. this micro-batch's
  // cut activation; batch_size undoes the 1/batch so that clipping applies to per-sample gradients.
  void backward(int micro, const Tensor& grad, int64_t batch_size);
  void finish(int64_t batch_size) { dp_.finish(batch_size); }  // noised mean gradient into the params
  void step(int64_t batch_size);  // finish, SGD step, zero the gradients
  void set_lr(float lr) { opt_.params().lr = lr; }  // for the next step (learning-rate schedules)
  size_t in_flight() const { return tapes_.size(); }
  void reset() { tapes_.clear(), dp_.clear(); }  // drop micro-batches (and a batch) that will not finish
  const std::vector<float>& last_norms() const { return norms_; }  // unclipped norms of the last backward

 private:
  Model& m_;
  size_t split_;
  Sgd opt_;
  std::vector<Param*> params_;
  DpSgd dp_;
  std::map<int, std::vector<Tape>> tapes_;
  std::vector<float> norms_;
  Context ctx_;
};

// --- accounting ------------------------------------------------------------------------------------

// RDP of one step of the sampled Gaussian mechanism (Poisson sampling rate q, noise multiplier sigma)
// at order alpha > 1 (Mironov, Talwar, Zhang 2019): the exact sum for integer alpha, the two-sided
// series for fractional alpha. q = 0: 0; q = 1: alpha/(2 sigma^2); sigma = 0: infinity.
double rdp_sampled_gaussian(double q, double sigma, double alpha);

// (epsilon, delta) from RDP values at the given orders.
enum class RdpConversion {
  kStandard,  // eps = min_a rdp(a) + log(1/delta)/(a-1)                      (Mironov 2017, Prop. 3)
  kImproved,  // eps = min_a rdp(a) + log1p(-1/a) - log(delta*a)/(a-1), >= 0  (Balle et al. 2020, Thm 21;
              //   what TF-Privacy's dp_accounting and Opacus report)
};
struct Epsilon {
  double epsilon;
  double order;  // the minimizing order
};
Epsilon rdp_to_epsilon(const std::vector<double>& orders, const std::vector<double>& rdp, double delta,
                       RdpConversion conversion = RdpConversion::kImproved);

class RdpAccountant {
 public:
  // Orders of TF-Privacy's compute_dp_sgd_privacy: 1.25..4.5, 5..63, 128, 256, 512.
  static std::vector<double> default_orders();
  explicit RdpAccountant(std::vector<double> orders = default_orders());
  // Composes `steps` steps of the sampled Gaussian mechanism (rate q, noise multiplier sigma).
  void step(double q, double sigma, int64_t steps = 1);
  double epsilon(double delta, RdpConversion conversion = RdpConversion::kImproved) const;
  Epsilon epsilon_and_order(double delta, RdpConversion conversion = RdpConversion::kImproved) const;
  const std::vector<double>& orders() const { return orders_; }
  const std::vector<double>& rdp() const { return rdp_; }

 private:
  std::vector<double> orders_, rdp_;
};

}  // namespace pipar
