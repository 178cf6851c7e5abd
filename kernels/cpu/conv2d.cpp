// CPU conv2d: im2col + the packed GEMM (gemm_internal.h) for regular and grouped convolutions (1x1
// stride-1 unpadded ones read x directly), direct loops for depthwise ones (one input channel per
// group). Batches are split across threads sample by sample; batch-1 calls thread inside the GEMM.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/ops.h"
#include "kernels/parallel.h"

namespace pipar::kernels::cpu {
namespace {

using detail::AlignedBuffer;
using detail::MicroKernel;
using detail::PackedA;

// --- geometry ---------------------------------------------------------------------------------------

struct ConvGeom {
  int64_t n, c, h, w;       // input
  int64_t k, oh, ow;        // output channels and size
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t groups, cg, kg;   // groups; input and output channels per group
  int64_t ckk, hw, ohw;     // im2col rows per group (cg*kh*kw), input and output plane sizes
  bool pointwise() const { return kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
  bool depthwise() const { return groups > 1 && groups == c && cg == 1; }
};

ConvGeom geometry(const Conv2dParams& p, Shape4 x, Shape4 y) {
  ConvGeom g{};
  g.n = x.n, g.c = x.c, g.h = x.h, g.w = x.w;
  g.k = y.c, g.oh = y.h, g.ow = y.w;
  g.kh = p.kh, g.kw = p.kw, g.sh = p.sh, g.sw = p.sw, g.ph = p.ph, g.pw = p.pw;
  g.groups = p.groups, g.cg = x.c / p.groups, g.kg = y.c / p.groups;
  g.ckk = g.cg * g.kh * g.kw, g.hw = g.h * g.w, g.ohw = g.oh * g.ow;
  return g;
}

// Outputs o in [lo, hi) whose input o*s - pad + j lies in [0, in).
inline void valid_range(int64_t out, int64_t in, int64_t s, int64_t pad, int64_t j, int64_t& lo, int64_t& hi) {
  const int64_t first = pad - j, last = in - 1 + pad - j;
  lo = first <= 0 ? 0 : (first + s - 1) / s;
  hi = last < 0 ? 0 : last / s + 1;
  lo = std::min(lo, out);
  hi = std::max(lo, std::min(hi, out));
}

// Sum of n floats with 16 independent lanes (vectorizes without -ffast-math).
inline float sum_floats(const float* v, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += v[i + l];
  float s = 0.0f;
  for (; i < n; ++i) s += v[i];
  for (int l = 0; l < 16; ++l) s += lanes[l];
  return s;
}

// --- im2col / col2im --------------------------------------------------------------------------------

// col rows (c, i, j) of one group's cg input planes x [cg, h, w], each ohw long, row stride ldcol.
void im2col(const ConvGeom& g, const float* x, float* col, int64_t ldcol) {
  for (int64_t c = 0; c < g.cg; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        float* dst = col + ((c * g.kh + i) * g.kw + j) * ldcol;
        int64_t lo, hi;
        valid_range(g.ow, g.w, g.sw, g.pw, j, lo, hi);
        const int64_t off = j - g.pw;
        for (int64_t oy = 0; oy < g.oh; ++oy) {
          float* d = dst + oy * g.ow;
          const int64_t iy = oy * g.sh - g.ph + i;
          if (iy < 0 || iy >= g.h) {
            std::memset(d, 0, sizeof(float) * g.ow);
            continue;
          }
          const float* src = x + (c * g.h + iy) * g.w;
          for (int64_t ox = 0; ox < lo; ++ox) d[ox] = 0.0f;
          if (g.sw == 1) {
            if (hi > lo) std::memcpy(d + lo, src + lo + off, sizeof(float) * (hi - lo));
          } else {
            for (int64_t ox = lo; ox < hi; ++ox) d[ox] = src[ox * g.sw + off];
          }
          for (int64_t ox = hi; ox < g.ow; ++ox) d[ox] = 0.0f;
        }
      }
}

// dx [cg, h, w] += the col2im of col (the adjoint of im2col).
void col2im_add(const ConvGeom& g, const float* col, int64_t ldcol, float* dx) {
  for (int64_t c = 0; c < g.cg; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        const float* src = col + ((c * g.kh + i) * g.kw + j) * ldcol;
        int64_t lo, hi;
        valid_range(g.ow, g.w, g.sw, g.pw, j, lo, hi);
        const int64_t off = j - g.pw;
        for (int64_t oy = 0; oy < g.oh; ++oy) {
          const int64_t iy = oy * g.sh - g.ph + i;
          if (iy < 0 || iy >= g.h) continue;
          const float* s = src + oy * g.ow;
          float* d = dx + (c * g.h + iy) * g.w;
          if (g.sw == 1) {
            float* dd = d + off;
            for (int64_t ox = lo; ox < hi; ++ox) dd[ox] += s[ox];
          } else {
            for (int64_t ox = lo; ox < hi; ++ox) d[ox * g.sw + off] += s[ox];
          }
        }
      }
}

// --- depthwise (direct) -----------------------------------------------------------------------------
// groups == c, one input channel per group, kg = k / c output channels per input channel.

void depthwise_forward(const ConvGeom& g, const float* x, const float* w, const float* b, float* y) {
  const int64_t planes = g.n * g.k;
  const int threads = planes * g.ohw * g.kh * g.kw < 64 * 1024 ? 1 : num_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t s = pl / g.k, oc = pl % g.k, ic = oc / g.kg;
    float* yp = y + pl * g.ohw;
    const float* xp = x + (s * g.c + ic) * g.hw;
    const float* wp = w + oc * g.kh * g.kw;
    const float bias = b ? b[oc] : 0.0f;
    for (int64_t e = 0; e < g.ohw; ++e) yp[e] = bias;
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        const int64_t iy = oy * g.sh - g.ph + i;
        if (iy < 0 || iy >= g.h) continue;
        const float* xr = xp + iy * g.w;
        float* yr = yp + oy * g.ow;
        for (int64_t j = 0; j < g.kw; ++j) {
          int64_t lo, hi;
          valid_range(g.ow, g.w, g.sw, g.pw, j, lo, hi);
          const float wv = wp[i * g.kw + j];
          const int64_t off = j - g.pw;
          if (g.sw == 1) {
            const float* xs = xr + off;
            for (int64_t ox = lo; ox < hi; ++ox) yr[ox] += wv * xs[ox];
          } else {
            for (int64_t ox = lo; ox < hi; ++ox) yr[ox] += wv * xr[ox * g.sw + off];
          }
        }
      }
  }
}

void depthwise_backward_input(const ConvGeom& g, const float* dy, const float* w, float* dx) {
  const int64_t planes = g.n * g.c;
  const int threads = g.n * g.k * g.ohw * g.kh * g.kw < 64 * 1024 ? 1 : num_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t s = pl / g.c, ic = pl % g.c;
    float* dxp = dx + pl * g.hw;
    std::memset(dxp, 0, sizeof(float) * g.hw);
    for (int64_t oc = ic * g.kg; oc < (ic + 1) * g.kg; ++oc) {
      const float* dyp = dy + (s * g.k + oc) * g.ohw;
      const float* wp = w + oc * g.kh * g.kw;
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t oy = 0; oy < g.oh; ++oy) {
          const int64_t iy = oy * g.sh - g.ph + i;
          if (iy < 0 || iy >= g.h) continue;
          float* dxr = dxp + iy * g.w;
          const float* dyr = dyp + oy * g.ow;
          for (int64_t j = 0; j < g.kw; ++j) {
            int64_t lo, hi;
            valid_range(g.ow, g.w, g.sw, g.pw, j, lo, hi);
            const float wv = wp[i * g.kw + j];
            const int64_t off = j - g.pw;
            if (g.sw == 1) {
              float* ds = dxr + off;
              for (int64_t ox = lo; ox < hi; ++ox) ds[ox] += wv * dyr[ox];
            } else {
              for (int64_t ox = lo; ox < hi; ++ox) dxr[ox * g.sw + off] += wv * dyr[ox];
            }
          }
        }
    }
  }
}

