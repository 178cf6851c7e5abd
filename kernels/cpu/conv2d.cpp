// CPU conv2d: on AVX2 and AVX-512, 3x3 stride-1 convolutions with 16+ channels each side go through
// Winograd F(2x2, 3x3) (conv_winograd.h: forward, backward-input as a transposed convolution, and the
// weight gradient as F(3x3, 2x2)); other ones through direct passes of the indirect kernel
// (gemm_internal.h) that read the padded image in place; elsewhere, and for convolutions with few taps
// or channels, im2col + the packed GEMM (1x1 stride-1 unpadded ones read x directly); first layers
// with few taps in conv_small.cpp; direct loops for depthwise ones.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "kernels/conv_geometry.h"
#include "kernels/cpu/cpu_parallel.h"
#include "kernels/cpu/conv_small.h"
#include "kernels/cpu/conv_winograd.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/ops.h"
#include "kernels/parallel.h"

namespace pipar::kernels::cpu {
namespace {

using detail::AlignedBuffer;
using detail::MicroKernel;
using detail::PackedA;

// --- geometry ---------------------------------------------------------------------------------------

using kernels::ConvGeom;

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
// dy are laid channels last, through 16 × 16 register transposes), so 7- and 14-wide rows waste no
// lanes. The backward-input pass is the forward pass of the transposed convolution (stride 1), so it
// needs no col2im. Measured on the VGG5 layers (Zen 4, 1 thread, b10): forward and backward-input of
// fmnist.conv3 from 62/74 to 120 GFLOP/s (counted on all taps; ~92% of the measured FMA peak before
// border taps were skipped), backward-weight from 50 to 97, because im2col/col2im of short rows
// (memcpy/memset of 7 floats), the dot-product kernel's reductions and the 256+256+64 split of K = 576
// had cost 25-45% of the time.

// Below 64 taps the GEMM over pixels is faster: conv1 (9 or 27 taps) forward took 1.6-2x as long
// direct, and its weight gradient 1.3-1.6x (too little work per tile for the transposes and padding).
constexpr int64_t kDirectMinTaps = 64;
// ~1024 pixels per chunk: each border class then fills whole tiles and few edge pixels fall back to
// mixed tiles over every tap (1 thread, b10: 2-4% faster than 256-pixel chunks).
constexpr int64_t kDirectChunkPixels = 1024;
constexpr int64_t kMinChunksPerThread = 4, kMinChunkPixels = 192;
// Pixels per kernel call in the weight gradient: ~256 amortise the tile's load and store (64 to 512
// measured the same on the VGG5 layers).
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

// Border classes: output pixels whose windows have the same kernel rows [i0, i1) and columns [j0, j1)
// inside the image share a step list of only those taps (A: offset in the padded planes, B: weight
// row · kp), so taps that read the zero padding are skipped, as oneDNN's direct kernels do: on 7x7
// pad 1 that is 18% of the multiply-adds, 9% on 14x14 (torch's conv3 ran at 126 GFLOP/s per thread
// counted on all taps, above our 117 FMA peak). Class 0 holds every tap, for tiles of mixed pixels.
struct TapClasses {
  std::vector<int> of_pixel;                // class of each pixel of a plane (oh × ow)
  std::vector<std::vector<int64_t>> steps;  // per class: (A offset, B offset) pairs
};

// Kernel rows (or columns) [lo, hi) that output row (column) o reads inside the image.
inline void inside(int64_t o, int64_t s, int64_t pad, int64_t k, int64_t in, int64_t& lo, int64_t& hi) {
  lo = std::clamp<int64_t>(pad - o * s, 0, k);
  hi = std::clamp<int64_t>(in + pad - o * s, lo, k);
}

TapClasses tap_classes(const ConvGeom& g, const PaddedGeom& pg, int64_t kp) {
  TapClasses tc;
  std::vector<std::array<int64_t, 4>> keys = {{0, g.kh, 0, g.kw}};
  tc.of_pixel.resize(g.ohw);
  for (int64_t oy = 0; oy < g.oh; ++oy)
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      std::array<int64_t, 4> key;
      inside(oy, g.sh, g.ph, g.kh, g.h, key[0], key[1]);
      inside(ox, g.sw, g.pw, g.kw, g.w, key[2], key[3]);
      const auto it = std::find(keys.begin(), keys.end(), key);
      tc.of_pixel[oy * g.ow + ox] = static_cast<int>(it - keys.begin());
      if (it == keys.end()) keys.push_back(key);
    }
  for (const auto& key : keys) {
    std::vector<int64_t> st;
    for (int64_t c = 0; c < g.cg; ++c)
      for (int64_t i = key[0]; i < key[1]; ++i)
        for (int64_t j = key[2]; j < key[3]; ++j)
          st.push_back(c * pg.plane + i * pg.wp + j), st.push_back(((c * g.kh + i) * g.kw + j) * kp);
    tc.steps.push_back(std::move(st));
  }
  return tc;
}

// Calls f(q, window corner in the padded planes, oy, ox) for the pixels q of [e0, e1)
// of the flattened n × oh × ow range, the corner relative to sample e0 / ohw (counters, not divisions:
// 3 divisions per pixel had cost ~5% of the 7x7 forward).
template <class F>
void for_each_window(const ConvGeom& g, const PaddedGeom& pg, int64_t e0, int64_t e1, F&& f) {
  int64_t s = 0, pix = e0 % g.ohw, oy = pix / g.ow, ox = pix % g.ow;
  for (int64_t q = 0; q < e1 - e0; ++q) {
    f(q, s * pg.per_sample + oy * g.sh * pg.wp + ox * g.sw, oy, ox);
    if (++ox == g.ow) {
      ox = 0;
      if (++oy == g.oh) oy = 0, ++s;
    }
  }
}

bool direct_applies(const ConvGeom& g, int64_t vector_channels) {
  return detail::select_indirect_kernel(4).fn && !g.depthwise() && !g.pointwise() && g.ckk >= kDirectMinTaps &&
         vector_channels >= 16;
}

// Output pixels [e0, e1) of the flattened n × oh × ow range, and the samples they touch.
struct PixelRange {
  int64_t e0, e1, s0, cs;  // first sample s0, cs samples
  PixelRange(const ConvGeom& g, int64_t begin, int64_t end)
      : e0(begin), e1(end), s0(begin / g.ohw), cs(end > begin ? (end - 1) / g.ohw - begin / g.ohw + 1 : 0) {}
  // Pixels [p0, p1) of the range's sample s (0 <= s < cs), as offsets within that sample's plane.
  int64_t p0(const ConvGeom& g, int64_t s) const { return std::max(e0, (s0 + s) * g.ohw) - (s0 + s) * g.ohw; }
  int64_t p1(const ConvGeom& g, int64_t s) const { return std::min(e1, (s0 + s + 1) * g.ohw) - (s0 + s) * g.ohw; }
};

// Ranges of ~kDirectChunkPixels, as many as a multiple of the threads: splitting pixels rather than
// samples balances any batch (sample chunks of >= 512 columns, the GEMM's, gave b10 fmnist.conv2
// chunks of 2,3,2,3 samples: 1.65x on 2 threads instead of ~1.9x).
int64_t pixel_chunks(int64_t total, int threads) {
  const int64_t per_thread = (total + threads * kDirectChunkPixels - 1) / (threads * kDirectChunkPixels);
  // AVX2, several threads: at least kMinChunksPerThread chunks each while chunks keep kMinChunkPixels, so
  // that a thread slowed by other work on the shared cores is helped by the others (dynamic schedule;
  // b10 conv2 rows 2 threads, Zen 3: ~5-15% faster). AVX-512 keeps its chunks (and weight-gradient sums).
  const bool split = threads > 1 && cpu_isa() == Isa::kAvx2;
  const int64_t small = split ? std::min<int64_t>(kMinChunksPerThread, total / (threads * kMinChunkPixels)) : 0;
  return std::max<int64_t>(1, threads * std::max(per_thread, small));
}
int64_t chunk_bound(int64_t total, int64_t chunks, int64_t i) {
  return i >= chunks ? total : total * i / chunks;
}

// y [n, k, oh, ow] = conv(x, W) (+ bias), W given channels last: wt[grp][tap][kp], zero past kg.
void conv2d_forward_direct(const ConvGeom& g, const float* x, const float* wt, int64_t kp, const float* bias, float* y,
                           int threads) {
  const PaddedGeom pg = padded(g);
  // Built once per geometry and reused (per calling thread): building the step lists each call, on
  // one thread before the parallel loop, cost a few % of the b10 passes.
  thread_local std::array<int64_t, 13> tc_key{};
  thread_local TapClasses tc_cached;
  const std::array<int64_t, 13> key = {g.cg, g.kh, g.kw, g.h, g.w, g.oh, g.ow, g.sh, g.sw, g.ph, g.pw, pg.wp, kp};
  if (tc_cached.steps.empty() || key != tc_key) tc_cached = tap_classes(g, pg, kp), tc_key = key;
  const TapClasses& tc = tc_cached;
  const int64_t total = g.n * g.ohw, chunks = pixel_chunks(total, threads);
  // Dynamic: outputs are disjoint, so results do not depend on the schedule, and a thread the OS
  // preempts (2 cores shared with other work) holds up no one.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
  for (int64_t ci = 0; ci < chunks; ++ci) {
    thread_local AlignedBuffer pad_buf, out_buf;
    thread_local std::vector<std::vector<int64_t>> members;
    thread_local std::vector<int64_t> order, window;
    thread_local std::vector<int> tile_class;
    const PixelRange pr(g, chunk_bound(total, chunks, ci), chunk_bound(total, chunks, ci + 1));
    const int64_t pixels = pr.e1 - pr.e0;
    if (pixels <= 0) continue;
    float* xp = pad_buf.get(static_cast<size_t>(pr.cs * pg.per_sample));
    // The kernel's tiles go to rows of kp channels (channels last); one transpose per sample writes y.
    float* out = out_buf.get(static_cast<size_t>(pixels * kp));
    members.resize(tc.steps.size());
    for (auto& m : members) m.clear();
    window.resize(pixels);
    for_each_window(g, pg, pr.e0, pr.e1, [&](int64_t q, int64_t corner, int64_t oy, int64_t ox) {
      window[q] = corner;
      members[tc.of_pixel[oy * g.ow + ox]].push_back(q);
    });
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      for (int64_t s = 0; s < pr.cs; ++s)
        pad_planes(g, pg, x + ((pr.s0 + s) * g.c + grp * g.cg) * g.hw, g.cg, xp + s * pg.per_sample);
      for (int64_t k0 = 0; k0 < g.kg; k0 += 64) {
        const int nv = static_cast<int>(std::min<int64_t>(4, (g.kg - k0 + 15) / 16));
        const detail::IndirectKernel uk = detail::select_indirect_kernel(nv);
        // Whole tiles of each class, then the rest in mixed tiles over every tap (class 0).
        order.clear(), tile_class.clear();
        std::vector<int64_t>& rest = members[0];
        const size_t rest_size = rest.size();
        for (size_t c = 1; c < members.size(); ++c) {
          const size_t whole = members[c].size() / uk.mr * uk.mr;
          order.insert(order.end(), members[c].begin(), members[c].begin() + whole);
          tile_class.insert(tile_class.end(), whole / uk.mr, static_cast<int>(c));
          rest.insert(rest.end(), members[c].begin() + whole, members[c].end());
        }
        order.insert(order.end(), rest.begin(), rest.end());
        tile_class.insert(tile_class.end(), (rest.size() + uk.mr - 1) / uk.mr, 0);
        rest.resize(rest_size);
        for (size_t ti = 0; ti < tile_class.size(); ++ti) {
          const int64_t t0 = static_cast<int64_t>(ti) * uk.mr, rv = std::min<int64_t>(uk.mr, pixels - t0);
          const float* rows[8];
          for (int64_t r = 0; r < uk.mr; ++r)  // rows past the end repeat the last pixel
            rows[r] = xp + window[order[t0 + std::min(r, rv - 1)]];
          const std::vector<int64_t>& steps = tc.steps[tile_class[ti]];
          const float* wg = wt + grp * g.ckk * kp + k0;
          // A tile of consecutive pixels (most of them) is written in place, others through a copy.
          const int64_t first = order[t0];
          bool consecutive = rv == uk.mr;
          for (int64_t r = 1; r < rv && consecutive; ++r) consecutive = order[t0 + r] == first + r;
          if (consecutive) {
            uk.fn(static_cast<int64_t>(steps.size() / 2), steps.data(), rows, wg, out + first * kp + k0, kp);
            continue;
          }
          alignas(64) float tile[8 * 64];
          uk.fn(static_cast<int64_t>(steps.size() / 2), steps.data(), rows, wg, tile, 16 * nv);
          for (int64_t r = 0; r < rv; ++r) {
            float* d = out + order[t0 + r] * kp + k0;
            const float* t = tile + r * 16 * nv;
            for (int v = 0; v < nv; ++v) std::memcpy(d + 16 * v, t + 16 * v, sizeof(float) * 16);  // not rep movs
          }
        }
      }
      for (int64_t s = 0; s < pr.cs; ++s) {
        const int64_t p0 = pr.p0(g, s), p1 = pr.p1(g, s);
        detail::transpose(p1 - p0, g.kg, out + ((pr.s0 + s) * g.ohw + p0 - pr.e0) * kp, kp,
                          y + ((pr.s0 + s) * g.k + grp * g.kg) * g.ohw + p0, g.ohw, bias ? bias + grp * g.kg : nullptr);
      }
    }
  }
}

