// CPU element-wise and channel-wise ops: add (outputs may alias inputs), the squeeze-excite channel
// multiply and its backward, axpy, scale, fill and copy. Flat loops are threaded in chunks above a size
// threshold; channel-wise ones per (n, c) plane.
#include <cstring>

#include "kernels/cpu/cpu_parallel.h"
#include "kernels/ops.h"

namespace pipar::kernels::cpu {
namespace {

// --- element loops ------------------------------------------------------------------------------------

PIPAR_TARGET_CLONES void add_range(const float* a, const float* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

PIPAR_TARGET_CLONES void axpy_range(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

PIPAR_TARGET_CLONES void scale_range(float alpha, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

void fill_range(float value, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

// y = x * s over one plane.
void scale_plane(const float* x, float s, float* y, int64_t m) {
  for (int64_t j = 0; j < m; ++j) y[j] = x[j] * s;
}

// sum over one plane of dy*x, in double lanes (vectorizes without reassociation flags).
double dot_plane(const float* __restrict dy, const float* __restrict x, int64_t m) {
  double lane[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= m; j += 4)
    for (int k = 0; k < 4; ++k) lane[k] += static_cast<double>(dy[j + k]) * x[j + k];
  double s = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; j < m; ++j) s += static_cast<double>(dy[j]) * x[j];
  return s;
}

}  // namespace

// --- entry points ---------------------------------------------------------------------------------------

void add_forward(ConstView a, ConstView b, View y) {
  par::parallel_chunks(y.numel(), [&](int64_t s, int64_t e) { add_range(a.data + s, b.data + s, y.data + s, e - s); });
}

void channel_mul_forward(ConstView x, ConstView scale, View y) {
  const int64_t plane = x.shape.h * x.shape.w;
  par::parallel_items(x.shape.n * x.shape.c, plane, [&](int64_t nc) {
    scale_plane(x.data + nc * plane, scale.data[nc], y.data + nc * plane, plane);
  });
}

void channel_mul_backward(ConstView x, ConstView scale, ConstView dy, View dx, View dscale) {
  const int64_t plane = x.shape.h * x.shape.w;
  par::parallel_items(x.shape.n * x.shape.c, 2 * plane, [&](int64_t nc) {
    // dscale first: dx may alias dy (or x), and the sum reads both.
    dscale.data[nc] = static_cast<float>(dot_plane(dy.data + nc * plane, x.data + nc * plane, plane));
    scale_plane(dy.data + nc * plane, scale.data[nc], dx.data + nc * plane, plane);
  });
}

void axpy(float alpha, ConstView x, View y) {
  par::parallel_chunks(y.numel(), [&](int64_t s, int64_t e) { axpy_range(alpha, x.data + s, y.data + s, e - s); });
}

void scale(float alpha, View x) {
  par::parallel_chunks(x.numel(), [&](int64_t s, int64_t e) { scale_range(alpha, x.data + s, e - s); });
}

void fill(float value, View x) {
  par::parallel_chunks(x.numel(), [&](int64_t s, int64_t e) { fill_range(value, x.data + s, e - s); });
}

void copy(ConstView x, View y) {
  if (x.data == y.data) return;
  const int64_t n = y.numel();
  const bool overlap = x.data < y.data + n && y.data < x.data + n;
  if (overlap) {  // only a caller's mistake would do this; memmove keeps it defined
    std::memmove(y.data, x.data, sizeof(float) * n);
    return;
  }
  par::parallel_chunks(n, [&](int64_t s, int64_t e) { std::memcpy(y.data + s, x.data + s, sizeof(float) * (e - s)); });
}

}  // namespace pipar::kernels::cpu
