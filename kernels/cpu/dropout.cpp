// CPU dropout: mask[i] = 1/(1-p) where uniform01(seed, i) >= p, else 0 (i = flat element index), so
// the mask is the same on every backend and thread count; y = x*mask; backward dx = dy*mask.
#include "kernels/cpu/cpu_parallel.h"
#include "kernels/ops.h"

namespace pipar::kernels::cpu {
namespace {

// Elements [first, first + n) of the flat tensor.
PIPAR_TARGET_CLONES void dropout_forward_range(float p, float keep_scale, uint64_t seed, uint64_t first,
                                               const float* x, float* y, float* mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float m = uniform01(seed, first + static_cast<uint64_t>(i)) >= p ? keep_scale : 0.0f;
    mask[i] = m;
    y[i] = x[i] * m;
  }
}

PIPAR_TARGET_CLONES void dropout_backward_range(const float* mask, const float* dy, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * mask[i];
}

}  // namespace

void dropout_forward(float p, uint64_t seed, ConstView x, View y, View mask) {
  const float keep_scale = 1.0f / (1.0f - p);  // dispatch checked 0 <= p < 1
  par::parallel_chunks(x.numel(), [&](int64_t b, int64_t e) {
    dropout_forward_range(p, keep_scale, seed, static_cast<uint64_t>(b), x.data + b, y.data + b, mask.data + b, e - b);
  });
}

void dropout_backward(ConstView mask, ConstView dy, View dx) {
  par::parallel_chunks(mask.numel(), [&](int64_t b, int64_t e) {
    dropout_backward_range(mask.data + b, dy.data + b, dx.data + b, e - b);
  });
}

}  // namespace pipar::kernels::cpu
