// CUDA pooling: max-pool (padding counts as -inf; argmax = h*W + w within the input plane; first
// maximum wins, NaN propagates), avg-pool (padded zeros counted, divisor kh*kw) and global average
// pooling. Forward: one thread per output. Backward: one thread per input element gathering the
// outputs whose window holds it, in increasing output order — no atomics, deterministic, and the same
// summation order as the CPU's scatter, so results match it bit for bit.
// Verified on an H200 (OpsCuda.PoolingMatchesCpu).
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"

namespace pipar::kernels::cuda {
namespace {

struct PoolGeom {
  int64_t planes, h, w, oh, ow;
  int64_t kh, kw, sh, sw, ph, pw;
};

PoolGeom geometry(const Pool2dParams& p, Shape4 x, Shape4 y) {
  return {x.n * x.c, x.h, x.w, y.h, y.w, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw};
}

// Outputs o in [lo, hi) whose window (o*s - pad, length k) holds input position i.
__device__ inline void covering_outputs(int64_t i, int64_t k, int64_t s, int64_t pad, int64_t out, int64_t& lo,
                                        int64_t& hi) {
  // o*s - pad <= i  and  i < o*s - pad + k   <=>   (i + pad - k) / s < o <= (i + pad) / s
  const int64_t top = i + pad;                // >= 0
  const int64_t low = top - k + 1;            // smallest o*s allowed
  lo = low <= 0 ? 0 : (low + s - 1) / s;
  hi = top / s + 1;
  if (hi > out) hi = out;
  if (lo > hi) lo = hi;
}

// --- kernels --------------------------------------------------------------------------------------

__global__ void max_pool2d_forward_kernel(PoolGeom g, const float* __restrict__ x, float* __restrict__ y,
                                          int32_t* __restrict__ argmax) {
  const int64_t total = g.planes * g.oh * g.ow;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t ow = idx % g.ow, t = idx / g.ow;
    const int64_t oh = t % g.oh, plane = t / g.oh;
    const float* xp = x + plane * g.h * g.w;
    const int64_t h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
    const int64_t hb = h0 < 0 ? 0 : h0, he = h0 + g.kh < g.h ? h0 + g.kh : g.h;
    const int64_t wb = w0 < 0 ? 0 : w0, we = w0 + g.kw < g.w ? w0 + g.kw : g.w;
    float best = -INFINITY;
    int64_t best_i = hb * g.w + wb;
    for (int64_t h = hb; h < he; ++h)
      for (int64_t w = wb; w < we; ++w) {
        const float v = xp[h * g.w + w];
        if (v > best || v != v) {  // first maximum wins; NaN propagates (PyTorch's rule)
          best = v;
          best_i = h * g.w + w;
        }
      }
    y[idx] = best;
    argmax[idx] = static_cast<int32_t>(best_i);
  }
}

// dx[h, w] = sum of dy over the outputs whose argmax is (h, w). Reads only the covering outputs, so a
// corrupt argmax can only drop gradient, never write out of bounds.
__global__ void max_pool2d_backward_kernel(PoolGeom g, const float* __restrict__ dy, const int32_t* __restrict__ argmax,
                                           float* __restrict__ dx) {
  const int64_t total = g.planes * g.h * g.w;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t w = idx % g.w, t = idx / g.w;
    const int64_t h = t % g.h, plane = t / g.h;
    const int64_t self = h * g.w + w, out_base = plane * g.oh * g.ow;
    int64_t oh0, oh1, ow0, ow1;
    covering_outputs(h, g.kh, g.sh, g.ph, g.oh, oh0, oh1);
    covering_outputs(w, g.kw, g.sw, g.pw, g.ow, ow0, ow1);
    float sum = 0.0f;
    for (int64_t oh = oh0; oh < oh1; ++oh)
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        const int64_t o = out_base + oh * g.ow + ow;
        if (argmax[o] == self) sum += dy[o];
      }
    dx[idx] = sum;
  }
}

__global__ void avg_pool2d_forward_kernel(PoolGeom g, const float* __restrict__ x, float* __restrict__ y, float inv) {
  const int64_t total = g.planes * g.oh * g.ow;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t ow = idx % g.ow, t = idx / g.ow;
    const int64_t oh = t % g.oh, plane = t / g.oh;
    const float* xp = x + plane * g.h * g.w;
    const int64_t h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
    const int64_t hb = h0 < 0 ? 0 : h0, he = h0 + g.kh < g.h ? h0 + g.kh : g.h;
    const int64_t wb = w0 < 0 ? 0 : w0, we = w0 + g.kw < g.w ? w0 + g.kw : g.w;
    float s = 0.0f;
    for (int64_t h = hb; h < he; ++h)
      for (int64_t w = wb; w < we; ++w) s = __fadd_rn(s, xp[h * g.w + w]);
    y[idx] = __fmul_rn(s, inv);
  }
}

