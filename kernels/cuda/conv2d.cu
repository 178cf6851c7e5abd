// CUDA conv2d: im2col into the stream's workspace + the GEMM of gemm.cu (handwritten tiled kernel or
// cuBLAS) for regular and grouped convolutions, samples batched in gridDim.z, or cuDNN: chosen per
// shape and pass by the autotuner (autotune.h) under kernel_choice();
// 1x1 stride-1 unpadded convolutions read x directly; direct kernels for depthwise ones (one input
// channel per group). col2im is a gather (one thread per dx element): no atomics, deterministic.
// Forward and backward input run a GEMM per sample (n = the output positions), or, where that would
// leave the tiles' columns mostly empty (small outputs: VGG16's 4x4 and 2x2), one GEMM with the
// samples side by side as columns and a pass that reorders (gemm_detail::fold_samples_as_columns; that
// path has not yet run on a GPU). Backward weight always lays the samples side by side.
// Verified on an H200 (OpsCuda.Conv2d*, against the CPU; speeds in bench/RESULTS.md); the workspace
// chunking for inputs over 128 MiB of columns is not exercised by the tests.
#include <string>
#include <vector>

#include "kernels/conv_geometry.h"
#include "kernels/cuda/autotune.h"
#include "kernels/cuda/conv_kernels.cuh"
#include "kernels/cuda/cudnn_conv.h"
#include "kernels/cuda/gemm_plan.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/runtime_cuda.h"
#include "kernels/cuda/stream.h"

namespace pipar::kernels::cuda {
namespace {

using kernels::ConvGeom;
using conv_detail::all_channels;
using conv_detail::ColLayout;
using conv_detail::conv2d_col2im_kernel;
using conv_detail::conv2d_im2col_kernel;
using conv_detail::conv2d_pack_dy_kernel;
using conv_detail::conv2d_unpack_y_kernel;

// Scratch of the GEMM passes is bounded: samples are processed in chunks of at most this many floats.
constexpr int64_t kWorkspaceFloats = int64_t{32} << 20;  // 128 MiB
constexpr int64_t kMaxChunk = 65535;

int64_t chunk_samples(int64_t n, int64_t floats_per_sample) {
  int64_t cs = floats_per_sample > 0 ? kWorkspaceFloats / floats_per_sample : n;
  if (cs < 1) cs = 1;
  if (cs > n) cs = n;
  return cs < kMaxChunk ? cs : kMaxChunk;
}

// --- kernels --------------------------------------------------------------------------------------

// y[s, oc, :] = b[oc] for every sample (the GEMM then accumulates onto it).
__global__ void conv2d_bias_broadcast_kernel(const float* __restrict__ b, float* __restrict__ y, int64_t total,
                                             int64_t k, int64_t plane) {
  for (int64_t i = global_index(); i < total; i += grid_stride()) y[i] = b[(i / plane) % k];
}

// Depthwise forward, one thread per output element; sums in the CPU's order (bias, then i, then j).
__global__ void conv2d_depthwise_forward_kernel(ConvGeom g, const float* __restrict__ x, const float* __restrict__ w,
                                                const float* __restrict__ b, float* __restrict__ y) {
  const int64_t total = g.n * g.k * g.ohw;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t ox = idx % g.ow, t = idx / g.ow;
    const int64_t oy = t % g.oh, t2 = t / g.oh;
    const int64_t oc = t2 % g.k, s = t2 / g.k;
    const int64_t ic = oc / g.kg;
    const float* xp = x + (s * g.c + ic) * g.hw;
    const float* wp = w + oc * g.kh * g.kw;
    float sum = b ? b[oc] : 0.0f;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = oy * g.sh - g.ph + i;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ix = ox * g.sw - g.pw + j;
        if (ix < 0 || ix >= g.w) continue;
        sum += wp[i * g.kw + j] * xp[iy * g.w + ix];
      }
    }
    y[idx] = sum;
  }
}