void depthwise_backward_weight(const ConvGeom& g, const float* x, const float* dy, float* dw) {
  const int threads = g.n * g.k * g.ohw * g.kh * g.kw < 64 * 1024 ? 1 : num_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t oc = 0; oc < g.k; ++oc) {
    const int64_t ic = oc / g.kg;
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo, hi;
        valid_range(g.ow, g.w, g.sw, g.pw, j, lo, hi);
        const int64_t off = j - g.pw;
        float lanes[8] = {};
        float tail = 0.0f;
        for (int64_t s = 0; s < g.n; ++s) {
          const float* xp = x + (s * g.c + ic) * g.hw;
          const float* dyp = dy + (s * g.k + oc) * g.ohw;
          for (int64_t oy = 0; oy < g.oh; ++oy) {
            const int64_t iy = oy * g.sh - g.ph + i;
            if (iy < 0 || iy >= g.h) continue;
            const float* xr = xp + iy * g.w;
            const float* dyr = dyp + oy * g.ow;
            int64_t ox = lo;
            if (g.sw == 1) {
              const float* xs = xr + off;
              for (; ox + 8 <= hi; ox += 8)
                for (int l = 0; l < 8; ++l) lanes[l] += dyr[ox + l] * xs[ox + l];
            }
            for (; ox < hi; ++ox) tail += dyr[ox] * xr[ox * g.sw + off];
          }
        }
        float sum = tail;
        for (int l = 0; l < 8; ++l) sum += lanes[l];
        dw[oc * g.kh * g.kw + i * g.kw + j] += sum;
      }
  }
}

