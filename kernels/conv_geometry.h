// Convolution geometry, derived once from the params and the shapes: shared by the CPU and the CUDA
// backend so that both index the same way.
#pragma once
#include <algorithm>
#include <cstdint>

#include "kernels/ops.h"

namespace pipar::kernels {

struct ConvGeom {
  int64_t n, c, h, w;       // input
  int64_t k, oh, ow;        // output channels and size
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t groups, cg, kg;   // groups; input and output channels per group
  int64_t ckk, hw, ohw;     // im2col rows per group (cg*kh*kw), input and output plane sizes
  PIPAR_HOST_DEVICE bool pointwise() const { return kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
  PIPAR_HOST_DEVICE bool depthwise() const { return groups > 1 && groups == c && cg == 1; }
};

// x and y are the (already validated) input and output shapes of the convolution.
inline ConvGeom conv_geometry(const Conv2dParams& p, Shape4 x, Shape4 y) {
  ConvGeom g{};
  g.n = x.n, g.c = x.c, g.h = x.h, g.w = x.w;
  g.k = y.c, g.oh = y.h, g.ow = y.w;
  g.kh = p.kh, g.kw = p.kw, g.sh = p.sh, g.sw = p.sw, g.ph = p.ph, g.pw = p.pw;
  g.groups = p.groups, g.cg = x.c / p.groups, g.kg = y.c / p.groups;
  g.ckk = g.cg * g.kh * g.kw, g.hw = g.h * g.w, g.ohw = g.oh * g.ow;
  return g;
}

// Outputs o in [lo, hi) whose input o*s - pad + j lies in [0, in) (host code: the CPU passes' border
// handling).
inline void valid_range(int64_t out, int64_t in, int64_t s, int64_t pad, int64_t j, int64_t& lo, int64_t& hi) {
  const int64_t first = pad - j, last = in - 1 + pad - j;
  lo = first <= 0 ? 0 : (first + s - 1) / s;
  hi = last < 0 ? 0 : last / s + 1;
  lo = std::min(lo, out);
  hi = std::max(lo, std::min(hi, out));
}

}  // namespace pipar::kernels