// W [k, cg, kh, kw] channels last for the forward pass: wt[grp][(c, i, j)][kk], kk < kp (zeros past kg).
float* pack_weights_forward(const ConvGeom& g, const float* w, int64_t kp) {
  thread_local AlignedBuffer buf;
  float* wt = buf.get(static_cast<size_t>(g.groups * g.ckk * kp));
  if (g.kg < kp) std::memset(wt, 0, sizeof(float) * g.groups * g.ckk * kp);
  for (int64_t grp = 0; grp < g.groups; ++grp)
    detail::transpose(g.kg, g.ckk, w + grp * g.kg * g.ckk, g.ckk, wt + grp * g.ckk * kp, kp, nullptr);
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
  const int64_t taps = g.kh * g.kw, rows = g.kg * taps;
  float* wt = buf.get(static_cast<size_t>(g.groups * rows * kp));
  if (g.cg < kp) std::memset(wt, 0, sizeof(float) * g.groups * rows * kp);
  // W[k] is [cg, taps]; its transpose written from the last tap row upwards (ldd = -kp) flips the taps:
  // (kh-1-i)·kw + (kw-1-j) = taps-1 - (i·kw + j). Whole 8-tap blocks go through the register transpose,
  // the rest (3x3: the 9th tap) through a plain loop rather than the partial-block path.
  const int64_t whole = taps / 8 * 8;
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t kk = 0; kk < g.kg; ++kk) {
      const float* src = w + (grp * g.kg + kk) * g.ckk;
      float* last = wt + (grp * rows + kk * taps + taps - 1) * kp;
      if (whole > 0) detail::transpose(g.cg, whole, src, taps, last, -kp, nullptr);
      for (int64_t t = whole; t < taps; ++t)
        for (int64_t c = 0; c < g.cg; ++c) last[-t * kp + c] = src[c * taps + t];
    }
  return wt;
}