// --- GEMM-based passes ------------------------------------------------------------------------------

// Packs per group: W_g [kg, ckk] (forward) or W_g^T [ckk, kg] (backward input), once per call.
std::vector<PackedA>& pack_weights(const MicroKernel& uk, const ConvGeom& g, const float* w, bool transposed,
                                   int threads) {
  thread_local std::vector<PackedA> packed;
  if (static_cast<int64_t>(packed.size()) < g.groups) packed.resize(g.groups);
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const float* wg = w + grp * g.kg * g.ckk;
    if (!transposed) packed[grp].pack(uk, false, g.kg, g.ckk, 1.0f, wg, g.ckk, threads);
    else packed[grp].pack(uk, true, g.ckk, g.kg, 1.0f, wg, g.ckk, threads);
  }
  return packed;
}

// Samples are processed in chunks laid side by side as GEMM columns (cs * ohw >= kTargetColumns, so
// that small images still fill whole micro-tiles and amortise C updates). Chunks go to threads when
// there are at least as many as threads (dynamically: outputs are disjoint, so results do not depend
// on the schedule, and a thread the OS preempts holds up no one); otherwise chunks run in order with
// the GEMM threaded.
constexpr int64_t kTargetColumns = 512;

struct Chunking {
  int64_t chunks;
  bool across_threads;
  int gemm_threads;
  int64_t begin(int64_t i, int64_t n) const { return n * i / chunks; }
};

Chunking chunking(int64_t n, int64_t ohw, int threads) {
  const int64_t per = std::min<int64_t>(n, std::max<int64_t>(1, (kTargetColumns + ohw - 1) / ohw));
  int64_t chunks = (n + per - 1) / per;
  if (threads > 1 && n >= threads) {
    chunks = std::min<int64_t>(n, (chunks + threads - 1) / threads * threads);
    return {chunks, true, 1};
  }
  return {chunks, false, threads};
}

template <class F>
void for_each_chunk(const Chunking& ch, int threads, F&& f) {
  if (ch.across_threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < ch.chunks; ++i) f(i, 1);
  } else {
    for (int64_t i = 0; i < ch.chunks; ++i) f(i, ch.gemm_threads);
  }
}

int conv_threads(const ConvGeom& g) {
  const int64_t macs = g.n * g.k * g.ohw * g.ckk;
  return macs < 256 * 1024 ? 1 : num_threads();
}

void zero_columns(float* m, int64_t rows, int64_t ld, int64_t from) {
  if (from >= ld) return;
  for (int64_t r = 0; r < rows; ++r) std::memset(m + r * ld + from, 0, sizeof(float) * (ld - from));
}

// --- direct passes (indirect kernel, AVX-512) --------------------------------------------------------
// The image is zero-padded once per chunk (x is 1/kh·kw the size of its im2col) and read in place: an
// output pixel's window starts at its own pointer into the padded planes, and tap (c, i, j) sits at
// the same offset c·hp·wp + i·wp + j from every window. Channels are the vector dimension (weights and
// dy are laid channels last), so 7- and 14-wide rows waste no lanes. Measured on the VGG5 layers
// (Zen 4, 1 thread): forward and backward-input of fmnist.conv3 from 62-74 to ~XX GFLOP/s, because
// im2col/col2im of short rows (memcpy/memset of 7 floats) had cost ~35% of the time.

