// CPU batch normalization over NCHW, per channel: training forward (batch statistics, running-stat
// update with the unbiased variance, saved mean and 1/sqrt(var+eps)), inference forward, backward.
// Per-channel sums run in double (two passes for the variance); channels are threaded.
#include <cmath>

#include "kernels/cpu/cpu_parallel.h"
#include "kernels/ops.h"

namespace pipar::kernels::cpu {
namespace {

// Channel ch of sample i starts at x + (i*c + ch)*plane.
struct Planes {
  int64_t n, c, plane;
  int64_t offset(int64_t i, int64_t ch) const { return (i * c + ch) * plane; }
};

// y = (x - mu)*a + b over one plane (centering first avoids cancellation when |mean| >> std).
void affine_plane(const float* x, float mu, float a, float b, float* y, int64_t m) {
  for (int64_t j = 0; j < m; ++j) y[j] = (x[j] - mu) * a + b;
}

// Sum of x over one plane, in double lanes so the loop vectorizes without reassociation flags.
double sum_plane(const float* x, int64_t m) {
  double lane[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= m; j += 4)
    for (int k = 0; k < 4; ++k) lane[k] += x[j + k];
  double s = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; j < m; ++j) s += x[j];
  return s;
}

// Sum of (x - mean)^2 over one plane, in double.
double sum_sq_dev_plane(const float* x, double mean, int64_t m) {
  double lane[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= m; j += 4)
    for (int k = 0; k < 4; ++k) {
      const double d = x[j + k] - mean;
      lane[k] += d * d;
    }
  double s = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; j < m; ++j) s += (x[j] - mean) * (x[j] - mean);
  return s;
}

}  // namespace

// --- forward ----------------------------------------------------------------------------------------

void batch_norm_forward_train(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                              View running_mean, View running_var, View save_mean, View save_invstd, View y) {
  const Planes g{x.shape.n, x.shape.c, x.shape.h * x.shape.w};
  const int64_t m = g.n * g.plane;  // values per channel (> 1, checked by dispatch)
  par::parallel_items(g.c, 3 * m, [&](int64_t ch) {
    double sum = 0;
    for (int64_t i = 0; i < g.n; ++i) sum += sum_plane(x.data + g.offset(i, ch), g.plane);
    const double mean = sum / static_cast<double>(m);
    double sq = 0;
    for (int64_t i = 0; i < g.n; ++i) sq += sum_sq_dev_plane(x.data + g.offset(i, ch), mean, g.plane);
    const double var = sq / static_cast<double>(m);  // biased: normalizes the batch
    const double invstd = 1.0 / std::sqrt(var + static_cast<double>(p.eps));
    const double mom = p.momentum;
    running_mean.data[ch] = static_cast<float>((1.0 - mom) * running_mean.data[ch] + mom * mean);
    running_var.data[ch] = static_cast<float>((1.0 - mom) * running_var.data[ch] +
                                              mom * var * static_cast<double>(m) / static_cast<double>(m - 1));
    save_mean.data[ch] = static_cast<float>(mean);
    save_invstd.data[ch] = static_cast<float>(invstd);
    const float mu = static_cast<float>(mean), a = static_cast<float>(gamma.data[ch] * invstd);
    for (int64_t i = 0; i < g.n; ++i)
      affine_plane(x.data + g.offset(i, ch), mu, a, beta.data[ch], y.data + g.offset(i, ch), g.plane);
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
  par::parallel_items(g.c, 3 * m, [&](int64_t ch) {
    const double mean = save_mean.data[ch], invstd = save_invstd.data[ch];
    double sum_dy = 0, sum_dy_xc = 0;  // xc = x - mean
    for (int64_t i = 0; i < g.n; ++i) {
      const float* xp = x.data + g.offset(i, ch);
      const float* dyp = dy.data + g.offset(i, ch);
      double l_dy[4] = {0, 0, 0, 0}, l_dyx[4] = {0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 4 <= g.plane; j += 4)
        for (int k = 0; k < 4; ++k) {
          l_dy[k] += dyp[j + k];
          l_dyx[k] += static_cast<double>(dyp[j + k]) * (xp[j + k] - mean);
        }
      for (; j < g.plane; ++j) {
        sum_dy += dyp[j];
        sum_dy_xc += static_cast<double>(dyp[j]) * (xp[j] - mean);
      }
      sum_dy += (l_dy[0] + l_dy[1]) + (l_dy[2] + l_dy[3]);
      sum_dy_xc += (l_dyx[0] + l_dyx[1]) + (l_dyx[2] + l_dyx[3]);
    }
    const double sum_dy_xhat = sum_dy_xc * invstd;
    dbeta.data[ch] += static_cast<float>(sum_dy);
    dgamma.data[ch] += static_cast<float>(sum_dy_xhat);
    // dx = k*dy + a*(x - mean) + b, with k = gamma*invstd, a = -k*invstd*sum(dy*xhat)/m, b = -k*sum(dy)/m.
    const double k = gamma.data[ch] * invstd;
    const float kf = static_cast<float>(k), mu = static_cast<float>(mean);
    const float af = static_cast<float>(-k * invstd * sum_dy_xhat / static_cast<double>(m));
    const float bf = static_cast<float>(-k * sum_dy / static_cast<double>(m));
    for (int64_t i = 0; i < g.n; ++i) {
      const float* xp = x.data + g.offset(i, ch);
      const float* dyp = dy.data + g.offset(i, ch);
      float* dxp = dx.data + g.offset(i, ch);
      for (int64_t j = 0; j < g.plane; ++j) dxp[j] = kf * dyp[j] + af * (xp[j] - mu) + bf;
    }
  });
}

}  // namespace pipar::kernels::cpu
