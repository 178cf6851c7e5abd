// Convolutions with few input taps (cg·kh·kw <= kSmallTapsMax, groups 1: the first layer of an image
// model, 1 or 3 input channels): passes that write y once with the bias fused and read dy once for the
// weight gradient, over small im2col tiles kept in cache (conv_small.cpp); the per-ISA kernels under
// them (conv_small_kernels.h, instantiated by conv_small{,_avx2,_avx512}.cpp).
#pragma once
#include <cstdint>

#include "kernels/conv_geometry.h"

namespace pipar::kernels::cpu {

// Up to 27 taps (3 channels × 3×3, CIFAR's first layer). Measured on fmnist.conv1 (9 taps) and
// cifar10.conv1 (27), Zen 4, 2 threads: see conv_small.cpp for the figures against the GEMM path.
constexpr int64_t kSmallTapsMax = 27;

// Whether the passes below take this convolution (groups 1, at most kSmallTapsMax taps).
bool small_taps_applies(const ConvGeom& g);
// y = conv(x, w) + b (b may be null); overwrites y.
void conv2d_forward_small_taps(const ConvGeom& g, const float* x, const float* w, const float* b, float* y);
// dw += correlate(x, dy); the sum order depends on the shapes and ISA only (not on threads or schedule).
void conv2d_backward_weight_small_taps(const ConvGeom& g, const float* x, const float* dy, float* dw);

namespace detail {

// Kernels over one im2col tile col [taps, pixels] (row stride ldcol, columns readable and zero up to a
// multiple of vec), for all k output channels at once.
struct SmallTapKernels {
  int vec = 0;        // floats per vector
  int tap_block = 0;  // the weight kernel's taps must be a multiple of this (col padded with zero rows)
  // y[r·ldy + p] = bias[r] + sum_t w[r·ldw + t] · col[toff[t] + p] for r < k, p < pixels (bias may be
  // null); each tap's row col + toff[t] readable up to pixels rounded up to vec.
  void (*forward)(int64_t k, int64_t taps, const float* col, const int64_t* toff, const float* w, int64_t ldw,
                  const float* bias, float* y, int64_t ldy, int64_t pixels) = nullptr;
  // acc[(r·taps + t)·vec + l] += sum over pixels p ≡ l (mod vec) of dy[r·ldy + p] · col[t·ldcol + p].
  void (*weight)(int64_t k, int64_t taps, const float* col, int64_t ldcol, const float* dy, int64_t ldy,
                 int64_t pixels, float* acc) = nullptr;
};
SmallTapKernels small_tap_kernels_generic();
#if PIPAR_X86
SmallTapKernels small_tap_kernels_avx2();    // conv_small_avx2.cpp
SmallTapKernels small_tap_kernels_avx512();  // conv_small_avx512.cpp
#endif
SmallTapKernels select_small_tap_kernels();  // by cpu_isa(), read at each call

}  // namespace detail
}  // namespace pipar::kernels::cpu