constexpr int64_t kDirectMinTaps = 64;  // below (conv1: 9 or 27 taps) the per-tile transpose dominates
// Samples per kernel call in the weight gradient: ~256 pixels amortise the tile's load and store
// (64 to 512 measured the same on the VGG5 layers).
constexpr int64_t kWeightStepPixels = 256;

int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

struct PaddedGeom {
  int64_t hp, wp, plane, per_sample;  // padded plane sizes; floats per sample (cg planes)
};

PaddedGeom padded(const ConvGeom& g) {
  const int64_t hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
  return {hp, wp, hp * wp, g.cg * hp * wp};
}

// planes [count, h, w] → dst [count, hp, wp] with ph rows / pw columns of zeros around each. One
// memset of the block then plain row copies: per-row memcpy calls and border loops cost ~10% of the
// VGG5 7x7 layers.
void pad_planes(const ConvGeom& g, const PaddedGeom& pg, const float* src, int64_t count, float* dst) {
  std::memset(dst, 0, sizeof(float) * count * pg.plane);
  for (int64_t c = 0; c < count; ++c)
    for (int64_t y = 0; y < g.h; ++y) {
      float* __restrict row = dst + c * pg.plane + (g.ph + y) * pg.wp + g.pw;
      const float* __restrict from = src + (c * g.h + y) * g.w;
      for (int64_t x = 0; x < g.w; ++x) row[x] = from[x];
    }
}

// Offsets of the taps (c, i, j) from a window's corner in the padded planes.
std::vector<int64_t> tap_offsets(const ConvGeom& g, const PaddedGeom& pg) {
  std::vector<int64_t> off(g.ckk);
  for (int64_t c = 0; c < g.cg; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) off[(c * g.kh + i) * g.kw + j] = c * pg.plane + i * pg.wp + j;
  return off;
}

// Window corner of output pixel e of a chunk (e over samples × oh × ow).
inline int64_t window_offset(const ConvGeom& g, const PaddedGeom& pg, int64_t e) {
  const int64_t s = e / g.ohw, pix = e % g.ohw;
  return s * pg.per_sample + (pix / g.ow) * g.sh * pg.wp + (pix % g.ow) * g.sw;
}

bool direct_applies(const ConvGeom& g, int threads, int64_t vector_channels) {
  return detail::select_indirect_kernel(4).fn && !g.depthwise() && !g.pointwise() && g.ckk >= kDirectMinTaps &&
         vector_channels >= 16 && (threads <= 1 || g.n >= threads);
}

// y [n, k, oh, ow] = conv(x, W) (+ bias), W given channels last: wt[grp][tap][kp], zero past kg.
void conv2d_forward_direct(const ConvGeom& g, const float* x, const float* wt, int64_t kp, const float* bias, float* y,
                           int threads) {
  const PaddedGeom pg = padded(g);
  const std::vector<int64_t> taps = tap_offsets(g, pg);
  const Chunking ch = chunking(g.n, g.ohw, threads);
  for_each_chunk(ch, threads, [&](int64_t ci, int) {
    thread_local AlignedBuffer pad_buf;
    const int64_t s0 = ch.begin(ci, g.n), cs = ch.begin(ci + 1, g.n) - s0, pixels = cs * g.ohw;
    float* xp = pad_buf.get(static_cast<size_t>(cs * pg.per_sample));
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      for (int64_t s = 0; s < cs; ++s)
        pad_planes(g, pg, x + ((s0 + s) * g.c + grp * g.cg) * g.hw, g.cg, xp + s * pg.per_sample);
      for (int64_t k0 = 0; k0 < g.kg; k0 += 64) {
        const int nv = static_cast<int>(std::min<int64_t>(4, (g.kg - k0 + 15) / 16));
        const detail::IndirectKernel uk = detail::select_indirect_kernel(nv);
        const int64_t kv = std::min<int64_t>(16 * nv, g.kg - k0);
        for (int64_t t0 = 0; t0 < pixels; t0 += uk.mr) {
          const int64_t rv = std::min<int64_t>(uk.mr, pixels - t0);
          const float* rows[8];
          float* dst[8];
          for (int64_t r = 0; r < uk.mr; ++r) {
            const int64_t e = t0 + std::min(r, rv - 1);  // rows past the end repeat the last one
            rows[r] = xp + window_offset(g, pg, e);
            dst[r] = y + ((s0 + e / g.ohw) * g.k + grp * g.kg + k0) * g.ohw + e % g.ohw;
          }
          alignas(64) float tile[8 * 64];
          uk.fn(g.ckk, taps.data(), rows, wt + grp * g.ckk * kp + k0, kp, tile);
          for (int64_t kk = 0; kk < kv; ++kk) {
            const float bv = bias ? bias[grp * g.kg + k0 + kk] : 0.0f;
            for (int64_t r = 0; r < rv; ++r) dst[r][kk * g.ohw] = tile[r * nv * 16 + kk] + bv;
          }
        }
      }
    }
  });
}

