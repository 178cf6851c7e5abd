// CUDA activations: ReLU, hard-swish and hard-sigmoid, forward and backward; one thread per element in
// grid-stride loops. x and y (dy and dx) may alias: each element is read and written by one thread.
// The arithmetic mirrors the CPU's (clamps as std::min/std::max, NaN handling included) and is never
// contracted to FMA; the CPU's FMA-capable clones may contract x/3 + 1/2, so hard-swish backward can
// differ from the CPU by 1 ulp.
// Verified on an H200 (OpsCuda.ActivationsMatchCpu; compute-sanitizer in .ci/gpu).
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"

namespace pipar::kernels::cuda {
namespace {

// std::max / std::min semantics (the first argument wins ties and NaN comparisons).
__device__ inline float std_max(float a, float b) { return a < b ? b : a; }
__device__ inline float std_min(float a, float b) { return b < a ? b : a; }
__device__ inline float relu6_shifted(float v) { return std_min(std_max(__fadd_rn(v, 3.0f), 0.0f), 6.0f); }

// --- kernels --------------------------------------------------------------------------------------

__global__ void relu_forward_kernel(const float* x, float* y, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) {
    const float v = x[i];
    y[i] = v < 0.0f ? 0.0f : v;  // NaN passes through, as in PyTorch
  }
}

__global__ void relu_backward_kernel(const float* y, const float* dy, float* dx, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

__global__ void hardswish_forward_kernel(const float* x, float* y, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) {
    const float v = x[i];
    y[i] = __fmul_rn(__fmul_rn(v, relu6_shifted(v)), 1.0f / 6.0f);
  }
}

// PyTorch's convention: 0 for x < -3, x/3 + 1/2 for -3 <= x <= 3, 1 for x > 3.
__global__ void hardswish_backward_kernel(const float* x, const float* dy, float* dx, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) {
    const float v = x[i];
    const float d = v < -3.0f ? 0.0f : (v <= 3.0f ? __fadd_rn(__fmul_rn(v, 1.0f / 3.0f), 0.5f) : 1.0f);
    dx[i] = __fmul_rn(dy[i], d);
  }
}

__global__ void hardsigmoid_forward_kernel(const float* x, float* y, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) y[i] = __fmul_rn(relu6_shifted(x[i]), 1.0f / 6.0f);
}

// 1/6 on the open interval (-3, 3), 0 elsewhere.
__global__ void hardsigmoid_backward_kernel(const float* x, const float* dy, float* dx, int64_t n) {
  for (int64_t i = global_index(); i < n; i += grid_stride()) {
    const float v = x[i];
    dx[i] = (v > -3.0f && v < 3.0f) ? __fmul_rn(dy[i], 1.0f / 6.0f) : 0.0f;
  }
}

// --- launchers ------------------------------------------------------------------------------------

using UnaryKernel = void (*)(const float*, float*, int64_t);
using BinaryKernel = void (*)(const float*, const float*, float*, int64_t);

void launch_unary(UnaryKernel kernel, const float* x, float* y, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  kernel<<<grid_1d(n), kThreads, 0, s>>>(x, y, n);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void launch_binary(BinaryKernel kernel, const float* a, const float* b, float* y, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  kernel<<<grid_1d(n), kThreads, 0, s>>>(a, b, y, n);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// --- entry points ---------------------------------------------------------------------------------

void relu_forward(ConstView x, View y, StreamRef s) {
  launch_unary(relu_forward_kernel, x.data, y.data, x.numel(), checked_stream(s, "relu_forward"));
}
void relu_backward(ConstView y, ConstView dy, View dx, StreamRef s) {
  launch_binary(relu_backward_kernel, y.data, dy.data, dx.data, y.numel(), checked_stream(s, "relu_backward"));
}
void hardswish_forward(ConstView x, View y, StreamRef s) {
  launch_unary(hardswish_forward_kernel, x.data, y.data, x.numel(), checked_stream(s, "hardswish_forward"));
}
void hardswish_backward(ConstView x, ConstView dy, View dx, StreamRef s) {
  launch_binary(hardswish_backward_kernel, x.data, dy.data, dx.data, x.numel(),
                checked_stream(s, "hardswish_backward"));
}
void hardsigmoid_forward(ConstView x, View y, StreamRef s) {
  launch_unary(hardsigmoid_forward_kernel, x.data, y.data, x.numel(), checked_stream(s, "hardsigmoid_forward"));
}
void hardsigmoid_backward(ConstView x, ConstView dy, View dx, StreamRef s) {
  launch_binary(hardsigmoid_backward_kernel, x.data, dy.data, dx.data, x.numel(),
                checked_stream(s, "hardsigmoid_backward"));
}

}  // namespace pipar::kernels::cuda