// dW [k, cg, kh, kw] += sum over pixels of dy[k, pixel] · x[tap of pixel]: taps are the kernel's rows
// (read through pointers at pixel offsets), dy laid channels last (kp wide) its vectors.
void conv2d_backward_weight_direct(const ConvGeom& g, const float* x, const float* dy, float* dw, int threads) {
  const PaddedGeom pg = padded(g);
  const std::vector<int64_t> taps = tap_offsets(g, pg);
  const int64_t kp = round16(g.kg), part_size = g.groups * g.ckk * kp;
  // One partial sum per chunk (chunks fixed by the size and thread count), chunks taken dynamically (a
  // thread the OS preempts holds up no one; a static split per thread cost 4-8 ms stalls on the shared
  // 2 cores), partials added in chunk order: the result does not depend on the schedule.
  // At most 2 chunks per thread: each chunk's partial (74-147 KB on VGG5) then stays in L2 (b100
  // fmnist.conv2, 1 thread: 7.6 ms against 8-10 ms with one chunk per ~1024 pixels).
  const int64_t total = g.n * g.ohw, chunks = std::min<int64_t>(pixel_chunks(total, threads), 2 * threads);
  thread_local AlignedBuffer part_buf;
  float* parts = part_buf.get(static_cast<size_t>(part_size * chunks));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
  for (int64_t ci = 0; ci < chunks; ++ci) {
    float* part = parts + ci * part_size;
    std::memset(part, 0, sizeof(float) * part_size);
    thread_local AlignedBuffer pad_buf, dyt_buf;
    thread_local std::vector<int64_t> pix_off;
    thread_local std::vector<std::vector<int64_t>> by_position;
    const int64_t end = chunk_bound(total, chunks, ci + 1);
    for (int64_t e = chunk_bound(total, chunks, ci); e < end; e += kWeightStepPixels) {
      const PixelRange pr(g, e, std::min(end, e + kWeightStepPixels));
      const int64_t pixels = pr.e1 - pr.e0;
      float* xp = pad_buf.get(static_cast<size_t>(pr.cs * pg.per_sample));
      float* dyt = dyt_buf.get(static_cast<size_t>(pixels * kp));
      // Steps (window corner, dy row): every pixel, and per kernel position (i, j) the pixels whose
      // tap (i, j) lies inside the image (border taps skipped as in the forward pass).
      pix_off.resize(2 * pixels);
      by_position.resize(g.kh * g.kw);
      for (auto& v : by_position) v.clear();
      for_each_window(g, pg, pr.e0, pr.e1, [&](int64_t q, int64_t corner, int64_t oy, int64_t ox) {
        pix_off[2 * q] = corner, pix_off[2 * q + 1] = q * kp;
        int64_t i0, i1, j0, j1;
        inside(oy, g.sh, g.ph, g.kh, g.h, i0, i1);
        inside(ox, g.sw, g.pw, g.kw, g.w, j0, j1);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j) by_position[i * g.kw + j].push_back(corner), by_position[i * g.kw + j].push_back(q * kp);
      });
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        for (int64_t s = 0; s < pr.cs; ++s) {
          pad_planes(g, pg, x + ((pr.s0 + s) * g.c + grp * g.cg) * g.hw, g.cg, xp + s * pg.per_sample);
          const int64_t p0 = pr.p0(g, s), p1 = pr.p1(g, s);
          float* d = dyt + ((pr.s0 + s) * g.ohw + p0 - pr.e0) * kp;
          detail::transpose(g.kg, p1 - p0, dy + ((pr.s0 + s) * g.k + grp * g.kg) * g.ohw + p0, g.ohw, d, kp, nullptr);
          if (g.kg < kp)
            for (int64_t q = 0; q < p1 - p0; ++q) std::memset(d + q * kp + g.kg, 0, sizeof(float) * (kp - g.kg));
        }
        float* pg_part = part + grp * g.ckk * kp;
        for (int64_t k0 = 0; k0 < kp; k0 += 64) {
          const int nv = static_cast<int>(std::min<int64_t>(4, (kp - k0) / 16));
          const detail::IndirectKernel uk = detail::select_indirect_kernel(nv);
          // Tiles of taps in (i, j, c) order: a tile within one kernel position takes its step list.
          for (int64_t t0 = 0; t0 < g.ckk; t0 += uk.mr) {
            const int64_t rv = std::min<int64_t>(uk.mr, g.ckk - t0);
            const float* rows[8];
            int64_t tap[8];
            for (int64_t r = 0; r < uk.mr; ++r) {
              const int64_t u = t0 + std::min(r, rv - 1), ij = u / g.cg, c = u % g.cg;
              tap[r] = c * g.kh * g.kw + ij;
              rows[r] = xp + taps[tap[r]];
            }
            const int64_t ij = t0 / g.cg;
            const std::vector<int64_t>& st = (t0 + rv - 1) / g.cg == ij ? by_position[ij] : pix_off;
            alignas(64) float tile[8 * 64];
            uk.fn(static_cast<int64_t>(st.size() / 2), st.data(), rows, dyt + k0, tile, 16 * nv);
            for (int64_t r = 0; r < rv; ++r) {
              float* d = pg_part + tap[r] * kp + k0;
              for (int64_t j = 0; j < 16 * nv; ++j) d[j] += tile[r * nv * 16 + j];
            }
          }
        }
      }
    }
  }
  const int sum_threads = par::threads_for(part_size * chunks);
