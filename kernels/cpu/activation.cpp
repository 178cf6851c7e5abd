// CPU activations: ReLU, hard-swish and hard-sigmoid, forward and backward. Element-wise, threaded in
// chunks above a size threshold; x and y (dy and dx) may alias: each element is read before it is
// written at the same index, a pattern GCC's run-time alias check lets through to the vector loop.
#include <algorithm>

#include "kernels/cpu/cpu_parallel.h"
#include "kernels/ops.h"

namespace pipar::kernels::cpu {
namespace {

// --- element loops ----------------------------------------------------------------------------------

PIPAR_TARGET_CLONES void relu_forward_range(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] < 0.0f ? 0.0f : x[i];  // NaN passes through, as in PyTorch
}

PIPAR_TARGET_CLONES void relu_backward_range(const float* y, const float* dy, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

PIPAR_TARGET_CLONES void hardswish_forward_range(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    y[i] = v * std::min(std::max(v + 3.0f, 0.0f), 6.0f) * (1.0f / 6.0f);
  }
}

// PyTorch's convention: 0 for x < -3, x/3 + 1/2 for -3 <= x <= 3 (both ends included), 1 for x > 3.
PIPAR_TARGET_CLONES void hardswish_backward_range(const float* x, const float* dy, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float d = v < -3.0f ? 0.0f : (v <= 3.0f ? v * (1.0f / 3.0f) + 0.5f : 1.0f);
    dx[i] = dy[i] * d;
  }
}

PIPAR_TARGET_CLONES void hardsigmoid_forward_range(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::min(std::max(x[i] + 3.0f, 0.0f), 6.0f) * (1.0f / 6.0f);
}

// PyTorch's convention: 1/6 on the open interval (-3, 3), 0 elsewhere (the ends included).
PIPAR_TARGET_CLONES void hardsigmoid_backward_range(const float* x, const float* dy, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = (x[i] > -3.0f && x[i] < 3.0f) ? dy[i] * (1.0f / 6.0f) : 0.0f;
}

}  // namespace

// --- entry points -------------------------------------------------------------------------------------

void relu_forward(ConstView x, View y) {
  par::parallel_chunks(x.numel(), [&](int64_t b, int64_t e) { relu_forward_range(x.data + b, y.data + b, e - b); });
}

void relu_backward(ConstView y, ConstView dy, View dx) {
  par::parallel_chunks(y.numel(), [&](int64_t b, int64_t e) {
    relu_backward_range(y.data + b, dy.data + b, dx.data + b, e - b);
  });
}

void hardswish_forward(ConstView x, View y) {
  par::parallel_chunks(x.numel(), [&](int64_t b, int64_t e) {
    hardswish_forward_range(x.data + b, y.data + b, e - b);
  });
}

void hardswish_backward(ConstView x, ConstView dy, View dx) {
  par::parallel_chunks(x.numel(), [&](int64_t b, int64_t e) {
    hardswish_backward_range(x.data + b, dy.data + b, dx.data + b, e - b);
  });
}

void hardsigmoid_forward(ConstView x, View y) {
  par::parallel_chunks(x.numel(), [&](int64_t b, int64_t e) {
    hardsigmoid_forward_range(x.data + b, y.data + b, e - b);
  });
}

void hardsigmoid_backward(ConstView x, ConstView dy, View dx) {
  par::parallel_chunks(x.numel(), [&](int64_t b, int64_t e) {
    hardsigmoid_backward_range(x.data + b, dy.data + b, dx.data + b, e - b);
  });
}

}  // namespace pipar::kernels::cpu