// Depthwise backward input, one thread per dx element (gather over the kg outputs of its channel).
__global__ void conv2d_depthwise_backward_input_kernel(ConvGeom g, const float* __restrict__ dy,
                                                       const float* __restrict__ w, float* __restrict__ dx) {
  const int64_t total = g.n * g.c * g.hw;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t ix = idx % g.w, t = idx / g.w;
    const int64_t iy = t % g.h, t2 = t / g.h;
    const int64_t ic = t2 % g.c, s = t2 / g.c;
    float sum = 0.0f;
    for (int64_t oc = ic * g.kg; oc < (ic + 1) * g.kg; ++oc) {
      const float* dyp = dy + (s * g.k + oc) * g.ohw;
      const float* wp = w + oc * g.kh * g.kw;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ty = iy + g.ph - i;
        if (ty < 0 || ty % g.sh != 0) continue;
        const int64_t oy = ty / g.sh;
        if (oy >= g.oh) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t tx = ix + g.pw - j;
          if (tx < 0 || tx % g.sw != 0) continue;
          const int64_t ox = tx / g.sw;
          if (ox >= g.ow) continue;
          sum += wp[i * g.kw + j] * dyp[oy * g.ow + ox];
        }
      }
    }
    dx[idx] = sum;
  }
}

// Depthwise backward weight: one block per weight element (oc, i, j), a block-wide sum (in double)
// over samples and output positions, then dw += (one writer per element: no race).
__global__ void __launch_bounds__(kThreads)
    conv2d_depthwise_backward_weight_kernel(ConvGeom g, const float* __restrict__ x, const float* __restrict__ dy,
                                            float* __restrict__ dw) {
  const int64_t e = blockIdx.x;  // grid is exactly k*kh*kw blocks
  const int64_t oc = e / (g.kh * g.kw), ij = e % (g.kh * g.kw);
  const int64_t i = ij / g.kw, j = ij % g.kw, ic = oc / g.kg;
  double sum = 0.0;
  const int64_t total = g.n * g.ohw;
  for (int64_t t = threadIdx.x; t < total; t += blockDim.x) {
    const int64_t p = t % g.ohw, s = t / g.ohw;
    const int64_t iy = (p / g.ow) * g.sh - g.ph + i, ix = (p % g.ow) * g.sw - g.pw + j;
    if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
    sum += static_cast<double>(dy[(s * g.k + oc) * g.ohw + p]) * x[(s * g.c + ic) * g.hw + iy * g.w + ix];
  }
  sum = block_reduce_sum(sum);
  if (threadIdx.x == 0) dw[e] += static_cast<float>(sum);
}

// db[ch] += sum over samples and the plane of dy[s, ch, :]; one block per channel, sums in double.
__global__ void __launch_bounds__(kThreads)
    conv2d_backward_bias_kernel(const float* __restrict__ dy, float* __restrict__ db, int64_t n, int64_t k,
                                int64_t plane) {
  const int64_t ch = blockIdx.x;  // grid is exactly k blocks
  double sum = 0.0;
  const int64_t total = n * plane;
  for (int64_t t = threadIdx.x; t < total; t += blockDim.x) {
    const int64_t s = t / plane, e = t % plane;
    sum += dy[(s * k + ch) * plane + e];
  }
  sum = block_reduce_sum(sum);
  if (threadIdx.x == 0) db[ch] += static_cast<float>(sum);
}

// --- launchers ------------------------------------------------------------------------------------