// W [k, cg, kh, kw] channels last for the forward pass: wt[grp][(c, i, j)][kk], kk < kp (zeros past kg).
float* pack_weights_forward(const ConvGeom& g, const float* w, int64_t kp) {
  thread_local AlignedBuffer buf;
  float* wt = buf.get(static_cast<size_t>(g.groups * g.ckk * kp));
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t q = 0; q < g.ckk; ++q) {
      float* d = wt + (grp * g.ckk + q) * kp;
      for (int64_t kk = 0; kk < kp; ++kk) d[kk] = kk < g.kg ? w[(grp * g.kg + kk) * g.ckk + q] : 0.0f;
    }
  return wt;
}

// Stride 1: dx = conv(dy, W') with padding kh-1-ph, kw-1-pw, where W'[c, k, i, j] = W[k, c, kh-1-i, kw-1-j]
// (the transposed convolution), returned as the geometry of that convolution.
ConvGeom transposed_geometry(const ConvGeom& g) {
  ConvGeom t = g;
  t.c = g.k, t.h = g.oh, t.w = g.ow, t.k = g.c, t.oh = g.h, t.ow = g.w;
  t.ph = g.kh - 1 - g.ph, t.pw = g.kw - 1 - g.pw;
  t.cg = g.kg, t.kg = g.cg, t.ckk = g.kg * g.kh * g.kw, t.hw = g.oh * g.ow, t.ohw = g.h * g.w;
  return t;
}

float* pack_weights_transposed(const ConvGeom& g, const float* w, int64_t kp) {
  thread_local AlignedBuffer buf;
  const int64_t taps = g.kg * g.kh * g.kw;
  float* wt = buf.get(static_cast<size_t>(g.groups * taps * kp));
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t kk = 0; kk < g.kg; ++kk)
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          float* d = wt + (grp * taps + (kk * g.kh + i) * g.kw + j) * kp;
          const float* src = w + (grp * g.kg + kk) * g.ckk + (g.kh - 1 - i) * g.kw + (g.kw - 1 - j);
          for (int64_t c = 0; c < kp; ++c) d[c] = c < g.cg ? src[c * g.kh * g.kw] : 0.0f;
        }
  return wt;
}

