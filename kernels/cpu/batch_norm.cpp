// CPU batch normalization over NCHW, per channel: training forward (batch statistics, running-stat
// update with the unbiased variance, saved mean and 1/sqrt(var+eps)), inference forward, backward.
// Per-channel sums run in double (one pass for mean and variance); channels are threaded.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/cpu_parallel.h"
#include "kernels/ops.h"
#include "kernels/parallel.h"

namespace pipar::kernels::cpu {
namespace {

// Inlined into both copies of the channel loops below (plain and AVX2), so each is vectorized for its ISA.
#define PIPAR_BN_INLINE inline __attribute__((always_inline))

// Channel ch of sample i starts at x + (i*c + ch)*plane.
struct Planes {
  int64_t n, c, plane;
  int64_t offset(int64_t i, int64_t ch) const { return (i * c + ch) * plane; }
};

// y = (x - mu)*a + b over one plane (centering first avoids cancellation when |mean| >> std).
PIPAR_BN_INLINE void affine_plane(const float* x, float mu, float a, float b, float* y, int64_t m) {
  for (int64_t j = 0; j < m; ++j) y[j] = (x[j] - mu) * a + b;
}

// The per-plane double sums in GCC vectors: 8 floats a step widened to two vectors of 4 doubles, two
// independent accumulators per sum (AVX2: one register each; SSE2: two). Written as arrays of lanes,
// GCC left these loops scalar (perf: vsubsd/vaddsd), and batch norm took 16-18% of a VGG5 training
// step (2 threads, Zen 3).
using F4 = float __attribute__((vector_size(16)));
using D4 = double __attribute__((vector_size(32)));
// D4 never crosses a call (every helper is always inlined), so the note on its calling convention
// without AVX does not apply. GCC 12 printed it for hsum's by-value argument on Zen even under the
// pragma: it takes a reference.
#pragma GCC diagnostic ignored "-Wpsabi"
PIPAR_BN_INLINE D4 load_d4(const float* p) {
  F4 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, D4);
}
PIPAR_BN_INLINE double hsum(const D4& v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// Sums of x and of x^2 over one plane in one pass (one read of x instead of two). In double the
// variance E[x^2] - mean^2 keeps about 53 - log2(mean^2 / var) bits, far beyond float's 24.
PIPAR_BN_INLINE void sums_plane(const float* x, int64_t m, double& sum, double& sum_sq) {
  D4 s0 = {}, s1 = {}, q0 = {}, q1 = {};
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    const D4 a = load_d4(x + j), b = load_d4(x + j + 4);
    s0 += a, s1 += b, q0 += a * a, q1 += b * b;
  }
  for (; j < m; ++j) {
    const double v = x[j];
    sum += v, sum_sq += v * v;
  }
  sum += hsum(s0 + s1), sum_sq += hsum(q0 + q1);
}

// Sums of dy and of dy·(x - mean) over one plane.
PIPAR_BN_INLINE void grad_sums_plane(const float* x, const float* dy, double mean, int64_t m, double& sum_dy,
                                     double& sum_dy_xc) {
  D4 s0 = {}, s1 = {}, q0 = {}, q1 = {};
  const D4 mu = {mean, mean, mean, mean};
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    const D4 da = load_d4(dy + j), db = load_d4(dy + j + 4);
    s0 += da, s1 += db, q0 += da * (load_d4(x + j) - mu), q1 += db * (load_d4(x + j + 4) - mu);
  }
  for (; j < m; ++j) {
    sum_dy += dy[j];
    sum_dy_xc += static_cast<double>(dy[j]) * (x[j] - mean);
  }
  sum_dy += hsum(s0 + s1), sum_dy_xc += hsum(q0 + q1);
}

// One channel of the training forward pass (statistics, running update, y). Always inlined into a
// plain and an AVX2 copy: the double sums vectorize 2 wide on the portable build (SSE2) and 4 wide
// with AVX2.
PIPAR_BN_INLINE void bn_train_channel(const BatchNormParams& p, const Planes& g, int64_t ch, const float* x,
                                      const float* gamma, const float* beta, float* running_mean,
                                      float* running_var, float* save_mean, float* save_invstd, float* y) {
  const int64_t m = g.n * g.plane;
  double sum = 0, sum_sq = 0;
  for (int64_t i = 0; i < g.n; ++i) sums_plane(x + g.offset(i, ch), g.plane, sum, sum_sq);
  const double mean = sum / static_cast<double>(m);
  const double var = std::max(0.0, sum_sq / static_cast<double>(m) - mean * mean);  // biased: normalizes the batch
  const double invstd = 1.0 / std::sqrt(var + static_cast<double>(p.eps));
  const double mom = p.momentum;
  running_mean[ch] = static_cast<float>((1.0 - mom) * running_mean[ch] + mom * mean);
  running_var[ch] = static_cast<float>((1.0 - mom) * running_var[ch] +
                                       mom * var * static_cast<double>(m) / static_cast<double>(m - 1));
  save_mean[ch] = static_cast<float>(mean);
  save_invstd[ch] = static_cast<float>(invstd);
  const float mu = static_cast<float>(mean), a = static_cast<float>(gamma[ch] * invstd);
  for (int64_t i = 0; i < g.n; ++i) affine_plane(x + g.offset(i, ch), mu, a, beta[ch], y + g.offset(i, ch), g.plane);
}