__global__ void avg_pool2d_backward_kernel(PoolGeom g, const float* __restrict__ dy, float* __restrict__ dx, float inv) {
  const int64_t total = g.planes * g.h * g.w;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t w = idx % g.w, t = idx / g.w;
    const int64_t h = t % g.h, plane = t / g.h;
    const float* dyp = dy + plane * g.oh * g.ow;
    int64_t oh0, oh1, ow0, ow1;
    covering_outputs(h, g.kh, g.sh, g.ph, g.oh, oh0, oh1);
    covering_outputs(w, g.kw, g.sw, g.pw, g.ow, ow0, ow1);
    float sum = 0.0f;
    for (int64_t oh = oh0; oh < oh1; ++oh)
      for (int64_t ow = ow0; ow < ow1; ++ow) sum = __fadd_rn(sum, __fmul_rn(dyp[oh * g.ow + ow], inv));
    dx[idx] = sum;
  }
}

// One block per plane: y = mean of the plane, summed in double.
__global__ void __launch_bounds__(kThreads)
    global_avg_pool_forward_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t plane, double inv) {
  const int64_t p = blockIdx.x;  // grid is exactly the number of planes
  const float* xp = x + p * plane;
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < plane; j += blockDim.x) sum += xp[j];
  sum = block_reduce_sum(sum);
  if (threadIdx.x == 0) y[p] = static_cast<float>(sum * inv);
}

__global__ void global_avg_pool_backward_kernel(const float* __restrict__ dy, float* __restrict__ dx, int64_t total,
                                                int64_t plane, float inv) {
  for (int64_t i = global_index(); i < total; i += grid_stride()) dx[i] = __fmul_rn(dy[i / plane], inv);
}

}  // namespace

// --- entry points (the launchers are one launch each) ----------------------------------------------

void max_pool2d_forward(const Pool2dParams& p, ConstView x, View y, IndexView argmax, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "max_pool2d_forward");
  const int64_t total = y.numel();
  if (total == 0) return;
  max_pool2d_forward_kernel<<<grid_1d(total), kThreads, 0, st>>>(geometry(p, x.shape, y.shape), x.data, y.data,
                                                                 argmax.data);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void max_pool2d_backward(const Pool2dParams& p, ConstView dy, ConstIndexView argmax, View dx, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "max_pool2d_backward");
  const int64_t total = dx.numel();
  if (total == 0) return;
  max_pool2d_backward_kernel<<<grid_1d(total), kThreads, 0, st>>>(geometry(p, dx.shape, dy.shape), dy.data,
                                                                  argmax.data, dx.data);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void avg_pool2d_forward(const Pool2dParams& p, ConstView x, View y, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "avg_pool2d_forward");
  const int64_t total = y.numel();
  if (total == 0) return;
  const float inv = 1.0f / static_cast<float>(p.kh * p.kw);
  avg_pool2d_forward_kernel<<<grid_1d(total), kThreads, 0, st>>>(geometry(p, x.shape, y.shape), x.data, y.data, inv);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void avg_pool2d_backward(const Pool2dParams& p, ConstView dy, View dx, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "avg_pool2d_backward");
  const int64_t total = dx.numel();
  if (total == 0) return;
  const float inv = 1.0f / static_cast<float>(p.kh * p.kw);
  avg_pool2d_backward_kernel<<<grid_1d(total), kThreads, 0, st>>>(geometry(p, dx.shape, dy.shape), dy.data, dx.data,
                                                                  inv);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void global_avg_pool_forward(ConstView x, View y, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "global_avg_pool_forward");
  const int64_t planes = x.shape.n * x.shape.c, plane = x.shape.h * x.shape.w;
  if (planes == 0) return;
  PIPAR_CHECK(planes <= 0x7fffffff, "global_avg_pool_forward: too many planes for one grid: ", planes);
  const double inv = 1.0 / static_cast<double>(plane);
  global_avg_pool_forward_kernel<<<static_cast<unsigned>(planes), kThreads, 0, st>>>(x.data, y.data, plane, inv);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void global_avg_pool_backward(ConstView dy, View dx, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "global_avg_pool_backward");
  const int64_t total = dx.numel(), plane = dx.shape.h * dx.shape.w;
  if (total == 0) return;
  const float inv = 1.0f / static_cast<float>(plane);
  global_avg_pool_backward_kernel<<<grid_1d(total), kThreads, 0, st>>>(dy.data, dx.data, total, plane, inv);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pipar::kernels::cuda