// dW [k, cg, kh, kw] += sum over pixels of dy[k, pixel] · x[tap of pixel]: taps are the kernel's rows
// (read through pointers at pixel offsets), dy laid channels last (kp wide) its vectors. Threads own
// contiguous sample ranges and per-thread partial sums, added in thread order: the result does not
// depend on the schedule.
void conv2d_backward_weight_direct(const ConvGeom& g, const float* x, const float* dy, float* dw, int threads) {
  const PaddedGeom pg = padded(g);
  const std::vector<int64_t> taps = tap_offsets(g, pg);
  const int64_t kp = round16(g.kg), part_size = g.groups * g.ckk * kp;
  // Samples per kernel call: at least ~256 pixels, so that loading and storing the tile is amortised.
  const int64_t step = std::max<int64_t>(1, (kWeightStepPixels + g.ohw - 1) / g.ohw);
  thread_local AlignedBuffer part_buf;
  float* parts = part_buf.get(static_cast<size_t>(part_size * threads));
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* part = parts + t * part_size;
    std::memset(part, 0, sizeof(float) * part_size);
    thread_local AlignedBuffer pad_buf, dyt_buf;
    thread_local std::vector<int64_t> pix_off;
    for (int64_t c0 = g.n * t / nt, c1 = g.n * (t + 1) / nt; c0 < c1; c0 += step) {
      const int64_t cs = std::min(step, c1 - c0), pixels = cs * g.ohw;
      float* xp = pad_buf.get(static_cast<size_t>(cs * pg.per_sample));
      float* dyt = dyt_buf.get(static_cast<size_t>(pixels * kp));
      pix_off.resize(pixels);
      for (int64_t e = 0; e < pixels; ++e) pix_off[e] = window_offset(g, pg, e);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        for (int64_t s = 0; s < cs; ++s) {
          pad_planes(g, pg, x + ((c0 + s) * g.c + grp * g.cg) * g.hw, g.cg, xp + s * pg.per_sample);
          for (int64_t pix = 0; pix < g.ohw; ++pix) {
            float* d = dyt + (s * g.ohw + pix) * kp;
            const float* src = dy + ((c0 + s) * g.k + grp * g.kg) * g.ohw + pix;
            for (int64_t kk = 0; kk < g.kg; ++kk) d[kk] = src[kk * g.ohw];
            for (int64_t kk = g.kg; kk < kp; ++kk) d[kk] = 0.0f;
          }
        }
        float* pg_part = part + grp * g.ckk * kp;
        for (int64_t k0 = 0; k0 < kp; k0 += 64) {
          const int nv = static_cast<int>(std::min<int64_t>(4, (kp - k0) / 16));
          const detail::IndirectKernel uk = detail::select_indirect_kernel(nv);
          for (int64_t q0 = 0; q0 < g.ckk; q0 += uk.mr) {
            const int64_t rv = std::min<int64_t>(uk.mr, g.ckk - q0);
            const float* rows[8];
            for (int64_t r = 0; r < uk.mr; ++r) rows[r] = xp + taps[q0 + std::min(r, rv - 1)];
            alignas(64) float tile[8 * 64];
            uk.fn(pixels, pix_off.data(), rows, dyt + k0, kp, tile);
            for (int64_t r = 0; r < rv; ++r) {
              float* d = pg_part + (q0 + r) * kp + k0;
              for (int64_t j = 0; j < 16 * nv; ++j) d[j] += tile[r * nv * 16 + j];
            }
          }
        }
      }
    }
#pragma omp barrier
    // dw [oc, q] += the partials' [grp, q, kk] in thread order (a transpose: rows of dw per thread).
#pragma omp for schedule(static)
    for (int64_t oc = 0; oc < g.k; ++oc) {
      const float* from = parts + (oc / g.kg) * g.ckk * kp + oc % g.kg;
      float* to = dw + oc * g.ckk;
      for (int64_t q = 0; q < g.ckk; ++q) {
        float sum = to[q];
        for (int64_t u = 0; u < nt; ++u) sum += from[u * part_size + q * kp];
        to[q] = sum;
      }
    }
  }
}

}  // namespace

// --- entry points -----------------------------------------------------------------------------------

void conv2d_forward(const Conv2dParams& p, ConstView x, ConstView w, ConstView b, View y) {
  const ConvGeom g = geometry(p, x.shape, y.shape);
  if (g.depthwise()) {
    depthwise_forward(g, x.data, w.data, b.data, y.data);
    return;
  }
  const int threads = conv_threads(g);
  if (direct_applies(g, threads, g.kg)) {
    const int64_t kp = round16(g.kg);
    conv2d_forward_direct(g, x.data, pack_weights_forward(g, w.data, kp), kp, b.data, y.data, threads);
    return;
  }
  const MicroKernel uk = detail::select_micro_kernel();
  std::vector<PackedA>& packed = pack_weights(uk, g, w.data, false, threads);
  const Chunking ch = chunking(g.n, g.ohw, threads);
  // Y_g [kg, L] = W_g [kg, ckk] · col_g [ckk, L] over L = samples × ohw columns, then scattered to y.
  for_each_chunk(ch, threads, [&](int64_t i, int gemm_threads) {
    thread_local AlignedBuffer col_buf, out_buf;
    const int64_t s0 = ch.begin(i, g.n), cs = ch.begin(i + 1, g.n) - s0, len = cs * g.ohw, ld = detail::direct_ld(len);
    float* col = col_buf.get(static_cast<size_t>(g.ckk * ld));
    float* out = out_buf.get(static_cast<size_t>(g.kg * ld));
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      for (int64_t s = 0; s < cs; ++s) im2col(g, x.data + ((s0 + s) * g.c + grp * g.cg) * g.hw, col + s * g.ohw, ld);
      zero_columns(col, g.ckk, ld, len);
      detail::gemm_packed(uk, packed[grp], detail::BLayout::kDirect, len, col, ld, 0.0f, out, ld, gemm_threads);
      for (int64_t s = 0; s < cs; ++s)
        for (int64_t kk = 0; kk < g.kg; ++kk) {
          const int64_t oc = grp * g.kg + kk;
          const float* src = out + kk * ld + s * g.ohw;
          float* dst = y.data + ((s0 + s) * g.k + oc) * g.ohw;
          const float bias = b.data ? b.data[oc] : 0.0f;
          for (int64_t e = 0; e < g.ohw; ++e) dst[e] = src[e] + bias;
        }
    }
  });
}

