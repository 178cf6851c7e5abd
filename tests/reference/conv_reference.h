// Naive double-precision references for GEMM, conv2d (seven nested loops) and linear, plus central
// finite differences of a scalar function. Obviously correct and slow: for tests only.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/ops.h"

namespace pipar::test::ref {

// C[m,n] = alpha * op(A) op(B) + beta * C, row-major with leading dimensions (as cpu::gemm).
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const std::vector<float>& a,
                 int64_t lda, const std::vector<float>& b, int64_t ldb, double beta, std::vector<double>& c,
                 int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = trans_a ? a[p * lda + i] : a[i * lda + p];
        const double bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
        acc += av * bv;
      }
      double& out = c[i * ldc + j];
      out = alpha * acc + (beta == 0.0 ? 0.0 : beta * out);
    }
}

// y [n, k, oh, ow] = conv(x [n, c, h, w], w [k, c/groups, kh, kw]) + b (b may be empty).
template <class T>
std::vector<double> conv2d_forward(const kernels::Conv2dParams& p, Shape4 xs, const std::vector<T>& x, Shape4 ws,
                                   const std::vector<T>& w, const std::vector<T>& b) {
  const Shape4 ys = kernels::conv2d_out_shape(xs, ws, p);
  const int64_t cg = xs.c / p.groups, kg = ws.n / p.groups;
  std::vector<double> y(ys.numel());
  for (int64_t s = 0; s < ys.n; ++s)
    for (int64_t oc = 0; oc < ys.c; ++oc)
      for (int64_t oy = 0; oy < ys.h; ++oy)
        for (int64_t ox = 0; ox < ys.w; ++ox) {
          double acc = b.empty() ? 0.0 : static_cast<double>(b[oc]);
          const int64_t grp = oc / kg;
          for (int64_t ci = 0; ci < cg; ++ci)
            for (int64_t i = 0; i < p.kh; ++i)
              for (int64_t j = 0; j < p.kw; ++j) {
                const int64_t iy = oy * p.sh - p.ph + i, ix = ox * p.sw - p.pw + j;
                if (iy < 0 || iy >= xs.h || ix < 0 || ix >= xs.w) continue;
                const int64_t c = grp * cg + ci;
                acc += static_cast<double>(x[((s * xs.c + c) * xs.h + iy) * xs.w + ix]) *
                       static_cast<double>(w[((oc * cg + ci) * p.kh + i) * p.kw + j]);
              }
          y[((s * ys.c + oc) * ys.h + oy) * ys.w + ox] = acc;
        }
  return y;
}

// Analytic adjoints, the same seven loops scattering instead of gathering (checked against finite
// differences in the tests, then used on shapes too big for finite differences).
inline std::vector<double> conv2d_backward_input(const kernels::Conv2dParams& p, Shape4 xs, Shape4 ws,
                                                 const std::vector<float>& dy, const std::vector<float>& w) {
  const Shape4 ys = kernels::conv2d_out_shape(xs, ws, p);
  const int64_t cg = xs.c / p.groups, kg = ws.n / p.groups;
  std::vector<double> dx(xs.numel());
  for (int64_t s = 0; s < ys.n; ++s)
    for (int64_t oc = 0; oc < ys.c; ++oc)
      for (int64_t oy = 0; oy < ys.h; ++oy)
        for (int64_t ox = 0; ox < ys.w; ++ox) {
          const double g = dy[((s * ys.c + oc) * ys.h + oy) * ys.w + ox];
          for (int64_t ci = 0; ci < cg; ++ci)
            for (int64_t i = 0; i < p.kh; ++i)
              for (int64_t j = 0; j < p.kw; ++j) {
                const int64_t iy = oy * p.sh - p.ph + i, ix = ox * p.sw - p.pw + j;
                if (iy < 0 || iy >= xs.h || ix < 0 || ix >= xs.w) continue;
                const int64_t c = (oc / kg) * cg + ci;
                dx[((s * xs.c + c) * xs.h + iy) * xs.w + ix] += g * w[((oc * cg + ci) * p.kh + i) * p.kw + j];
              }
        }
  return dx;
}

inline std::vector<double> conv2d_backward_weight(const kernels::Conv2dParams& p, Shape4 xs, Shape4 ws,
                                                  const std::vector<float>& x, const std::vector<float>& dy) {
  const Shape4 ys = kernels::conv2d_out_shape(xs, ws, p);
  const int64_t cg = xs.c / p.groups, kg = ws.n / p.groups;
  std::vector<double> dw(ws.numel());
  for (int64_t s = 0; s < ys.n; ++s)
    for (int64_t oc = 0; oc < ys.c; ++oc)
      for (int64_t oy = 0; oy < ys.h; ++oy)
        for (int64_t ox = 0; ox < ys.w; ++ox) {
          const double g = dy[((s * ys.c + oc) * ys.h + oy) * ys.w + ox];
          for (int64_t ci = 0; ci < cg; ++ci)
            for (int64_t i = 0; i < p.kh; ++i)
              for (int64_t j = 0; j < p.kw; ++j) {
                const int64_t iy = oy * p.sh - p.ph + i, ix = ox * p.sw - p.pw + j;
                if (iy < 0 || iy >= xs.h || ix < 0 || ix >= xs.w) continue;
                const int64_t c = (oc / kg) * cg + ci;
                dw[((oc * cg + ci) * p.kh + i) * p.kw + j] += g * x[((s * xs.c + c) * xs.h + iy) * xs.w + ix];
              }
        }
  return dw;
}

// y [n, out] = x [n, in] W^T [in, out] + b.
template <class T>
std::vector<double> linear_forward(int64_t n, int64_t in, int64_t out, const std::vector<T>& x,
                                   const std::vector<T>& w, const std::vector<T>& b) {
  std::vector<double> y(n * out);
  for (int64_t s = 0; s < n; ++s)
    for (int64_t o = 0; o < out; ++o) {
      double acc = b.empty() ? 0.0 : static_cast<double>(b[o]);
      for (int64_t i = 0; i < in; ++i) acc += static_cast<double>(x[s * in + i]) * static_cast<double>(w[o * in + i]);
      y[s * out + o] = acc;
    }
  return y;
}

// Central finite differences of f at theta: d f / d theta_i ≈ (f(θ + h e_i) - f(θ - h e_i)) / 2h.
// For a function linear in θ (every loss here is sum(dy ⊙ f(θ))) this is exact up to rounding.
inline std::vector<double> finite_differences(std::vector<double> theta,
                                              const std::function<double(const std::vector<double>&)>& f,
                                              double h = 1e-3) {
  std::vector<double> grad(theta.size());
  for (size_t i = 0; i < theta.size(); ++i) {
    const double keep = theta[i];
    theta[i] = keep + h;
    const double up = f(theta);
    theta[i] = keep - h;
    const double down = f(theta);
    theta[i] = keep;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

inline double dot(const std::vector<double>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * static_cast<double>(b[i]);
  return s;
}

}  // namespace pipar::test::ref
