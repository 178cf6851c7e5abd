// CPU pooling: max-pool (padding counts as -inf; argmax = h*W + w within the input plane), avg-pool
// (padded zeros counted, divisor kh*kw as PyTorch's count_include_pad) and global average pooling.
// Every op works plane by plane (one (n, c) pair), so planes are independent and threaded.
#include <algorithm>
#include <cstring>
#include <limits>

#include "kernels/cpu/cpu_parallel.h"
#include "kernels/ops.h"

namespace pipar::kernels::cpu {
namespace {

// Clipped window [begin, end) of output position o along one axis of input size `size`.
struct Span {
  int64_t begin, end;
};
inline Span window(int64_t o, int stride, int pad, int k, int64_t size) {
  const int64_t start = o * stride - pad;
  return {std::max<int64_t>(start, 0), std::min<int64_t>(start + k, size)};
}

// Sum of n floats in double, in 8 lanes so the loop vectorizes without reassociation flags.
double sum_f64(const float* x, int64_t n) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += x[i + j];
  double s = 0;
  for (; i < n; ++i) s += x[i];
  for (int j = 0; j < 8; ++j) s += lane[j];
  return s;
}

}  // namespace

// --- max pooling ------------------------------------------------------------------------------------

void max_pool2d_forward(const Pool2dParams& p, ConstView x, View y, IndexView argmax) {
  const Shape4 xs = x.shape, ys = y.shape;
  const int64_t in_plane = xs.h * xs.w, out_plane = ys.h * ys.w;
  par::parallel_items(xs.n * xs.c, out_plane * p.kh * p.kw, [&](int64_t plane) {
    const float* xp = x.data + plane * in_plane;
    float* yp = y.data + plane * out_plane;
    int32_t* ap = argmax.data + plane * out_plane;
    for (int64_t oh = 0; oh < ys.h; ++oh) {
      const Span hs = window(oh, p.sh, p.ph, p.kh, xs.h);
      for (int64_t ow = 0; ow < ys.w; ++ow) {
        const Span ws = window(ow, p.sw, p.pw, p.kw, xs.w);
        // The shape check keeps padding <= kernel/2, so every window holds at least one input.
        float best = -std::numeric_limits<float>::infinity();
        int64_t best_i = hs.begin * xs.w + ws.begin;
        for (int64_t h = hs.begin; h < hs.end; ++h)
          for (int64_t w = ws.begin; w < ws.end; ++w) {
            const float v = xp[h * xs.w + w];
            if (v > best || v != v) {  // first maximum wins; NaN propagates (PyTorch's rule)
              best = v;
              best_i = h * xs.w + w;
            }
          }
        yp[oh * ys.w + ow] = best;
        ap[oh * ys.w + ow] = static_cast<int32_t>(best_i);
      }
    }
  });
}

void max_pool2d_backward(const Pool2dParams&, ConstView dy, ConstIndexView argmax, View dx) {
  const int64_t in_plane = dx.shape.h * dx.shape.w, out_plane = dy.shape.h * dy.shape.w;
  // Scatter by argmax; windows overlap when stride < kernel, so one input may receive several dy.
  par::parallel_items(dx.shape.n * dx.shape.c, in_plane + out_plane, [&](int64_t plane) {
    float* dxp = dx.data + plane * in_plane;
    const float* dyp = dy.data + plane * out_plane;
    const int32_t* ap = argmax.data + plane * out_plane;
    std::memset(dxp, 0, sizeof(float) * in_plane);
    for (int64_t i = 0; i < out_plane; ++i) dxp[ap[i]] += dyp[i];
  });
}

// --- average pooling ----------------------------------------------------------------------------------

void avg_pool2d_forward(const Pool2dParams& p, ConstView x, View y) {
  const Shape4 xs = x.shape, ys = y.shape;
  const int64_t in_plane = xs.h * xs.w, out_plane = ys.h * ys.w;
  const float inv = 1.0f / static_cast<float>(p.kh * p.kw);
  par::parallel_items(xs.n * xs.c, out_plane * p.kh * p.kw, [&](int64_t plane) {
    const float* xp = x.data + plane * in_plane;
    float* yp = y.data + plane * out_plane;
    for (int64_t oh = 0; oh < ys.h; ++oh) {
      const Span hs = window(oh, p.sh, p.ph, p.kh, xs.h);
      for (int64_t ow = 0; ow < ys.w; ++ow) {
        const Span ws = window(ow, p.sw, p.pw, p.kw, xs.w);
        float s = 0.0f;
        for (int64_t h = hs.begin; h < hs.end; ++h)
          for (int64_t w = ws.begin; w < ws.end; ++w) s += xp[h * xs.w + w];
        yp[oh * ys.w + ow] = s * inv;
      }
    }
  });
}

void avg_pool2d_backward(const Pool2dParams& p, ConstView dy, View dx) {
  const Shape4 xs = dx.shape, ys = dy.shape;
  const int64_t in_plane = xs.h * xs.w, out_plane = ys.h * ys.w;
  const float inv = 1.0f / static_cast<float>(p.kh * p.kw);
  par::parallel_items(xs.n * xs.c, in_plane + out_plane * p.kh * p.kw, [&](int64_t plane) {
    float* dxp = dx.data + plane * in_plane;
    const float* dyp = dy.data + plane * out_plane;
    std::memset(dxp, 0, sizeof(float) * in_plane);
    for (int64_t oh = 0; oh < ys.h; ++oh) {
      const Span hs = window(oh, p.sh, p.ph, p.kh, xs.h);
      for (int64_t ow = 0; ow < ys.w; ++ow) {
        const Span ws = window(ow, p.sw, p.pw, p.kw, xs.w);
        const float g = dyp[oh * ys.w + ow] * inv;
        for (int64_t h = hs.begin; h < hs.end; ++h)
          for (int64_t w = ws.begin; w < ws.end; ++w) dxp[h * xs.w + w] += g;
      }
    }
  });
}

// --- global average pooling -----------------------------------------------------------------------------

void global_avg_pool_forward(ConstView x, View y) {
  const int64_t plane = x.shape.h * x.shape.w;
  const double inv = 1.0 / static_cast<double>(plane);
  par::parallel_items(x.shape.n * x.shape.c, plane, [&](int64_t i) {
    y.data[i] = static_cast<float>(sum_f64(x.data + i * plane, plane) * inv);
  });
}

void global_avg_pool_backward(ConstView dy, View dx) {
  const int64_t plane = dx.shape.h * dx.shape.w;
  const float inv = 1.0f / static_cast<float>(plane);
  par::parallel_items(dx.shape.n * dx.shape.c, plane, [&](int64_t i) {
    const float g = dy.data[i] * inv;
    float* d = dx.data + i * plane;
    for (int64_t j = 0; j < plane; ++j) d[j] = g;
  });
}

}  // namespace pipar::kernels::cpu