void conv2d_bias_broadcast(const float* b, float* y, int64_t total, int64_t k, int64_t plane, cudaStream_t s) {
  if (total == 0) return;
  conv2d_bias_broadcast_kernel<<<grid_1d(total), kThreads, 0, s>>>(b, y, total, k, plane);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void conv2d_im2col(const ConvGeom& g, const float* x, float* col, int64_t cs, ColLayout lay, cudaStream_t s) {
  const int64_t total = cs * g.ckk * g.ohw;
  if (total == 0) return;
  conv2d_im2col_kernel<<<grid_1d(total), kThreads, 0, s>>>(g, x, col, cs, lay);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void conv2d_col2im(const ConvGeom& g, const float* col, float* dx, int64_t cs, ColLayout lay, cudaStream_t s) {
  const int64_t total = cs * g.cg * g.hw;
  if (total == 0) return;
  conv2d_col2im_kernel<<<grid_1d(total), kThreads, 0, s>>>(g, col, dx, cs, lay);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void conv2d_pack_dy(const float* dy, float* dst, int64_t cs, int64_t k, int64_t ohw, cudaStream_t s) {
  const int64_t total = cs * k * ohw;
  if (total == 0) return;
  conv2d_pack_dy_kernel<<<grid_1d(total), kThreads, 0, s>>>(dy, dst, cs, k, ohw);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void conv2d_unpack_y(const float* src, const float* b, float* y, int64_t cs, int64_t k, int64_t ohw, cudaStream_t s) {
  const int64_t total = cs * k * ohw;
  if (total == 0) return;
  conv2d_unpack_y_kernel<<<grid_1d(total), kThreads, 0, s>>>(src, b, y, cs, k, ohw);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void conv2d_depthwise_forward(const ConvGeom& g, const float* x, const float* w, const float* b, float* y,
                              cudaStream_t s) {
  const int64_t total = g.n * g.k * g.ohw;
  if (total == 0) return;
  conv2d_depthwise_forward_kernel<<<grid_1d(total), kThreads, 0, s>>>(g, x, w, b, y);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void conv2d_depthwise_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx, cudaStream_t s) {
  const int64_t total = g.n * g.c * g.hw;
  if (total == 0) return;
  conv2d_depthwise_backward_input_kernel<<<grid_1d(total), kThreads, 0, s>>>(g, dy, w, dx);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

void conv2d_depthwise_backward_weight(const ConvGeom& g, const float* x, const float* dy, float* dw, cudaStream_t s) {
  const int64_t blocks = g.k * g.kh * g.kw;
  if (blocks == 0) return;
  PIPAR_CHECK(blocks <= 0x7fffffff, "conv2d_backward_weight: too many weights for one grid: ", blocks);
  conv2d_depthwise_backward_weight_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(g, x, dy, dw);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// Declared in kernel_util.cuh (linear.cu uses it too).
void channel_sum_accumulate(const float* dy, float* db, int64_t n, int64_t k, int64_t plane, cudaStream_t s) {
  if (k == 0) return;
  PIPAR_CHECK(k <= 0x7fffffff, "bias gradient: too many channels for one grid: ", k);
  conv2d_backward_bias_kernel<<<static_cast<unsigned>(k), kThreads, 0, s>>>(dy, db, n, k, plane);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

// --- the GEMM paths (hand-written or cuBLAS GEMM on im2col, as gemm_backend() says), depthwise direct

namespace {


// Scratch of the passes with a chunk's samples side by side as columns: by_channel [k, cs*ohw] (y or
// dy by output channel), then col [c*kh*kw, cs*ohw], for chunks of at most cs_max samples.
struct FoldedScratch {
  int64_t cs_max;
  float* by_channel;
  float* col;
};
FoldedScratch folded_scratch(const ConvGeom& g, StreamRef s) {
  const int64_t rows = g.c * g.kh * g.kw;
  const int64_t cs_max = chunk_samples(g.n, (g.k + rows) * g.ohw);
  float* ws = static_cast<float*>(stream_workspace(s, sizeof(float) * cs_max * (g.k + rows) * g.ohw));
  return FoldedScratch{cs_max, ws, ws + cs_max * g.k * g.ohw};
}

// C = op(A) B per group, alpha 1, beta 0.
void run(const conv_detail::GroupGemm& p, const float* a, const float* b, float* c, StreamRef s) {
  gemm_strided_batched(p.trans_a, false, p.m, p.n, p.k, 1.0f, a, p.lda, p.stride_a, b, p.ldb, p.stride_b, 0.0f, c, p.ldc,
                       p.stride_c, p.batch, s);
}

// Whether forward and backward input lay the samples side by side as GEMM columns.
bool fold(const ConvGeom& g) {
  return gemm_planning() != GemmPlanning::kBaseline && gemm_detail::fold_samples_as_columns(g.ohw, g.n);
}

// Forward with the chunk's samples side by side as columns (gemm_detail::fold_samples_as_columns):
// Y_g [kg, cs*ohw] = W_g [kg, ckk] . col_g [ckk, cs*ohw], the groups batched, then y = Y + b.
void forward_gemm_folded(const ConvGeom& g, ConstView x, ConstView w, ConstView b, View y, StreamRef s) {
  const cudaStream_t st = native(s);
  const ConvGeom all = all_channels(g);
  const auto [cs_max, yc, col] = folded_scratch(g, s);
  for (int64_t s0 = 0; s0 < g.n; s0 += cs_max) {
    const int64_t cs = g.n - s0 < cs_max ? g.n - s0 : cs_max;
    conv2d_im2col(all, x.data + s0 * g.c * g.hw, col, cs, conv_detail::folded_layout(g, cs), st);
    run(conv_detail::folded_forward_gemm(g, cs), w.data, col, yc, s);
    conv2d_unpack_y(yc, b.data, y.data + s0 * g.k * g.ohw, cs, g.k, g.ohw, st);
  }
}

void forward_gemm(const ConvGeom& g, ConstView x, ConstView w, ConstView b, View y, StreamRef s) {
  const cudaStream_t st = native(s);
  if (g.depthwise()) {
    conv2d_depthwise_forward(g, x.data, w.data, b.data, y.data, st);
    return;
  }
  if (fold(g)) return forward_gemm_folded(g, x, w, b, y, s);
  if (b.data) conv2d_bias_broadcast(b.data, y.data, y.numel(), g.k, g.ohw, st);
  const float beta = b.data ? 1.0f : 0.0f;
  const ConvGeom all = all_channels(g);
  const int64_t rows = all.ckk;  // im2col rows of a sample, every group's
  const int64_t cs_max = chunk_samples(g.n, g.pointwise() ? 0 : rows * g.ohw);
  float* col = g.pointwise() ? nullptr
                             : static_cast<float*>(stream_workspace(s, sizeof(float) * cs_max * rows * g.ohw));
  // Y_g[s] [kg, ohw] (+)= W_g [kg, ckk] . col_g[s] [ckk, ohw], for the chunk's samples by the groups in
  // one batched GEMM (a replica stack's convolution has a group per replica).
  for (int64_t s0 = 0; s0 < g.n; s0 += cs_max) {
    const int64_t cs = g.n - s0 < cs_max ? g.n - s0 : cs_max;
    const float* bmat = x.data + s0 * g.c * g.hw;
    int64_t ldb = g.hw, b_sample = g.c * g.hw, b_group = g.cg * g.hw;
    if (!g.pointwise()) {
      conv2d_im2col(all, bmat, col, cs, ColLayout{rows * g.ohw, g.ohw}, st);
      bmat = col, ldb = g.ohw, b_sample = rows * g.ohw, b_group = g.ckk * g.ohw;
    }
    gemm_batched_2d(false, false, g.kg, g.ohw, g.ckk, 1.0f, w.data, g.ckk, 0, g.kg * g.ckk, bmat, ldb, b_sample, b_group,
                    beta, y.data + s0 * g.k * g.ohw, g.ohw, g.k * g.ohw, g.kg * g.ohw, cs, g.groups, s);
  }
}

// Backward input with the chunk's samples side by side as columns: dY packed to [k, cs*ohw], then
// dcol_g [ckk, cs*ohw] = W_g^T [ckk, kg] . dY_g [kg, cs*ohw], the groups batched, then col2im.
void backward_input_gemm_folded(const ConvGeom& g, ConstView dy, ConstView w, View dx, StreamRef s) {
  const cudaStream_t st = native(s);
  const ConvGeom all = all_channels(g);
  const auto [cs_max, dyc, col] = folded_scratch(g, s);
  for (int64_t s0 = 0; s0 < g.n; s0 += cs_max) {
    const int64_t cs = g.n - s0 < cs_max ? g.n - s0 : cs_max;
    conv2d_pack_dy(dy.data + s0 * g.k * g.ohw, dyc, cs, g.k, g.ohw, st);
    run(conv_detail::folded_backward_input_gemm(g, cs), w.data, dyc, col, s);
    conv2d_col2im(all, col, dx.data + s0 * g.c * g.hw, cs, conv_detail::folded_layout(g, cs), st);
  }
}

void backward_input_gemm(const ConvGeom& g, ConstView dy, ConstView w, View dx, StreamRef s) {
  const cudaStream_t st = native(s);
  if (g.depthwise()) {
    conv2d_depthwise_backward_input(g, dy.data, w.data, dx.data, st);
    return;
  }
  if (fold(g)) return backward_input_gemm_folded(g, dy, w, dx, s);
  const ConvGeom all = all_channels(g);
  const int64_t rows = all.ckk;
  const int64_t cs_max = chunk_samples(g.n, g.pointwise() ? 0 : rows * g.ohw);
  float* col = g.pointwise() ? nullptr
                             : static_cast<float*>(stream_workspace(s, sizeof(float) * cs_max * rows * g.ohw));
  // dcol_g[s] [ckk, ohw] = W_g^T [ckk, kg] . dy_g[s] [kg, ohw] for the chunk's samples by the groups in
  // one batched GEMM, then col2im over all channels (overwrites dx).
  for (int64_t s0 = 0; s0 < g.n; s0 += cs_max) {
    const int64_t cs = g.n - s0 < cs_max ? g.n - s0 : cs_max;
    const float* dyc = dy.data + s0 * g.k * g.ohw;
    float* dxc = dx.data + s0 * g.c * g.hw;
    if (g.pointwise()) {
      gemm_batched_2d(true, false, g.ckk, g.ohw, g.kg, 1.0f, w.data, g.ckk, 0, g.kg * g.ckk, dyc, g.ohw, g.k * g.ohw,
                      g.kg * g.ohw, 0.0f, dxc, g.hw, g.c * g.hw, g.cg * g.hw, cs, g.groups, s);
    } else {
      gemm_batched_2d(true, false, g.ckk, g.ohw, g.kg, 1.0f, w.data, g.ckk, 0, g.kg * g.ckk, dyc, g.ohw, g.k * g.ohw,
                      g.kg * g.ohw, 0.0f, col, g.ohw, rows * g.ohw, g.ckk * g.ohw, cs, g.groups, s);
      conv2d_col2im(all, col, dxc, cs, ColLayout{rows * g.ohw, g.ohw}, st);
    }
  }
}

void backward_weight_gemm(const ConvGeom& g, ConstView x, ConstView dy, float* dw, StreamRef s) {
  const cudaStream_t st = native(s);
  if (g.depthwise()) {
    conv2d_depthwise_backward_weight(g, x.data, dy.data, dw, st);
    return;
  }
  // dW_g [kg, ckk] += dy_g [kg, L] . col_g [ckk, L]^T, L = cs*ohw: the chunk's samples side by side as
  // columns, so one GEMM sums over samples and positions; the groups batched in one call.
  const ConvGeom all = all_channels(g);
  const auto [cs_max, dyc, col] = folded_scratch(g, s);
  for (int64_t s0 = 0; s0 < g.n; s0 += cs_max) {
    const int64_t cs = g.n - s0 < cs_max ? g.n - s0 : cs_max, len = cs * g.ohw;
    conv2d_pack_dy(dy.data + s0 * g.k * g.ohw, dyc, cs, g.k, g.ohw, st);
    conv2d_im2col(all, x.data + s0 * g.c * g.hw, col, cs, conv_detail::folded_layout(g, cs), st);
    gemm_strided_batched(false, true, g.kg, g.ckk, len, 1.0f, dyc, len, g.kg * len, col, len, g.ckk * len, 1.0f, dw,
                         g.ckk, g.kg * g.ckk, g.groups, s);
  }
}


// --- implementation choice ------------------------------------------------------------------------

std::string conv_key(const char* pass, const Conv2dParams& p, Shape4 x, Shape4 w, bool bias) {
  return detail::concat("conv.", pass, "|x=", x.n, ",", x.c, ",", x.h, ",", x.w, "|w=", w.n, ",", w.c, ",", w.h, ",",
                        w.w, "|s=", p.sh, ",", p.sw, "|p=", p.ph, ",", p.pw, "|g=", p.groups, "|b=", bias ? 1 : 0);
}

std::vector<Impl> conv_candidates(ConvPass pass, const ConvGeom& g, const Conv2dParams& p, Shape4 x, Shape4 w) {
  std::vector<Impl> c{Impl{Impl::kHandwritten, -1}};
  if (!g.depthwise()) c.push_back(Impl{Impl::kCublas, -1});  // depthwise: direct kernels, no GEMM
  for (int a : cudnn_conv_algos(pass, p, x, w)) c.push_back(Impl{Impl::kCudnn, a});
  return c;
}

void forward_with(const Impl& impl, const ConvGeom& g, const Conv2dParams& p, ConstView x, ConstView w, ConstView b,
                  View y, StreamRef s) {
  if (impl.kind != Impl::kCudnn) return with_gemm(impl, [&] { forward_gemm(g, x, w, b, y, s); });
  if (b.data) conv2d_bias_broadcast(b.data, y.data, y.numel(), g.k, g.ohw, native(s));
  cudnn_conv_forward(impl.algo, p, x, w, b.data ? 1.0f : 0.0f, y, s);
}

void backward_input_with(const Impl& impl, const ConvGeom& g, const Conv2dParams& p, ConstView dy, ConstView w, View dx,
                         StreamRef s) {
  if (impl.kind != Impl::kCudnn) return with_gemm(impl, [&] { backward_input_gemm(g, dy, w, dx, s); });
  cudnn_conv_backward_input(impl.algo, p, dy, w, dx, s);
}

void backward_weight_with(const Impl& impl, const ConvGeom& g, const Conv2dParams& p, ConstView x, ConstView dy,
                          View dw, StreamRef s) {
  if (impl.kind != Impl::kCudnn) return with_gemm(impl, [&] { backward_weight_gemm(g, x, dy, dw.data, s); });
  cudnn_conv_backward_weight(impl.algo, p, x, dy, dw, s);
}

}  // namespace

// --- entry points ---------------------------------------------------------------------------------

void conv2d_forward(const Conv2dParams& p, ConstView x, ConstView w, ConstView b, View y, StreamRef s) {
  checked_stream(s, "conv2d_forward");
  const ConvGeom g = conv_geometry(p, x.shape, y.shape);
  if (y.numel() == 0) return;
  Impl impl;
  if (kernel_choice() != KernelChoice::kHandwritten)
    impl = choose(
        conv_key("fwd", p, x.shape, w.shape, b.data != nullptr),
        [&] { return conv_candidates(ConvPass::kForward, g, p, x.shape, w.shape); },
        [&](const Impl& i) { forward_with(i, g, p, x, w, b, y, s); }, s);
  forward_with(impl, g, p, x, w, b, y, s);
}

void conv2d_backward_input(const Conv2dParams& p, ConstView dy, ConstView w, View dx, StreamRef s) {
  checked_stream(s, "conv2d_backward_input");
  const ConvGeom g = conv_geometry(p, dx.shape, dy.shape);
  if (dx.numel() == 0) return;
  Impl impl;
  if (kernel_choice() != KernelChoice::kHandwritten)
    impl = choose(
        conv_key("bwd_x", p, dx.shape, w.shape, false),
        [&] { return conv_candidates(ConvPass::kBackwardInput, g, p, dx.shape, w.shape); },
        [&](const Impl& i) { backward_input_with(i, g, p, dy, w, dx, s); }, s);
  backward_input_with(impl, g, p, dy, w, dx, s);
}

void conv2d_backward_weight(const Conv2dParams& p, ConstView x, ConstView dy, View dw, StreamRef s) {
  checked_stream(s, "conv2d_backward_weight");
  const ConvGeom g = conv_geometry(p, x.shape, dy.shape);
  if (dw.numel() == 0 || g.n == 0) return;
  Impl impl;
  if (kernel_choice() != KernelChoice::kHandwritten) {
    TrialScratch scratch(s);
    impl = choose(
        conv_key("bwd_w", p, x.shape, dw.shape, false),
        [&] { return conv_candidates(ConvPass::kBackwardWeight, g, p, x.shape, dw.shape); },
        [&](const Impl& i) { backward_weight_with(i, g, p, x, dy, View{scratch.get(dw.numel()), dw.shape, dw.device}, s); },
        s);
  }
  backward_weight_with(impl, g, p, x, dy, dw, s);
}

void conv2d_backward_bias(ConstView dy, View db, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "conv2d_backward_bias");
  channel_sum_accumulate(dy.data, db.data, dy.shape.n, dy.shape.c, dy.shape.h * dy.shape.w, st);
}

}  // namespace pipar::kernels::cuda
