// CUDA SGD step with PyTorch semantics (no dampening, no Nesterov), one thread per element:
//   g' = g + weight_decay*p;  buf = momentum*buf + g';  p -= lr*buf.
// Separate multiply and add (no FMA contraction): the CPU's FMA clones may contract, so results can
// differ from the CPU by an ulp.
// Verified on an H200 (OpsCuda.SgdMatchesCpu).
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"

namespace pipar::kernels::cuda {
namespace {

// --- kernels --------------------------------------------------------------------------------------

__global__ void sgd_step_kernel(float lr, float momentum, float weight_decay, float* __restrict__ param,
                                const float* __restrict__ grad, float* __restrict__ buf, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) {
    const float p = param[i];
    const float g = __fadd_rn(grad[i], __fmul_rn(weight_decay, p));
    const float b = __fadd_rn(__fmul_rn(momentum, buf[i]), g);
    buf[i] = b;
    param[i] = __fsub_rn(p, __fmul_rn(lr, b));
  }
}

}  // namespace

// --- entry points ---------------------------------------------------------------------------------

void sgd_step(const SgdParams& p, View param, ConstView grad, View momentum_buf, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "sgd_step");
  const int64_t n = param.numel();
  if (n == 0) return;
  sgd_step_kernel<<<grid_1d(n), kThreads, 0, st>>>(p.lr, p.momentum, p.weight_decay, param.data, grad.data,
                                                   momentum_buf.data, n);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pipar::kernels::cuda
