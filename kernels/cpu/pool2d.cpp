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

// Windows scanned in order, first maximum wins and NaN propagates (PyTorch's rule), without branches:
// on activations the comparison is a coin toss, and the branchy loop took 13% of a VGG5 training step
// (2 threads, Zen 3) in mispredictions. Taken when v > best or v is NaN.
inline void take_max(float v, int32_t i, float& best, int32_t& best_i) {
  const bool take = (v > best) | (v != v);
  best = take ? v : best;
  best_i = take ? i : best_i;
}

// Outputs [0, 4·(ow/4)) of one output row of a 2x2 stride-2 pool, 4 at a time in GCC vectors (SSE2 on
// x86-64, NEON on ARM): the pairs of each input row split into even and odd columns by shuffles, then
// take_max's rule as lane selects. Scalar compares and selects still compiled to branches (jp on
// the NaN test), and the pool took 10% of a VGG5 training step. Returns the outputs done.
using V4 = float __attribute__((vector_size(16)));
using V4i = int32_t __attribute__((vector_size(16)));
inline V4 load4(const float* p) {
  V4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void select_max(V4 v, V4i i, V4& best, V4i& best_i) {
  const V4i take = (v > best) | (v != v);
  best = take ? v : best;
  best_i = take ? i : best_i;
}
int64_t max_pool_2x2_row4(const float* r0, const float* r1, int32_t i0, int32_t i1, int64_t ow_count, float* y,
                          int32_t* am) {
  const V4i lane2 = {0, 2, 4, 6};
  int64_t ow = 0;
  for (; ow + 4 <= ow_count; ow += 4) {
    const int64_t c = 2 * ow;
    const V4 a0 = load4(r0 + c), a1 = load4(r0 + c + 4), b0 = load4(r1 + c), b1 = load4(r1 + c + 4);
    const V4i col = lane2 + static_cast<int32_t>(c);
    V4 best = __builtin_shufflevector(a0, a1, 0, 2, 4, 6);
    V4i best_i = col + i0;
    select_max(__builtin_shufflevector(a0, a1, 1, 3, 5, 7), col + (i0 + 1), best, best_i);
    select_max(__builtin_shufflevector(b0, b1, 0, 2, 4, 6), col + i1, best, best_i);
    select_max(__builtin_shufflevector(b0, b1, 1, 3, 5, 7), col + (i1 + 1), best, best_i);
    std::memcpy(y + ow, &best, sizeof(best));
    std::memcpy(am + ow, &best_i, sizeof(best_i));
  }
  return ow;
}

void max_pool2d_forward(const Pool2dParams& p, ConstView x, View y, IndexView argmax) {
  const Shape4 xs = x.shape, ys = y.shape;
  const int64_t in_plane = xs.h * xs.w, out_plane = ys.h * ys.w;
  // 2x2 windows at stride 2 without padding (VGG's and ResNet's pools): every window whole, 4 loads.
  const bool two_by_two = p.kh == 2 && p.kw == 2 && p.sh == 2 && p.sw == 2 && p.ph == 0 && p.pw == 0;
  par::parallel_items(xs.n * xs.c, out_plane * p.kh * p.kw, [&](int64_t plane) {
    const float* xp = x.data + plane * in_plane;
    float* yp = y.data + plane * out_plane;
    int32_t* ap = argmax.data + plane * out_plane;
    for (int64_t oh = 0; oh < ys.h; ++oh) {
      if (two_by_two) {
        const float* r0 = xp + 2 * oh * xs.w;
        const float* r1 = r0 + xs.w;
        const int32_t i0 = static_cast<int32_t>(2 * oh * xs.w), i1 = i0 + static_cast<int32_t>(xs.w);
        int64_t ow = max_pool_2x2_row4(r0, r1, i0, i1, ys.w, yp + oh * ys.w, ap + oh * ys.w);
        for (; ow < ys.w; ++ow) {
          const int32_t c = static_cast<int32_t>(2 * ow);
          float best = r0[c];
          int32_t best_i = i0 + c;
          take_max(r0[c + 1], i0 + c + 1, best, best_i);
          take_max(r1[c], i1 + c, best, best_i);
          take_max(r1[c + 1], i1 + c + 1, best, best_i);
          yp[oh * ys.w + ow] = best;
          ap[oh * ys.w + ow] = best_i;
        }
        continue;
      }
      const Span hs = window(oh, p.sh, p.ph, p.kh, xs.h);
      for (int64_t ow = 0; ow < ys.w; ++ow) {
        const Span ws = window(ow, p.sw, p.pw, p.kw, xs.w);
        // The shape check keeps padding <= kernel/2, so every window holds at least one input.
        float best = -std::numeric_limits<float>::infinity();
        int32_t best_i = static_cast<int32_t>(hs.begin * xs.w + ws.begin);
        for (int64_t h = hs.begin; h < hs.end; ++h)
          for (int64_t w = ws.begin; w < ws.end; ++w) take_max(xp[h * xs.w + w], static_cast<int32_t>(h * xs.w + w), best, best_i);
        yp[oh * ys.w + ow] = best;
        ap[oh * ys.w + ow] = best_i;
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
