// Convolutions with few input taps (conv_small.h): the pixels of each sample's output planes in tiles;
// per tile, the taps of its pixels gathered into a small im2col block (taps × pixels, in L1/L2), then
// every output channel computed from it with vector accumulators over pixels and broadcast weights.
// The forward pass writes y once, bias included; the weight gradient reads dy once, accumulating
// per-lane partial sums per chunk of tiles, added in chunk order at the end. The im2col + GEMM path
// these replace wrote the GEMM's output to a buffer and copied it into y (and concatenated dy before
// its GEMM), which doubled the traffic on these memory-bound layers (9 or 27 multiply-adds per output).
#include "kernels/cpu/conv_small.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/parallel.h"

namespace pipar::kernels::cpu {

// --- generic kernels (GCC vectors of 4 floats: SSE2 on x86-64, NEON on ARM) -------------------------

namespace detail {
namespace small_taps_generic {
constexpr int kVec = 4;
constexpr int kNv = 3;  // 12 accumulators of the 16 SSE registers
using Vec = float __attribute__((vector_size(16)));
inline Vec madd(Vec a, Vec b, Vec c) { return a * b + c; }
inline Vec splat(float s) { return Vec{s, s, s, s}; }
#include "kernels/cpu/conv_small_kernels.h"
}  // namespace small_taps_generic

SmallTapKernels small_tap_kernels_generic() { return small_taps_generic::make_kernels(); }

SmallTapKernels select_small_tap_kernels() {
#if PIPAR_X86
  switch (cpu_isa()) {
    case Isa::kAvx512: return small_tap_kernels_avx512();
    case Isa::kAvx2: return small_tap_kernels_avx2();
    case Isa::kGeneric: break;
  }
#endif
  return small_tap_kernels_generic();
}
}  // namespace detail

namespace {

using detail::AlignedBuffer;
using detail::SmallTapKernels;

// --- tiles ------------------------------------------------------------------------------------------

// im2col block sizes (floats): the forward block is read once per 4 output channels, so it stays in
// L1 (16 KB); the weight gradient's block is read once per 4 channels too, but a longer tile amortises
// loading and storing its accumulators (k × taps vectors) per tile, so it may fill part of L2 (128 KB).
constexpr int64_t kForwardColFloats = 4 * 1024;
constexpr int64_t kWeightColFloats = 32 * 1024;

struct Tiles {
  int64_t per_plane;  // tiles per output plane
  int64_t pixels;     // pixels per tile (the last one of a plane may have fewer), a multiple of vec
  int64_t rows;       // col rows: taps rounded up to the weight kernel's tap block
  int64_t ldcol;      // col row stride: a multiple of vec, odd in 64-byte lines (no L1 set aliasing)
  int64_t begin(int64_t tile) const { return tile * pixels; }
};

Tiles tiles(const ConvGeom& g, const SmallTapKernels& kern, int64_t col_floats) {
  Tiles t{};
  t.rows = (g.ckk + kern.tap_block - 1) / kern.tap_block * kern.tap_block;
  const int64_t most = std::max<int64_t>(4 * kern.vec, col_floats / t.rows);
  const int64_t per_plane = (g.ohw + most - 1) / most;
  // Even tiles, rounded up to whole vectors: y and dy rows then start on vector boundaries.
  t.pixels = ((g.ohw + per_plane - 1) / per_plane + kern.vec - 1) / kern.vec * kern.vec;
  t.per_plane = (g.ohw + t.pixels - 1) / t.pixels;
  t.ldcol = detail::direct_ld(t.pixels);
  return t;
}

// col [rows, ldcol]: row t = (c, i, j) < ckk holds the input under tap t of output pixels [p0, p1) of
// one sample (x: its c planes), zero where the tap lies in the padding; rows past ckk and columns past
// p1 - p0 are zero (the kernels read whole vectors).
void gather_taps(const ConvGeom& g, const float* x, int64_t p0, int64_t p1, int64_t rows, float* col, int64_t ldcol) {
  const int64_t len = p1 - p0;
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        float* __restrict row = col + ((c * g.kh + i) * g.kw + j) * ldcol;
        int64_t lo, hi;
        valid_range(g.ow, g.w, g.sw, g.pw, j, lo, hi);
        const int64_t off = j - g.pw;
        for (int64_t p = p0; p < p1;) {
          const int64_t oy = p / g.ow, ox0 = p - oy * g.ow, ox1 = std::min(g.ow, ox0 + (p1 - p));
          float* __restrict d = row + (p - p0) - ox0;  // d[ox] for ox in [ox0, ox1)
          const int64_t iy = oy * g.sh - g.ph + i;
          if (iy < 0 || iy >= g.h) {
            for (int64_t ox = ox0; ox < ox1; ++ox) d[ox] = 0.0f;
          } else {
            const float* __restrict src = x + (c * g.h + iy) * g.w;
            const int64_t a = std::clamp(lo, ox0, ox1), b = std::clamp(hi, a, ox1);
            for (int64_t ox = ox0; ox < a; ++ox) d[ox] = 0.0f;
            if (g.sw == 1) {
              for (int64_t ox = a; ox < b; ++ox) d[ox] = src[ox + off];
            } else {
              for (int64_t ox = a; ox < b; ++ox) d[ox] = src[ox * g.sw + off];
            }
            for (int64_t ox = b; ox < ox1; ++ox) d[ox] = 0.0f;
          }
          p += ox1 - ox0;
        }
        for (int64_t q = len; q < ldcol; ++q) row[q] = 0.0f;
      }
  if (rows > g.ckk) std::memset(col + g.ckk * ldcol, 0, sizeof(float) * (rows - g.ckk) * ldcol);
}

// Below 256K multiply-adds one thread (as the GEMM path: waking a team costs a few microseconds).
int small_taps_threads(const ConvGeom& g, int64_t items) {
  const int64_t macs = g.n * g.k * g.ohw * g.ckk;
  if (macs < 256 * 1024) return 1;
  return static_cast<int>(std::min<int64_t>(num_threads(), items));
}

// The weight gradient's partial sums: at least this many chunks of tiles whatever the thread count
// (so that the sum order, fixed by the chunks, is the same for 1 to 8 threads), taken dynamically.
constexpr int64_t kWeightChunksMin = 8;

}  // namespace

