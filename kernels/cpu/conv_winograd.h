// Winograd convolution F(2x2, 3x3) for 3x3 stride-1 convolutions (Lavin & Gray 2016): each 2x2 block
// of outputs ("tile") comes from a 4x4 input patch with 16 multiplies per (input, output) channel pair
// instead of 36, the products at the 16 transformed positions being 16 GEMMs over channels. Used for
// the forward pass, through the transposed convolution for the stride-1 backward-input pass, and as
// F(3x3, 2x2) for the weight gradient (16 products per 2x2 block of dy instead of 36).
#pragma once
#include <cstdint>

#include "kernels/conv_geometry.h"

namespace pipar::kernels::cpu::detail {

// How conv2d_winograd reads w: kForward, [k, c, 3, 3] as given; kTransposed, the forward weights of
// the convolution whose input gradient this is, [c, k, 3, 3] (this geometry's c and k), used with the
// taps flipped, W'[k, c, i, j] = W[c, k, 2-i, 2-j].
enum class WinogradWeights { kForward, kTransposed };

// AVX2 or AVX-512 (the transforms, in AVX2, and the GEMMs, through the indirect kernel of
// gemm_internal.h, run channels last): conv2d_winograd* may be called on any 3x3 stride-1 geometry.
bool winograd_supported();
// What the conv2d entry points take it for: winograd_supported(), 3x3, stride 1, one group, padding at
// most 2 (a tile's patch starts at most 2 before the image), 16+ channels on both sides and at most
// 128x128 pairs of them, 128+ tiles (2x2 output blocks) in the call: where the transforms pay.
bool winograd_applies(const ConvGeom& g);

// dw [k, c, 3, 3] += the weight gradient of y = conv(x, w) for dy [n, k, oh, ow] (Winograd F(3x3, 2x2):
// 16 products per 2x2 block of dy instead of 36), for a geometry winograd_applies to. Partial sums per
// chunk of tiles (chunks fixed by the size and thread count), added in chunk order: the result depends
// on the thread count, not on the schedule.
void conv2d_winograd_backward_weight(const ConvGeom& g, const float* x, const float* dy, float* dw, int threads);

// y [n, k, oh, ow] = conv(x [n, c, h, w], w) (+ bias when not null) for a geometry winograd_applies to,
// on `threads` threads (chunks of tiles taken dynamically: the result does not depend on the schedule).
void conv2d_winograd(const ConvGeom& g, const float* x, const float* w, WinogradWeights layout, const float* bias,
                     float* y, int threads);

// --- the transforms (conv_winograd_avx2.cpp) ---------------------------------------------------------
// Channels are the vector dimension everywhere (planes of 7 or 14 pixels hold only 4 or 7 tiles per
// row, too few lanes): cp = c and kp = k rounded up to 16, zeros past c and k.

struct WinogradShape {
  int64_t c, k, cp, kp;  // input, output channels; both rounded up to 16
  int64_t h, w;          // input plane
  int64_t oh, ow;        // output plane
  int64_t ph, pw;        // padding
  int64_t th, tw;        // tiles per column and per row: ceil(oh / 2), ceil(ow / 2)
  int64_t wpad() const { return 2 * tw + 2; }  // padded input row: >= w + 2·pw
};

struct WinogradKernels {
  // ut [16][c][kp] = G g G^T for input channels [c0, c1), every output channel; scratch: 9·(c1-c0)·k floats.
  void (*weights)(const WinogradShape& s, const float* w, bool flipped, int64_t c0, int64_t c1, float* scratch,
                  float* ut);
  // Tile rows [ty0, ty1) of sample n, tile t = (ty - ty0)·tw + tx: v[xi·vstride + t·cp + c] = (B^T d B)[xi];
  // xpad: (2·(ty1-ty0) + 2)·wpad·cp floats for the zero-padded input rows, channels last.
  void (*input)(const WinogradShape& s, const float* x, int64_t n, int64_t ty0, int64_t ty1, float* xpad, float* v,
                int64_t vstride);
  // y of the same tiles (+ bias) = A^T m A from m[xi·mstride + t·kp + k]; out: 2·(ty1-ty0)·ow·kp floats
  // for the pixels channels last before their transpose into y.
  void (*output)(const WinogradShape& s, const float* m, int64_t mstride, int64_t n, int64_t ty0, int64_t ty1,
                 const float* bias, float* out, float* y);
  // Weight gradient. The same tiles of dy [n, k, oh, ow]: d[xi·dstride + t·kp + k] = (A dy A^T)[xi], where
  // A = (A^T)^T (4 × 2: every 2x2 block of dy, zeros past the plane); dypad: 2·(ty1-ty0)·2·tw·kp floats.
  void (*grad_output)(const WinogradShape& s, const float* dy, int64_t n, int64_t ty0, int64_t ty1, float* dypad,
                      float* d, int64_t dstride);
  // dw [k, c, 3, 3] += G^T m G for output channels [k0, k1), m the sum of `parts` partials part_stride
  // apart, each m[xi·k·cp + k·cp + c] (sums over tiles of V ⊙ D), added in order; scratch: 9·cp floats.
  void (*weight_grad)(const WinogradShape& s, const float* m, int64_t parts, int64_t part_stride, int64_t k0,
                      int64_t k1, float* scratch, float* dw);
};
#if PIPAR_X86
WinogradKernels winograd_kernels_avx2();  // AVX2 + FMA: also what AVX-512 machines run
#endif

}  // namespace pipar::kernels::cpu::detail