// One channel of the backward pass (see batch_norm_backward).
PIPAR_BN_INLINE void bn_backward_channel(const Planes& g, int64_t ch, const float* x, const float* dy, const float* gamma,
                                         const float* save_mean, const float* save_invstd, float* dx, float* dgamma,
                                         float* dbeta) {
  const int64_t m = g.n * g.plane;
  const double mean = save_mean[ch], invstd = save_invstd[ch];
  double sum_dy = 0, sum_dy_xc = 0;  // xc = x - mean
  for (int64_t i = 0; i < g.n; ++i) grad_sums_plane(x + g.offset(i, ch), dy + g.offset(i, ch), mean, g.plane, sum_dy, sum_dy_xc);
  const double sum_dy_xhat = sum_dy_xc * invstd;
  dbeta[ch] += static_cast<float>(sum_dy);
  dgamma[ch] += static_cast<float>(sum_dy_xhat);
  // dx = k*dy + a*(x - mean) + b, with k = gamma*invstd, a = -k*invstd*sum(dy*xhat)/m, b = -k*sum(dy)/m.
  const double k = gamma[ch] * invstd;
  const float kf = static_cast<float>(k), mu = static_cast<float>(mean);
  const float af = static_cast<float>(-k * invstd * sum_dy_xhat / static_cast<double>(m));
  const float bf = static_cast<float>(-k * sum_dy / static_cast<double>(m));
  for (int64_t i = 0; i < g.n; ++i) {
    const float* xp = x + g.offset(i, ch);
    const float* dyp = dy + g.offset(i, ch);
    float* dxp = dx + g.offset(i, ch);
    for (int64_t j = 0; j < g.plane; ++j) dxp[j] = kf * dyp[j] + af * (xp[j] - mu) + bf;
  }
}

void bn_train_channel_plain(const BatchNormParams& p, const Planes& g, int64_t ch, const float* x, const float* gamma,
                            const float* beta, float* rm, float* rv, float* sm, float* si, float* y) {
  bn_train_channel(p, g, ch, x, gamma, beta, rm, rv, sm, si, y);
}
void bn_backward_channel_plain(const Planes& g, int64_t ch, const float* x, const float* dy, const float* gamma,
                               const float* sm, const float* si, float* dx, float* dgamma, float* dbeta) {
  bn_backward_channel(g, ch, x, dy, gamma, sm, si, dx, dgamma, dbeta);
}
#if PIPAR_X86
// AVX2 without FMA: nothing is contracted, so the AVX2 copy rounds as the plain one does.
__attribute__((target("avx2"))) void bn_train_channel_avx2(
    const BatchNormParams& p, const Planes& g, int64_t ch, const float* x, const float* gamma, const float* beta,
    float* rm, float* rv, float* sm, float* si, float* y) {
  bn_train_channel(p, g, ch, x, gamma, beta, rm, rv, sm, si, y);
}
__attribute__((target("avx2"))) void bn_backward_channel_avx2(
    const Planes& g, int64_t ch, const float* x, const float* dy, const float* gamma, const float* sm, const float* si,
    float* dx, float* dgamma, float* dbeta) {
  bn_backward_channel(g, ch, x, dy, gamma, sm, si, dx, dgamma, dbeta);
}
#endif

bool use_avx2() {
#if PIPAR_X86
  return cpu_isa() != Isa::kGeneric;
#else
  return false;
#endif
}

}  // namespace

// --- forward ----------------------------------------------------------------------------------------

void batch_norm_forward_train(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                              View running_mean, View running_var, View save_mean, View save_invstd, View y) {
  const Planes g{x.shape.n, x.shape.c, x.shape.h * x.shape.w};
  const int64_t m = g.n * g.plane;  // values per channel (> 1, checked by dispatch)
#if PIPAR_X86
  auto* channel = use_avx2() ? &bn_train_channel_avx2 : &bn_train_channel_plain;
#else
  auto* channel = &bn_train_channel_plain;
#endif
  par::parallel_items(g.c, 3 * m, [&](int64_t ch) {
    channel(p, g, ch, x.data, gamma.data, beta.data, running_mean.data, running_var.data, save_mean.data,
            save_invstd.data, y.data);
  });
}

void batch_norm_forward_inference(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                                  ConstView running_mean, ConstView running_var, View y) {
  const Planes g{x.shape.n, x.shape.c, x.shape.h * x.shape.w};
  // Thread over (sample, channel) planes: inference batches are often one sample.
  par::parallel_items(g.n * g.c, g.plane, [&](int64_t nc) {
    const int64_t ch = nc % g.c;
    const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var.data[ch]) + static_cast<double>(p.eps));
    const float a = static_cast<float>(gamma.data[ch] * invstd);
    affine_plane(x.data + nc * g.plane, running_mean.data[ch], a, beta.data[ch], y.data + nc * g.plane, g.plane);
  });
}

// --- backward ---------------------------------------------------------------------------------------

// With xhat = (x - mean)*invstd and m values per channel:
//   dbeta += sum dy;  dgamma += sum dy*xhat;
//   dx = gamma*invstd * (dy - sum(dy)/m - xhat * sum(dy*xhat)/m).
void batch_norm_backward(ConstView x, ConstView dy, ConstView gamma, ConstView save_mean, ConstView save_invstd,
                         View dx, View dgamma, View dbeta) {
  const Planes g{x.shape.n, x.shape.c, x.shape.h * x.shape.w};
  const int64_t m = g.n * g.plane;
#if PIPAR_X86
  auto* channel = use_avx2() ? &bn_backward_channel_avx2 : &bn_backward_channel_plain;
#else
  auto* channel = &bn_backward_channel_plain;
#endif
  par::parallel_items(g.c, 3 * m, [&](int64_t ch) {
    channel(g, ch, x.data, dy.data, gamma.data, save_mean.data, save_invstd.data, dx.data, dgamma.data, dbeta.data);
  });
}

}  // namespace pipar::kernels::cpu
