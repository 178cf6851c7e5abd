// CUDA dropout: mask[i] = 1/(1-p) where uniform01(seed, i) >= p, else 0 (i = flat element index; the
// counter-based RNG of kernels/rng.h), y = x*mask; backward dx = dy*mask. One thread per element, so
// masks and outputs match the CPU bit for bit.
// Verified on an H200: bit for bit the CPU's masks and outputs (OpsCuda.DropoutMatchesCpuBitForBit).
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"

namespace pipar::kernels::cuda {
namespace {

// --- kernels --------------------------------------------------------------------------------------

__global__ void dropout_forward_kernel(float p, float keep_scale, uint64_t seed, const float* x, float* y,
                                       float* mask, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) {
    const float m = uniform01(seed, static_cast<uint64_t>(i)) >= p ? keep_scale : 0.0f;
    mask[i] = m;
    y[i] = __fmul_rn(x[i], m);
  }
}

__global__ void dropout_backward_kernel(const float* mask, const float* dy, float* dx, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) dx[i] = __fmul_rn(dy[i], mask[i]);
}

}  // namespace

// --- entry points (the launches are one line each) -------------------------------------------------

void dropout_forward(float p, uint64_t seed, ConstView x, View y, View mask, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "dropout_forward");
  const int64_t n = x.numel();
  if (n == 0) return;
  const float keep_scale = 1.0f / (1.0f - p);  // dispatch checked 0 <= p < 1; same expression as the CPU
  dropout_forward_kernel<<<grid_1d(n), kThreads, 0, st>>>(p, keep_scale, seed, x.data, y.data, mask.data, n);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void dropout_backward(ConstView mask, ConstView dy, View dx, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "dropout_backward");
  const int64_t n = mask.numel();
  if (n == 0) return;
  dropout_backward_kernel<<<grid_1d(n), kThreads, 0, st>>>(mask.data, dy.data, dx.data, n);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pipar::kernels::cuda
