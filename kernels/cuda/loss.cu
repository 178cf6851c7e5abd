// CUDA softmax cross-entropy over logits [n, k] (k = numel/n) with int32 labels [n]: forward writes the
// probabilities and per-sample losses -log p[label] (max-subtracted, log-sum-exp in double), one block
// per sample; backward writes dlogits = scale*(probs - onehot), one thread per element (dlogits may
// alias probs). Labels are validated by the caller on the host (see ops_cuda.h); here an invalid label
// is never used as an index: its loss is NaN and its row gets no -1.
// Verified on an H200 (OpsCuda.SoftmaxCrossEntropy*): expf differs from glibc's by up to 2 ulp, so
// probabilities agree to a tolerance, not bit for bit.
#include <cmath>

#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"

namespace pipar::kernels::cuda {
namespace {

// --- kernels --------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    softmax_cross_entropy_forward_kernel(const float* __restrict__ logits, const int32_t* __restrict__ labels,
                                         float* __restrict__ probs, float* __restrict__ losses, int64_t k) {
  const int64_t row = blockIdx.x;  // grid is exactly n blocks
  const float* l = logits + row * k;
  float* pr = probs + row * k;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) mx = (l[j] > mx || l[j] != l[j]) ? l[j] : mx;
  mx = block_reduce_max(mx);
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    const float e = expf(l[j] - mx);
    pr[j] = e;
    sum += e;
  }
  sum = block_reduce_sum(sum);  // its barriers also order the pr[] writes above before the reads below
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) pr[j] = __fmul_rn(pr[j], inv);
  if (threadIdx.x == 0) {
    const int32_t label = labels[row];
    // -log p[label] = log(sum) - (l[label] - max), exact even where p[label] underflows to 0.
    losses[row] = label >= 0 && label < k
                      ? static_cast<float>(log(sum) - (static_cast<double>(l[label]) - mx))
                      : NAN;
  }
}

__global__ void softmax_cross_entropy_backward_kernel(const float* probs, const int32_t* __restrict__ labels,
                                                      float scale, float* dlogits, int64_t total, int64_t k) {
  for (int64_t i = global_index(); i < total; i += grid_stride()) {
    const int64_t row = i / k, j = i % k;
    const float p = probs[i];
    dlogits[i] = j == labels[row] ? __fmul_rn(scale, __fsub_rn(p, 1.0f)) : __fmul_rn(scale, p);
  }
}

}  // namespace

// --- entry points (the launchers are one launch each) ----------------------------------------------

void softmax_cross_entropy_forward(ConstView logits, ConstIndexView labels, View probs, View losses, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "softmax_cross_entropy_forward");
  const int64_t n = logits.shape.n;
  if (n == 0) return;
  const int64_t k = logits.numel() / n;
  PIPAR_CHECK(n <= 0x7fffffff, "softmax_cross_entropy_forward: too many samples for one grid: ", n);
  softmax_cross_entropy_forward_kernel<<<static_cast<unsigned>(n), kThreads, 0, st>>>(logits.data, labels.data,
                                                                                      probs.data, losses.data, k);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void softmax_cross_entropy_backward(ConstView probs, ConstIndexView labels, float scale, View dlogits, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "softmax_cross_entropy_backward");
  const int64_t n = probs.shape.n, total = probs.numel();
  if (n == 0 || total == 0) return;
  softmax_cross_entropy_backward_kernel<<<grid_1d(total), kThreads, 0, st>>>(probs.data, labels.data, scale,
                                                                             dlogits.data, total, total / n);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pipar::kernels::cuda
