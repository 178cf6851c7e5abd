// The layout kernels of a convolution's GEMM passes (conv2d.cu): im2col, col2im, and the reordering
// between [samples, channels, positions] and [channels, samples x positions], with the parameters of
// the GEMMs that run on them when a chunk's samples lie side by side as columns. Header without CUDA
// includes, read by nvcc (conv2d.cu) and by the CPU tests through the kernel emulation
// (tests/kernels/cuda_emulated_test.cpp).
#pragma once
#include <cstdint>

#include "kernels/conv_geometry.h"
#include "kernels/cuda/grid_index.cuh"

namespace pipar::kernels::cuda::conv_detail {

using kernels::ConvGeom;

// im2col/col2im layout of a chunk of cs samples: element (s, row, p) of the column matrix lives at
// col[s*s_stride + row*r_stride + p], row = (c*kh + i)*kw + j, p = oy*ow + ox.
struct ColLayout {
  int64_t s_stride, r_stride;
};

// The kernels have internal linkage: the emulation's host copies in the test binary must never be
// confused with the CUDA library's.
namespace {

// x points at channel 0 of the group in sample 0 of the chunk; a sample's stride is g.c*g.hw.
__global__ void conv2d_im2col_kernel(ConvGeom g, const float* __restrict__ x, float* __restrict__ col, int64_t cs,
                                     ColLayout lay) {
  const int64_t total = cs * g.ckk * g.ohw;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t p = idx % g.ohw, t = idx / g.ohw;
    const int64_t row = t % g.ckk, s = t / g.ckk;
    const int64_t ch = row / (g.kh * g.kw), ij = row % (g.kh * g.kw);
    const int64_t i = ij / g.kw, j = ij % g.kw;
    const int64_t iy = (p / g.ow) * g.sh - g.ph + i, ix = (p % g.ow) * g.sw - g.pw + j;
    float v = 0.0f;
    if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[(s * g.c + ch) * g.hw + iy * g.w + ix];
    col[s * lay.s_stride + row * lay.r_stride + p] = v;
  }
}

// dx (channel 0 of the group, sample 0 of the chunk) = col2im(col): each dx element gathers the column
// entries that im2col copied it to, so dx is overwritten and no two threads write one address.
__global__ void conv2d_col2im_kernel(ConvGeom g, const float* __restrict__ col, float* __restrict__ dx, int64_t cs,
                                     ColLayout lay) {
  const int64_t total = cs * g.cg * g.hw;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t ix = idx % g.w, t = idx / g.w;
    const int64_t iy = t % g.h, t2 = t / g.h;
    const int64_t ch = t2 % g.cg, s = t2 / g.cg;
    const float* cs_base = col + s * lay.s_stride;
    float sum = 0.0f;
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
        sum += cs_base[((ch * g.kh + i) * g.kw + j) * lay.r_stride + oy * g.ow + ox];
      }
    }
    dx[(s * g.c + ch) * g.hw + iy * g.w + ix] = sum;
  }
}

// dst [k, cs*ohw] = dy chunk [cs, k, ohw] with samples laid side by side as columns.
__global__ void conv2d_pack_dy_kernel(const float* __restrict__ dy, float* __restrict__ dst, int64_t cs, int64_t k,
                                      int64_t ohw) {
  const int64_t total = cs * k * ohw, len = cs * ohw;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t p = idx % ohw, t = idx / ohw;
    const int64_t kk = t % k, s = t / k;
    dst[kk * len + s * ohw + p] = dy[idx];
  }
}

// y chunk [cs, k, ohw] = src [k, cs*ohw] (samples side by side as columns) + b[channel] (b may be null):
// the inverse of conv2d_pack_dy, with the bias the per-sample path starts y with.
__global__ void conv2d_unpack_y_kernel(const float* __restrict__ src, const float* __restrict__ b,
                                       float* __restrict__ y, int64_t cs, int64_t k, int64_t ohw) {
  const int64_t total = cs * k * ohw, len = cs * ohw;
  for (int64_t idx = global_index(); idx < total; idx += grid_stride()) {
    const int64_t p = idx % ohw, t = idx / ohw;
    const int64_t kk = t % k, s = t / k;
    const float v = src[kk * len + s * ohw + p];
    y[idx] = b ? v + b[kk] : v;
  }
}

}  // namespace

// im2col and col2im over all of a sample's channels at once: the rows of group grp are
// [grp * ckk, (grp + 1) * ckk) (the kernels read cg and ckk only, not the group count).
inline ConvGeom all_channels(const ConvGeom& g) {
  ConvGeom a = g;
  a.cg = g.c;
  a.ckk = g.c * g.kh * g.kw;
  return a;
}

// --- samples side by side as columns (gemm_detail::fold_samples_as_columns) ----------------------

// The column matrix of a chunk of cs samples over all channels: [c*kh*kw, cs*ohw], sample s's block of
// columns at s*ohw.
inline ColLayout folded_layout(const ConvGeom& g, int64_t cs) { return ColLayout{g.ohw, cs * g.ohw}; }

// A batched GEMM, batch over the groups: C_i = op(A_i) B_i, A_i at a + i*stride_a (likewise B, C).
struct GroupGemm {
  bool trans_a;
  int64_t m, n, k, lda, stride_a, ldb, stride_b, ldc, stride_c, batch;
};

// Forward: Y_g [kg, cs*ohw] = W_g [kg, ckk] . col_g [ckk, cs*ohw] into scratch [k, cs*ohw] (then
// conv2d_unpack_y). A = the weights, B = the column matrix, C = the scratch.
inline GroupGemm folded_forward_gemm(const ConvGeom& g, int64_t cs) {
  const int64_t len = cs * g.ohw;
  return GroupGemm{false, g.kg, len, g.ckk, g.ckk, g.kg * g.ckk, len, g.ckk * len, len, g.kg * len, g.groups};
}

// Backward input: dcol_g [ckk, cs*ohw] = W_g^T [ckk, kg] . dY_g [kg, cs*ohw] (dY packed by
// conv2d_pack_dy, then col2im). A = the weights, B = the packed dY, C = the column matrix.
inline GroupGemm folded_backward_input_gemm(const ConvGeom& g, int64_t cs) {
  const int64_t len = cs * g.ohw;
  return GroupGemm{true, g.ckk, len, g.kg, g.ckk, g.kg * g.ckk, len, g.kg * len, len, g.ckk * len, g.groups};
}

}  // namespace pipar::kernels::cuda::conv_detail