void conv2d_backward_input(const Conv2dParams& p, ConstView dy, ConstView w, View dx) {
  const ConvGeom g = geometry(p, dx.shape, dy.shape);
  if (g.depthwise()) {
    depthwise_backward_input(g, dy.data, w.data, dx.data);
    return;
  }
  const int threads = conv_threads(g);
  if (g.sh == 1 && g.sw == 1 && g.ph < g.kh && g.pw < g.kw) {
    const ConvGeom t = transposed_geometry(g);
    if (direct_applies(t, threads, t.kg)) {
      const int64_t kp = round16(t.kg);
      conv2d_forward_direct(t, dy.data, pack_weights_transposed(g, w.data, kp), kp, nullptr, dx.data, threads);
      return;
    }
  }
  const MicroKernel uk = detail::select_micro_kernel();
  std::vector<PackedA>& packed = pack_weights(uk, g, w.data, true, threads);
  const Chunking ch = chunking(g.n, g.ohw, threads);
  // dcol_g [ckk, L] = W_g^T [ckk, kg] · dy_g [kg, L], then col2im into dx.
  for_each_chunk(ch, threads, [&](int64_t i, int gemm_threads) {
    thread_local AlignedBuffer col_buf, dy_buf;
    const int64_t s0 = ch.begin(i, g.n), cs = ch.begin(i + 1, g.n) - s0, len = cs * g.ohw, ld = detail::direct_ld(len);
    float* col = col_buf.get(static_cast<size_t>(g.ckk * ld));
    float* dyc = dy_buf.get(static_cast<size_t>(g.k * ld));
    for (int64_t s = 0; s < cs; ++s)
      for (int64_t kk = 0; kk < g.k; ++kk)
        std::memcpy(dyc + kk * ld + s * g.ohw, dy.data + ((s0 + s) * g.k + kk) * g.ohw, sizeof(float) * g.ohw);
    zero_columns(dyc, g.k, ld, len);
    if (!g.pointwise()) std::memset(dx.data + s0 * g.c * g.hw, 0, sizeof(float) * cs * g.c * g.hw);
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      detail::gemm_packed(uk, packed[grp], detail::BLayout::kDirect, len, dyc + grp * g.kg * ld, ld, 0.0f, col, ld,
                          gemm_threads);
      for (int64_t s = 0; s < cs; ++s) {
        float* dxg = dx.data + ((s0 + s) * g.c + grp * g.cg) * g.hw;
        if (g.pointwise()) {
          for (int64_t c = 0; c < g.cg; ++c) std::memcpy(dxg + c * g.hw, col + c * ld + s * g.ohw, sizeof(float) * g.hw);
        } else {
          col2im_add(g, col + s * g.ohw, ld, dxg);
        }
      }
    }
  });
}