// --- entry points -----------------------------------------------------------------------------------

bool small_taps_applies(const ConvGeom& g) { return g.groups == 1 && g.ckk <= kSmallTapsMax; }

namespace {

// Stride 1: no im2col. The input rows a band of output rows needs are copied once into zero-padded
// rows wp wide, and the kernel reads each tap's inputs in place at its offset (c, i, j) ->
// c·in_rows·wp + i·wp + j, over the band's pixels as one run of rows wp apart (the wp - ow pixels
// between rows are computed and dropped: long runs keep the kernel in its 3-vector blocks), into a
// band buffer whose rows are then copied into y. The tap gather this replaces copied every input 9
// times and took about half of the forward pass.
void forward_stride1(const ConvGeom& g, const SmallTapKernels& kern, const float* x, const float* w, const float* b,
                     float* y) {
  const int64_t wp = (g.ow + kern.vec - 1) / kern.vec * kern.vec + g.kw - 1;
  // Bands: the band's outputs (k × rows × wp) within ~128 KB of L2.
  const int64_t rows_per_band = std::clamp<int64_t>(32 * 1024 / (g.k * wp), 1, g.oh);
  const int64_t bands = (g.oh + rows_per_band - 1) / rows_per_band, items = g.n * bands;
  const int threads = small_taps_threads(g, items);
  const int64_t in_rows = rows_per_band + g.kh - 1, ld_out = rows_per_band * wp;
  // Tap (c, i, j)'s inputs within a band's padded rows, the same for every band.
  std::vector<int64_t> toff(static_cast<size_t>(g.ckk));
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) toff[(c * g.kh + i) * g.kw + j] = (c * in_rows + i) * wp + j;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
  for (int64_t it = 0; it < items; ++it) {
    thread_local AlignedBuffer pad_buf, out_buf;
    const int64_t s = it / bands, oy0 = (it % bands) * rows_per_band, oy1 = std::min(g.oh, oy0 + rows_per_band);
    float* xp = pad_buf.get(static_cast<size_t>(g.c * in_rows * wp + kern.vec));
    float* out = out_buf.get(static_cast<size_t>(g.k * ld_out + kern.vec));
    const float* xs = x + s * g.c * g.hw;
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t r = 0; r < in_rows; ++r) {
        float* d = xp + (c * in_rows + r) * wp;
        const int64_t iy = oy0 + r - g.ph;
        if (r >= oy1 - oy0 + g.kh - 1 || iy < 0 || iy >= g.h) {
          std::memset(d, 0, sizeof(float) * wp);
          continue;
        }
        std::memset(d, 0, sizeof(float) * g.pw);
        std::memcpy(d + g.pw, xs + (c * g.h + iy) * g.w, sizeof(float) * g.w);
        std::memset(d + g.pw + g.w, 0, sizeof(float) * (wp - g.pw - g.w));
      }
    std::memset(xp + g.c * in_rows * wp, 0, sizeof(float) * kern.vec);
    const int64_t rows = oy1 - oy0;
    kern.forward(g.k, g.ckk, xp, toff.data(), w, g.ckk, b, out, ld_out, (rows - 1) * wp + g.ow);
    for (int64_t kk = 0; kk < g.k; ++kk)
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(y + (s * g.k + kk) * g.ohw + (oy0 + r) * g.ow, out + kk * ld_out + r * wp, sizeof(float) * g.ow);
  }
}

}  // namespace

