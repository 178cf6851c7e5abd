// CUDA batch normalization over NCHW, per channel, with the CPU's conventions: training normalizes with
// the biased batch variance, updates the running variance with the unbiased one (PyTorch momentum),
// saves the batch mean and 1/sqrt(var+eps); backward accumulates dgamma, dbeta and overwrites dx.
// Training and backward: one block per channel, two-pass sums in double (mean, then squared
// deviations), block-wide reductions. Inference: one thread per element.
// Verified on an H200 (OpsCuda.BatchNormMatchesCpu); not tuned: one block per channel under-fills the
// GPU when c is small and n*h*w large.
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"

namespace pipar::kernels::cuda {
namespace {

// x and y (dy and dx) are not __restrict__: a caller may normalize in place; each element is read and
// written by one thread, after the channel's sums.
// Element t of channel ch, t in [0, n*plane): sample t / plane, position t % plane.
__device__ inline int64_t channel_offset(int64_t t, int64_t ch, int64_t c, int64_t plane) {
  return ((t / plane) * c + ch) * plane + t % plane;
}

// --- kernels --------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    batch_norm_forward_train_kernel(float eps, float momentum, const float* x,
                                    const float* __restrict__ gamma, const float* __restrict__ beta,
                                    float* __restrict__ running_mean, float* __restrict__ running_var,
                                    float* __restrict__ save_mean, float* __restrict__ save_invstd,
                                    float* y, int64_t n, int64_t c, int64_t plane) {
  const int64_t ch = blockIdx.x;  // grid is exactly c blocks
  const int64_t m = n * plane;     // > 1, checked by dispatch
  double sum = 0.0;
  for (int64_t t = threadIdx.x; t < m; t += blockDim.x) sum += x[channel_offset(t, ch, c, plane)];
  const double mean = block_reduce_sum(sum) / static_cast<double>(m);
  double sq = 0.0;
  for (int64_t t = threadIdx.x; t < m; t += blockDim.x) {
    const double d = x[channel_offset(t, ch, c, plane)] - mean;
    sq += d * d;
  }
  const double var = block_reduce_sum(sq) / static_cast<double>(m);  // biased: normalizes the batch
  const double invstd = 1.0 / sqrt(var + static_cast<double>(eps));
  if (threadIdx.x == 0) {
    const double mom = momentum;
    running_mean[ch] = static_cast<float>((1.0 - mom) * running_mean[ch] + mom * mean);
    running_var[ch] = static_cast<float>((1.0 - mom) * running_var[ch] +
                                         mom * var * static_cast<double>(m) / static_cast<double>(m - 1));
    save_mean[ch] = static_cast<float>(mean);
    save_invstd[ch] = static_cast<float>(invstd);
  }
  const float mu = static_cast<float>(mean), a = static_cast<float>(gamma[ch] * invstd), b = beta[ch];
  for (int64_t t = threadIdx.x; t < m; t += blockDim.x) {
    const int64_t o = channel_offset(t, ch, c, plane);
    y[o] = __fadd_rn(__fmul_rn(__fsub_rn(x[o], mu), a), b);  // the CPU's (x - mu)*a + b, unfused
  }
}

__global__ void batch_norm_forward_inference_kernel(float eps, const float* x,
                                                    const float* __restrict__ gamma, const float* __restrict__ beta,
                                                    const float* __restrict__ running_mean,
                                                    const float* __restrict__ running_var, float* y,
                                                    int64_t total, int64_t c, int64_t plane) {
  for (int64_t i = global_index(); i < total; i += grid_stride()) {
    const int64_t ch = (i / plane) % c;
    const double invstd = 1.0 / sqrt(static_cast<double>(running_var[ch]) + static_cast<double>(eps));
    const float a = static_cast<float>(gamma[ch] * invstd);
    y[i] = __fadd_rn(__fmul_rn(__fsub_rn(x[i], running_mean[ch]), a), beta[ch]);
  }
}

// With xhat = (x - mean)*invstd and m values per channel:
//   dbeta += sum dy;  dgamma += sum dy*xhat;  dx = gamma*invstd*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m).
__global__ void __launch_bounds__(kThreads)
    batch_norm_backward_kernel(const float* x, const float* dy,
                               const float* __restrict__ gamma, const float* __restrict__ save_mean,
                               const float* __restrict__ save_invstd, float* dx,
                               float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t n, int64_t c,
                               int64_t plane) {
  const int64_t ch = blockIdx.x;  // grid is exactly c blocks
  const int64_t m = n * plane;
  const double mean = save_mean[ch], invstd = save_invstd[ch];
  double s_dy = 0.0, s_dy_xc = 0.0;  // xc = x - mean
  for (int64_t t = threadIdx.x; t < m; t += blockDim.x) {
    const int64_t o = channel_offset(t, ch, c, plane);
    const double d = dy[o];
    s_dy += d;
    s_dy_xc += d * (x[o] - mean);
  }
  const double sum_dy = block_reduce_sum(s_dy);
  const double sum_dy_xhat = block_reduce_sum(s_dy_xc) * invstd;
  if (threadIdx.x == 0) {
    dbeta[ch] += static_cast<float>(sum_dy);
    dgamma[ch] += static_cast<float>(sum_dy_xhat);
  }
  // dx = k*dy + a*(x - mean) + b, as on the CPU.
  const double k = gamma[ch] * invstd;
  const float kf = static_cast<float>(k), mu = static_cast<float>(mean);
  const float af = static_cast<float>(-k * invstd * sum_dy_xhat / static_cast<double>(m));
  const float bf = static_cast<float>(-k * sum_dy / static_cast<double>(m));
  for (int64_t t = threadIdx.x; t < m; t += blockDim.x) {
    const int64_t o = channel_offset(t, ch, c, plane);
    dx[o] = __fadd_rn(__fadd_rn(__fmul_rn(kf, dy[o]), __fmul_rn(af, __fsub_rn(x[o], mu))), bf);
  }
}

// --- launchers ------------------------------------------------------------------------------------

unsigned channel_grid(int64_t c, const char* op) {
  PIPAR_CHECK(c <= 0x7fffffff, op, ": too many channels for one grid: ", c);
  return static_cast<unsigned>(c);
}

}  // namespace