void conv2d_backward_weight(const Conv2dParams& p, ConstView x, ConstView dy, View dw) {
  const ConvGeom g = geometry(p, x.shape, dy.shape);
  if (g.depthwise()) {
    depthwise_backward_weight(g, x.data, dy.data, dw.data);
    return;
  }
  const int threads = conv_threads(g);
  if (direct_applies(g, threads, g.kg)) {
    conv2d_backward_weight_direct(g, x.data, dy.data, dw.data, threads);
    return;
  }
  const int64_t wsize = g.k * g.ckk;

  // dW_g [kg, ckk] += dy_g [kg, L] · col_g [ckk, L]^T over a chunk of samples laid side by side
  // (L = samples · ohw): dot products along rows, so neither operand is packed.
  const int64_t chunk_target = std::max<int64_t>(1, (512 + g.ohw - 1) / g.ohw);
  auto accumulate_samples = [&](int64_t s0, int64_t s1, float* dst, bool overwrite, int gemm_threads) {
    thread_local AlignedBuffer col_buf, dy_buf;
    if (overwrite) std::memset(dst, 0, sizeof(float) * wsize);
    for (int64_t c0 = s0; c0 < s1; c0 += chunk_target) {
      const int64_t cs = std::min(chunk_target, s1 - c0), len = cs * g.ohw;
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const float* amat;
        int64_t lda;
        if (cs == 1) {
          amat = dy.data + (c0 * g.k + grp * g.kg) * g.ohw, lda = g.ohw;
        } else {
          float* cat = dy_buf.get(static_cast<size_t>(g.kg * len));
          for (int64_t s = 0; s < cs; ++s)
            for (int64_t kk = 0; kk < g.kg; ++kk)
              std::memcpy(cat + kk * len + s * g.ohw, dy.data + ((c0 + s) * g.k + grp * g.kg + kk) * g.ohw,
                          sizeof(float) * g.ohw);
          amat = cat, lda = len;
        }
        const float* bmat;
        if (g.pointwise() && cs == 1) {
          bmat = x.data + (c0 * g.c + grp * g.cg) * g.hw;
        } else {
          float* col = col_buf.get(static_cast<size_t>(g.ckk * len));
          for (int64_t s = 0; s < cs; ++s) im2col(g, x.data + ((c0 + s) * g.c + grp * g.cg) * g.hw, col + s * g.ohw, len);
          bmat = col;
        }
        float* dwg = dst + grp * g.kg * g.ckk;
        if (gemm_threads <= 1) {
          detail::gemm_nt_accumulate(g.kg, g.ckk, len, amat, lda, bmat, len, dwg, g.ckk);
        } else {
          // Few samples, several threads: split the rows of dW.
#pragma omp parallel num_threads(gemm_threads)
          {
            const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t r0 = (g.kg * t / nt) / 4 * 4, r1 = t + 1 == nt ? g.kg : (g.kg * (t + 1) / nt) / 4 * 4;
            if (r1 > r0) detail::gemm_nt_accumulate(r1 - r0, g.ckk, len, amat + r0 * lda, lda, bmat, len, dwg + r0 * g.ckk, g.ckk);
          }
        }
      }
    }
  };

  if (threads <= 1 || g.n < threads) {
    accumulate_samples(0, g.n, dw.data, false, threads);
    return;
  }
  // Per-thread partial sums: thread 0 accumulates into dw, the others into their own buffers, which
  // are then added to dw in parallel.
  thread_local AlignedBuffer partial_buf;
  float* partials = partial_buf.get(static_cast<size_t>(wsize * (threads - 1)));
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t s0 = g.n * t / nt, s1 = g.n * (t + 1) / nt;
    if (t == 0) accumulate_samples(s0, s1, dw.data, false, 1);
    else if (s1 > s0) accumulate_samples(s0, s1, partials + (t - 1) * wsize, true, 1);
    else std::memset(partials + (t - 1) * wsize, 0, sizeof(float) * wsize);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t e = 0; e < wsize; ++e) {
      float sum = dw.data[e];
      for (int64_t u = 0; u + 1 < nt; ++u) sum += partials[u * wsize + e];
      dw.data[e] = sum;
    }
  }
}

void conv2d_backward_bias(ConstView dy, View db) {
  const int64_t n = dy.shape.n, k = dy.shape.c, hw = dy.shape.h * dy.shape.w;
  const int threads = n * k * hw < 64 * 1024 ? 1 : num_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t kk = 0; kk < k; ++kk) {
    float sum = 0.0f;
    for (int64_t s = 0; s < n; ++s) sum += sum_floats(dy.data + (s * k + kk) * hw, hw);
    db.data[kk] += sum;
  }
}

}  // namespace pipar::kernels::cpu
