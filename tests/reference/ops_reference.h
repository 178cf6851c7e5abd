// Naive double-precision reference implementations of the non-GEMM ops of kernels/ops.h (activations,
// pooling, batch norm, element-wise, dropout, softmax cross-entropy, SGD): plain loops over NCHW,
// written to be obviously correct, never fast. Tests compare the backends against these.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/ops.h"
#include "kernels/rng.h"
#include "kernels/tensor_view.h"

namespace pipar::test::ref {

using Vec = std::vector<double>;

inline int64_t at(Shape4 s, int64_t n, int64_t c, int64_t h, int64_t w) { return ((n * s.c + c) * s.h + h) * s.w + w; }

// --- activations (forward values and derivatives, PyTorch's conventions at the kinks) -----------------

inline double relu(double x) { return x > 0 ? x : 0; }
inline double relu6(double x) { return std::min(std::max(x, 0.0), 6.0); }
inline double hardswish(double x) { return x * relu6(x + 3) / 6; }
inline double hardsigmoid(double x) { return relu6(x + 3) / 6; }
inline double relu_grad_from_output(double y) { return y > 0 ? 1 : 0; }
inline double hardswish_grad(double x) { return x < -3 ? 0 : (x <= 3 ? (2 * x + 3) / 6 : 1); }
inline double hardsigmoid_grad(double x) { return (x > -3 && x < 3) ? 1.0 / 6 : 0; }

template <class F>
Vec map(const Vec& x, F f) {
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = f(x[i]);
  return y;
}

// --- pooling --------------------------------------------------------------------------------------------

inline Shape4 pool_out(Shape4 x, const kernels::Pool2dParams& p) {
  return {x.n, x.c, (x.h + 2 * p.ph - p.kh) / p.sh + 1, (x.w + 2 * p.pw - p.kw) / p.sw + 1};
}

// Max over each window (padding = -inf); argmax = h*W + w of the FIRST maximum in row-major order.
inline void max_pool2d(const kernels::Pool2dParams& p, Shape4 xs, const Vec& x, Vec& y, std::vector<int32_t>& argmax) {
  const Shape4 ys = pool_out(xs, p);
  y.assign(ys.numel(), 0);
  argmax.assign(ys.numel(), -1);
  for (int64_t n = 0; n < xs.n; ++n)
    for (int64_t c = 0; c < xs.c; ++c)
      for (int64_t oh = 0; oh < ys.h; ++oh)
        for (int64_t ow = 0; ow < ys.w; ++ow) {
          double best = -std::numeric_limits<double>::infinity();
          int32_t best_i = -1;
          for (int64_t i = 0; i < p.kh; ++i)
            for (int64_t j = 0; j < p.kw; ++j) {
              const int64_t h = oh * p.sh - p.ph + i, w = ow * p.sw - p.pw + j;
              if (h < 0 || h >= xs.h || w < 0 || w >= xs.w) continue;
              const double v = x[at(xs, n, c, h, w)];
              if (best_i < 0 || v > best) {
                best = v;
                best_i = static_cast<int32_t>(h * xs.w + w);
              }
            }
          y[at(ys, n, c, oh, ow)] = best;
          argmax[at(ys, n, c, oh, ow)] = best_i;
        }
}

// Mean over each window, padded zeros included (divisor kh*kw).
inline Vec avg_pool2d(const kernels::Pool2dParams& p, Shape4 xs, const Vec& x) {
  const Shape4 ys = pool_out(xs, p);
  Vec y(ys.numel(), 0);
  for (int64_t n = 0; n < xs.n; ++n)
    for (int64_t c = 0; c < xs.c; ++c)
      for (int64_t oh = 0; oh < ys.h; ++oh)
        for (int64_t ow = 0; ow < ys.w; ++ow) {
          double s = 0;
          for (int64_t i = 0; i < p.kh; ++i)
            for (int64_t j = 0; j < p.kw; ++j) {
              const int64_t h = oh * p.sh - p.ph + i, w = ow * p.sw - p.pw + j;
              if (h >= 0 && h < xs.h && w >= 0 && w < xs.w) s += x[at(xs, n, c, h, w)];
            }
          y[at(ys, n, c, oh, ow)] = s / (p.kh * p.kw);
        }
  return y;
}

inline Vec global_avg_pool(Shape4 xs, const Vec& x) {
  Vec y(xs.n * xs.c, 0);
  for (int64_t n = 0; n < xs.n; ++n)
    for (int64_t c = 0; c < xs.c; ++c) {
      double s = 0;
      for (int64_t h = 0; h < xs.h; ++h)
        for (int64_t w = 0; w < xs.w; ++w) s += x[at(xs, n, c, h, w)];
      y[n * xs.c + c] = s / (xs.h * xs.w);
    }
  return y;
}

// --- batch norm -----------------------------------------------------------------------------------------

struct BatchStats {
  Vec mean, var;  // var is biased (divided by the count)
};

inline BatchStats batch_stats(Shape4 xs, const Vec& x) {
  BatchStats st{Vec(xs.c, 0), Vec(xs.c, 0)};
  const double m = static_cast<double>(xs.n * xs.h * xs.w);
  for (int64_t c = 0; c < xs.c; ++c) {
    double s = 0;
    for (int64_t n = 0; n < xs.n; ++n)
      for (int64_t h = 0; h < xs.h; ++h)
        for (int64_t w = 0; w < xs.w; ++w) s += x[at(xs, n, c, h, w)];
    const double mean = s / m;
    double q = 0;
    for (int64_t n = 0; n < xs.n; ++n)
      for (int64_t h = 0; h < xs.h; ++h)
        for (int64_t w = 0; w < xs.w; ++w) q += (x[at(xs, n, c, h, w)] - mean) * (x[at(xs, n, c, h, w)] - mean);
    st.mean[c] = mean;
    st.var[c] = q / m;
  }
  return st;
}

// y = (x - mean)/sqrt(var + eps)*gamma + beta per channel.
inline Vec batch_norm_apply(Shape4 xs, const Vec& x, const Vec& mean, const Vec& var, const Vec& gamma,
                            const Vec& beta, double eps) {
  Vec y(x.size());
  for (int64_t n = 0; n < xs.n; ++n)
    for (int64_t c = 0; c < xs.c; ++c)
      for (int64_t h = 0; h < xs.h; ++h)
        for (int64_t w = 0; w < xs.w; ++w) {
          const int64_t i = at(xs, n, c, h, w);
          y[i] = (x[i] - mean[c]) / std::sqrt(var[c] + eps) * gamma[c] + beta[c];
        }
  return y;
}

// Training forward: normalize with the batch statistics; update running stats in place (unbiased var).
inline Vec batch_norm_train(Shape4 xs, const Vec& x, const Vec& gamma, const Vec& beta, double eps, double momentum,
                            Vec& running_mean, Vec& running_var, BatchStats* saved = nullptr) {
  const BatchStats st = batch_stats(xs, x);
  const double m = static_cast<double>(xs.n * xs.h * xs.w);
  for (int64_t c = 0; c < xs.c; ++c) {
    running_mean[c] = (1 - momentum) * running_mean[c] + momentum * st.mean[c];
    running_var[c] = (1 - momentum) * running_var[c] + momentum * st.var[c] * m / (m - 1);
  }
  if (saved) *saved = st;
  return batch_norm_apply(xs, x, st.mean, st.var, gamma, beta, eps);
}

// --- element-wise ---------------------------------------------------------------------------------------

// y[n,c,h,w] = x[n,c,h,w]*scale[n,c]
inline Vec channel_mul(Shape4 xs, const Vec& x, const Vec& scale) {
  Vec y(x.size());
  const int64_t plane = xs.h * xs.w;
  for (int64_t i = 0; i < static_cast<int64_t>(x.size()); ++i) y[i] = x[i] * scale[i / plane];
  return y;
}

// --- dropout --------------------------------------------------------------------------------------------

inline Vec dropout_mask(double p, uint64_t seed, int64_t numel) {
  Vec m(numel);
  for (int64_t i = 0; i < numel; ++i)
    m[i] = uniform01(seed, static_cast<uint64_t>(i)) >= static_cast<float>(p) ? 1.0 / (1.0 - p) : 0.0;
  return m;
}

// --- softmax cross-entropy ------------------------------------------------------------------------------

// logits [n, k] row-major; probs and losses written.
inline void softmax_cross_entropy(int64_t n, int64_t k, const Vec& logits, const std::vector<int32_t>& labels,
                                  Vec& probs, Vec& losses) {
  probs.assign(n * k, 0);
  losses.assign(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    double mx = logits[i * k];
    for (int64_t j = 1; j < k; ++j) mx = std::max(mx, logits[i * k + j]);
    double s = 0;
    for (int64_t j = 0; j < k; ++j) s += std::exp(logits[i * k + j] - mx);
    for (int64_t j = 0; j < k; ++j) probs[i * k + j] = std::exp(logits[i * k + j] - mx) / s;
    losses[i] = std::log(s) - (logits[i * k + labels[i]] - mx);
  }
}

// --- SGD ------------------------------------------------------------------------------------------------

inline void sgd_step(double lr, double momentum, double weight_decay, Vec& param, const Vec& grad, Vec& buf) {
  for (size_t i = 0; i < param.size(); ++i) {
    const double g = grad[i] + weight_decay * param[i];
    buf[i] = momentum * buf[i] + g;
    param[i] -= lr * buf[i];
  }
}

}  // namespace pipar::test::ref