// --- entry points ---------------------------------------------------------------------------------

void batch_norm_forward_train(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                              View running_mean, View running_var, View save_mean, View save_invstd, View y,
                              StreamRef s) {
  const cudaStream_t st = checked_stream(s, "batch_norm_forward_train");
  const Shape4 xs = x.shape;
  if (xs.c == 0 || x.numel() == 0) return;
  batch_norm_forward_train_kernel<<<channel_grid(xs.c, "batch_norm_forward_train"), kThreads, 0, st>>>(
      p.eps, p.momentum, x.data, gamma.data, beta.data, running_mean.data, running_var.data, save_mean.data,
      save_invstd.data, y.data, xs.n, xs.c, xs.h * xs.w);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void batch_norm_forward_inference(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                                  ConstView running_mean, ConstView running_var, View y, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "batch_norm_forward_inference");
  const int64_t total = x.numel();
  if (total == 0) return;
  batch_norm_forward_inference_kernel<<<grid_1d(total), kThreads, 0, st>>>(
      p.eps, x.data, gamma.data, beta.data, running_mean.data, running_var.data, y.data, total, x.shape.c,
      x.shape.h * x.shape.w);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void batch_norm_backward(ConstView x, ConstView dy, ConstView gamma, ConstView save_mean, ConstView save_invstd,
                         View dx, View dgamma, View dbeta, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "batch_norm_backward");
  const Shape4 xs = x.shape;
  if (xs.c == 0 || x.numel() == 0) return;
  batch_norm_backward_kernel<<<channel_grid(xs.c, "batch_norm_backward"), kThreads, 0, st>>>(
      x.data, dy.data, gamma.data, save_mean.data, save_invstd.data, dx.data, dgamma.data, dbeta.data, xs.n, xs.c,
      xs.h * xs.w);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pipar::kernels::cuda