void conv2d_forward_small_taps(const ConvGeom& g, const float* x, const float* w, const float* b, float* y) {
  const SmallTapKernels kern = detail::select_small_tap_kernels();
  // Stride 1 with several input channels (27 taps on CIFAR) reads the inputs in place; one channel (9
  // taps) keeps the gather, cheap there, and its exact tiles (Zen 3, 1 thread, 3 alternating runs of
  // pipar_bench_kernels --layer conv1 with a temporary switch between the two paths:
  // cifar10.conv1 5.4-5.7 against 6.2-8.3 ms at b100, 0.37-0.45 against 0.39-0.62 ms at b10;
  // fmnist.conv1 b10 0.17 against 0.11-0.16 ms, its 28-wide rows padded to 34 wasting 18%).
  if (g.sh == 1 && g.sw == 1 && g.c >= 2) return forward_stride1(g, kern, x, w, b, y);
  const Tiles tl = tiles(g, kern, kForwardColFloats);
  const int64_t items = g.n * tl.per_plane;
  const int threads = small_taps_threads(g, items);
  std::vector<int64_t> toff(static_cast<size_t>(g.ckk));  // tap t's row of the im2col tile
  for (int64_t t = 0; t < g.ckk; ++t) toff[t] = t * tl.ldcol;
  // Tiles write disjoint pixels of y: taken dynamically (a thread the OS preempts holds up no one).
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
  for (int64_t it = 0; it < items; ++it) {
    thread_local AlignedBuffer col_buf;
    const int64_t s = it / tl.per_plane, p0 = tl.begin(it % tl.per_plane), p1 = std::min(g.ohw, p0 + tl.pixels);
    float* col = col_buf.get(static_cast<size_t>(g.ckk * tl.ldcol));
    gather_taps(g, x + s * g.c * g.hw, p0, p1, g.ckk, col, tl.ldcol);
    kern.forward(g.k, g.ckk, col, toff.data(), w, g.ckk, b, y + s * g.k * g.ohw + p0, g.ohw, p1 - p0);
  }
}

void conv2d_backward_weight_small_taps(const ConvGeom& g, const float* x, const float* dy, float* dw) {
  const SmallTapKernels kern = detail::select_small_tap_kernels();
  const Tiles tl = tiles(g, kern, kWeightColFloats);
  const int64_t items = g.n * tl.per_plane;
  const int threads = small_taps_threads(g, items);
  const int64_t chunks = std::min<int64_t>(items, std::max<int64_t>(kWeightChunksMin, threads));
  const int64_t part_size = g.k * tl.rows * kern.vec;
  thread_local AlignedBuffer part_buf;
  float* parts = part_buf.get(static_cast<size_t>(part_size * chunks));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
  for (int64_t ci = 0; ci < chunks; ++ci) {
    thread_local AlignedBuffer col_buf;
    float* part = parts + ci * part_size;
    std::memset(part, 0, sizeof(float) * part_size);
    float* col = col_buf.get(static_cast<size_t>(tl.rows * tl.ldcol));
    for (int64_t it = items * ci / chunks; it < items * (ci + 1) / chunks; ++it) {
      const int64_t s = it / tl.per_plane, p0 = tl.begin(it % tl.per_plane), p1 = std::min(g.ohw, p0 + tl.pixels);
      gather_taps(g, x + s * g.c * g.hw, p0, p1, tl.rows, col, tl.ldcol);
      kern.weight(g.k, tl.rows, col, tl.ldcol, dy + s * g.k * g.ohw + p0, g.ohw, p1 - p0, part);
    }
  }
  // Chunks added in order, then the lanes in order: the same sum whatever ran where.
  for (int64_t ci = 1; ci < chunks; ++ci) {
    const float* __restrict from = parts + ci * part_size;
    float* __restrict to = parts;
    for (int64_t e = 0; e < part_size; ++e) to[e] += from[e];
  }
  for (int64_t oc = 0; oc < g.k; ++oc)
    for (int64_t t = 0; t < g.ckk; ++t) {
      const float* lanes = parts + (oc * tl.rows + t) * kern.vec;
      float sum = 0.0f;
      for (int l = 0; l < kern.vec; ++l) sum += lanes[l];
      dw[oc * g.ckk + t] += sum;
    }
}

}  // namespace pipar::kernels::cpu
