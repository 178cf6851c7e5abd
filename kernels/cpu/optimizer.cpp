// CPU SGD step with PyTorch semantics (no dampening, no Nesterov):
//   g' = g + weight_decay*p;  buf = momentum*buf + g';  p -= lr*buf   (buf starts at zero).
#include "kernels/cpu/cpu_parallel.h"
#include "kernels/ops.h"

namespace pipar::kernels::cpu {
namespace {

PIPAR_TARGET_CLONES void sgd_step_range(float lr, float momentum, float weight_decay, float* __restrict param,
                                        const float* __restrict grad, float* __restrict buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] + weight_decay * param[i];
    const float b = momentum * buf[i] + g;
    buf[i] = b;
    param[i] -= lr * b;
  }
}

}  // namespace

void sgd_step(const SgdParams& p, View param, ConstView grad, View momentum_buf) {
  par::parallel_chunks(param.numel(), [&](int64_t b, int64_t e) {
    sgd_step_range(p.lr, p.momentum, p.weight_decay, param.data + b, grad.data + b, momentum_buf.data + b, e - b);
  });
}

}  // namespace pipar::kernels::cpu