#pragma omp parallel for num_threads(sum_threads) schedule(static) if (sum_threads > 1)
  for (int64_t e = 0; e < part_size; ++e) {
    float sum = parts[e];
    for (int64_t u = 1; u < chunks; ++u) sum += parts[u * part_size + e];
    parts[e] = sum;
  }
  thread_local AlignedBuffer dwt_buf;
  float* dwt = dwt_buf.get(static_cast<size_t>(g.kg * g.ckk));
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    detail::transpose(g.ckk, g.kg, parts + grp * g.ckk * kp, kp, dwt, g.ckk, nullptr);
    float* to = dw + grp * g.kg * g.ckk;
    for (int64_t e = 0; e < g.kg * g.ckk; ++e) to[e] += dwt[e];
  }
}

}  // namespace

// --- entry points -----------------------------------------------------------------------------------

void conv2d_forward(const Conv2dParams& p, ConstView x, ConstView w, ConstView b, View y) {
  const ConvGeom g = conv_geometry(p, x.shape, y.shape);
  if (g.depthwise()) {
    depthwise_forward(g, x.data, w.data, b.data, y.data);
    return;
  }
  // Few taps (<= 27: 1-3 input channels, 3x3): y written once, bias fused (conv_small.cpp).
  if (small_taps_applies(g)) {
    conv2d_forward_small_taps(g, x.data, w.data, b.data, y.data);
    return;
  }
  const int threads = conv_threads(g);
  if (detail::winograd_applies(g)) {
    detail::conv2d_winograd(g, x.data, w.data, detail::WinogradWeights::kForward, b.data, y.data, threads);
    return;
  }
  if (direct_applies(g, g.kg)) {
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
  const ConvGeom g = conv_geometry(p, dx.shape, dy.shape);
  if (g.depthwise()) {
    depthwise_backward_input(g, dy.data, w.data, dx.data);
    return;
  }
  const int threads = conv_threads(g);
  if (g.sh == 1 && g.sw == 1 && g.ph < g.kh && g.pw < g.kw) {
    const ConvGeom t = transposed_geometry(g);
    if (detail::winograd_applies(t)) {
      detail::conv2d_winograd(t, dy.data, w.data, detail::WinogradWeights::kTransposed, nullptr, dx.data, threads);
      return;
    }
    if (direct_applies(t, t.kg)) {
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
  const ConvGeom g = conv_geometry(p, x.shape, dy.shape);
  if (g.depthwise()) {
    depthwise_backward_weight(g, x.data, dy.data, dw.data);
    return;
  }
  if (small_taps_applies(g)) {
    conv2d_backward_weight_small_taps(g, x.data, dy.data, dw.data);
    return;
  }
  const int threads = conv_threads(g);
  if (detail::winograd_applies(g)) {
    detail::conv2d_winograd_backward_weight(g, x.data, dy.data, dw.data, threads);
    return;
  }
  if (direct_applies(g, g.kg)) {
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
