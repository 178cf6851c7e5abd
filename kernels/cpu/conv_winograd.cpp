// Winograd F(2x2, 3x3) convolution (conv_winograd.h): the weights transformed once per call (U = G g G^T,
// 16 matrices [c, kp]), then per chunk of tile rows: the input transform of every channel into
// V [16][tiles][cp], 16 GEMMs M[xi] = V[xi] · U[xi] through the indirect kernel (tiles as its rows,
// read in place; output channels its vectors), and the output transform into y with the bias. The
// weight gradient shares the input transform: per chunk V and D = A dy A^T, M[xi] += D[xi]^T · V[xi]
// (output channels as the kernel's rows, read down the tiles), and dw += G^T M G at the end.
//
// Against the direct passes they replace (Zen 3, 2 threads, VGG5 conv2/conv3 shapes at batch 100 and
// 10): forward and backward-input 1.2-1.7x faster, weight gradient 1.0-1.5x (bench/RESULTS.md).
//
// Why channels last and the indirect kernel rather than the packed GEMM with tiles as vectors: on the
// VGG5 planes (7x7 to 16x16) a tile row holds 4-8 tiles, and the transforms vectorized along it ran
// scalar: 1 thread, fmnist.conv3 b10, the transforms took 2x the GEMMs and the pass 2.8x the direct
// kernel. Along channels every vector is full, and V and M need no packing.
#include "kernels/cpu/conv_winograd.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cpu/gemm_internal.h"

namespace pipar::kernels::cpu::detail {
namespace {

// Below this many input or output channels the transforms (per tile and channel) outweigh the
// multiplies they save (conv1 layers, 1-3 input channels, stay on the direct / im2col paths).
constexpr int64_t kMinChannels = 16;

// Every call transforms all the weights (U, 16·c·kp floats) and streams U once per chunk of tiles; the
// weight gradient keeps a 16·k·cp partial per thread. Both are paid back only by enough tiles on
// a small enough U: with 256 and 512 channels on 7x7 and 4x4 planes (ResNet18's last blocks) Winograd
// made a ResNet18 training run 1.45x slower than the direct passes (600 Fashion-MNIST images, 2
// threads, Zen 3: 31 against 21 s). So: c·k up to 128x128 (U at most 1 MiB) and 128+ tiles per call.
constexpr int64_t kMaxChannelProduct = 128 * 128;
constexpr int64_t kMinTiles = 128;
// At least this many tiles per chunk, however large cp + kp: U is read once per chunk.
constexpr int64_t kMinChunkTiles = 64;

// Tiles per chunk: V and M of a chunk, 16·tiles·(cp + kp) floats (512 KiB), half the 1 MiB L2 of a Zen 4
// core, all of a Zen 3's; on the Zen 3 (1 thread, VGG5 conv2/conv3) 64-256 KiB chunks took 5-40% longer.
constexpr int64_t kChunkFloats = 128 * 1024;

// Input channels per weight-transform item (items split statically over the threads).
constexpr int64_t kWeightChannels = 8;

int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

WinogradShape winograd_shape(const ConvGeom& g) {
  return {g.c, g.k, round16(g.c), round16(g.k), g.h, g.w, g.oh, g.ow, g.ph, g.pw, (g.oh + 1) / 2, (g.ow + 1) / 2};
}

// Tile rows per chunk (forward) or per step (weight gradient): V and M (or D) within kChunkFloats, and at
// least kMinChunkTiles tiles.
int64_t rows_per_chunk(const WinogradShape& s) {
  return std::max(kChunkFloats / (16 * (s.cp + s.kp) * s.tw), (kMinChunkTiles + s.tw - 1) / s.tw);
}

// Calls f(sample, ty0, ty1, first tile) for the runs of tile rows [row0, row1) of the flattened
// n × th rows that lie within one sample; tiles are numbered from row0.
template <class F>
void for_each_segment(const WinogradShape& s, int64_t row0, int64_t row1, F&& f) {
  for (int64_t row = row0; row < row1;) {
    const int64_t n = row / s.th, ty0 = row % s.th, ty1 = std::min(s.th, ty0 + row1 - row);
    f(n, ty0, ty1, (row - row0) * s.tw);
    row += ty1 - ty0;
  }
}

}  // namespace

bool winograd_supported() { return select_indirect_kernel(4).fn != nullptr; }

bool winograd_applies(const ConvGeom& g) {
  const WinogradShape s = winograd_shape(g);
  const int64_t tiles = g.n * s.th * s.tw;
  return winograd_supported() && g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.groups == 1 &&
         g.ph <= 2 && g.pw <= 2 && g.c >= kMinChannels && g.k >= kMinChannels && g.c * g.k <= kMaxChannelProduct &&
         tiles >= kMinTiles;
}

void conv2d_winograd(const ConvGeom& g, const float* x, const float* w, WinogradWeights layout, const float* bias,
                     float* y, int threads) {
#if PIPAR_X86
  const WinogradShape s = winograd_shape(g);
  const WinogradKernels wk = winograd_kernels_avx2();
  const bool flipped = layout == WinogradWeights::kTransposed;

  // U [16][c][kp], shared by the workers (held by the calling thread), and the kernel's steps: channel c
  // at offset c in a V row and c·kp in U.
  thread_local AlignedBuffer ut_buf;
  thread_local std::vector<int64_t> steps_tls;
  float* ut = ut_buf.get(static_cast<size_t>(16 * g.c * s.kp));
  std::vector<int64_t>& steps = steps_tls;
  steps.resize(2 * g.c);
  for (int64_t c = 0; c < g.c; ++c) steps[2 * c] = c, steps[2 * c + 1] = c * s.kp;

  // Chunks of whole tile rows of the flattened n × th rows, as many as a multiple of the threads.
  const int64_t rows = g.n * s.th;
  const int64_t per_chunk = rows_per_chunk(s);
  int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  if (threads > 1) chunks = std::min(rows, (chunks + threads - 1) / threads * threads);
  const int64_t weight_items = (g.c + kWeightChannels - 1) / kWeightChannels;

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    thread_local AlignedBuffer scratch_buf, v_buf, m_buf, xpad_buf, out_buf;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < weight_items; ++it) {
      const int64_t c0 = it * kWeightChannels, c1 = std::min(g.c, c0 + kWeightChannels);
      wk.weights(s, w, flipped, c0, c1, scratch_buf.get(static_cast<size_t>(9 * (c1 - c0) * g.k)), ut);
    }
    // (implicit barrier: U complete) Dynamic: chunks write disjoint tiles of y, so results do not depend
    // on the schedule, and a thread the OS preempts (2 cores shared with other work) holds up no one.
#pragma omp for schedule(dynamic, 1)
    for (int64_t ci = 0; ci < chunks; ++ci) {
      const int64_t row0 = rows * ci / chunks, row1 = rows * (ci + 1) / chunks, tiles = (row1 - row0) * s.tw;
      if (tiles <= 0) continue;
      // Planes of V and M one cache line off a multiple of 4 KiB apart, so that the 16 streams of the
      // transforms fall in different L1 sets; M has room for the kernel's repeated last rows.
      const int64_t vstride = tiles * s.cp + 16, mstride = (tiles + 8) * s.kp + 16;
      const int64_t seg_rows = std::min(s.th, row1 - row0);
      float* v = v_buf.get(static_cast<size_t>(16 * vstride));
      float* m = m_buf.get(static_cast<size_t>(16 * mstride));
      float* xpad = xpad_buf.get(static_cast<size_t>((2 * seg_rows + 2) * s.wpad() * s.cp));
      float* out = out_buf.get(static_cast<size_t>(2 * seg_rows * g.ow * s.kp));
      for_each_segment(s, row0, row1, [&](int64_t n, int64_t ty0, int64_t ty1, int64_t t0) {
        wk.input(s, x, n, ty0, ty1, xpad, v + t0 * s.cp, vstride);
      });
      for (int64_t k0 = 0; k0 < s.kp; k0 += 64) {
        const IndirectKernel uk = select_indirect_kernel(static_cast<int>(std::min<int64_t>(4, (s.kp - k0) / 16)));
        for (int xi = 0; xi < 16; ++xi) {
          const float* vx = v + xi * vstride;
          const float* ux = ut + xi * g.c * s.kp + k0;
          float* mx = m + xi * mstride + k0;
          for (int64_t t0 = 0; t0 < tiles; t0 += uk.mr) {
            const float* a[8];
            for (int64_t r = 0; r < uk.mr; ++r) a[r] = vx + std::min(t0 + r, tiles - 1) * s.cp;  // repeat the last
            uk.fn(g.c, steps.data(), a, ux, mx + t0 * s.kp, s.kp);
          }
        }
      }
      for_each_segment(s, row0, row1, [&](int64_t n, int64_t ty0, int64_t ty1, int64_t t0) {
        wk.output(s, m + t0 * s.kp, mstride, n, ty0, ty1, bias, out, y);
      });
    }
  }
#else
  (void)g, (void)x, (void)w, (void)layout, (void)bias, (void)y, (void)threads;
#endif
}

void conv2d_winograd_backward_weight(const ConvGeom& g, const float* x, const float* dy, float* dw, int threads) {
#if PIPAR_X86
  const WinogradShape s = winograd_shape(g);
  const WinogradKernels wk = winograd_kernels_avx2();
  // Partial sums M [16][k][cp] per chunk; chunks of whole tile rows, one per thread (taken dynamically:
  // a thread the OS preempts holds up no one; two per thread cost 5-25% more at batch 10 on the Zen 3,
  // 2 threads, in zeroing and adding partials), each swept in steps of tile rows whose V and D
  // [16][tiles][cp or kp] fit the L2 budget of the forward pass.
  const int64_t rows = g.n * s.th, part_size = 16 * g.k * s.cp;
  const int64_t per_step = rows_per_chunk(s);
  const int64_t chunks = std::min<int64_t>(rows, threads);
  thread_local AlignedBuffer part_buf;
  float* parts = part_buf.get(static_cast<size_t>(part_size * chunks));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    thread_local AlignedBuffer v_buf, d_buf, xpad_buf, dypad_buf, tile_buf;
    thread_local std::vector<int64_t> steps;
#pragma omp for schedule(dynamic, 1)
    for (int64_t ci = 0; ci < chunks; ++ci) {
      float* part = parts + ci * part_size;
      const int64_t begin = rows * ci / chunks, end = rows * (ci + 1) / chunks;
      const int64_t nsteps = (end - begin + per_step - 1) / per_step;
      for (int64_t si = 0; si < nsteps; ++si) {  // steps of equal size
        const int64_t row0 = begin + (end - begin) * si / nsteps, row1 = begin + (end - begin) * (si + 1) / nsteps;
        const int64_t tiles = (row1 - row0) * s.tw;
        const int64_t vstride = tiles * s.cp + 16, dstride = tiles * s.kp + 16;  // planes off 4 KiB multiples
        const int64_t seg_rows = std::min(s.th, row1 - row0);
        float* v = v_buf.get(static_cast<size_t>(16 * vstride));
        float* d = d_buf.get(static_cast<size_t>(16 * dstride));
        float* xpad = xpad_buf.get(static_cast<size_t>((2 * seg_rows + 2) * s.wpad() * s.cp));
        float* dypad = dypad_buf.get(static_cast<size_t>(2 * seg_rows * 2 * s.tw * s.kp));
        for_each_segment(s, row0, row1, [&](int64_t n, int64_t ty0, int64_t ty1, int64_t t0) {
          wk.input(s, x, n, ty0, ty1, xpad, v + t0 * s.cp, vstride);
          wk.grad_output(s, dy, n, ty0, ty1, dypad, d + t0 * s.kp, dstride);
        });
        // M[xi][k][c] += sum over tiles of D[xi][t][k] · V[xi][t][c]: rows of the indirect kernel are
        // output channels (read down the tiles, kp apart), its vectors input channels.
        steps.resize(2 * tiles);
        for (int64_t t = 0; t < tiles; ++t) steps[2 * t] = t * s.kp, steps[2 * t + 1] = t * s.cp;
        for (int64_t c0 = 0; c0 < s.cp; c0 += 64) {
          const int nv = static_cast<int>(std::min<int64_t>(4, (s.cp - c0) / 16));
          const IndirectKernel uk = select_indirect_kernel(nv);
          float* tile = tile_buf.get(static_cast<size_t>(uk.mr * 16 * nv));
          for (int xi = 0; xi < 16; ++xi) {
            const float* dx = d + xi * dstride;
            const float* vx = v + xi * vstride + c0;
            float* mx = part + xi * g.k * s.cp + c0;
            for (int64_t k0 = 0; k0 < g.k; k0 += uk.mr) {
              const int64_t rv = std::min<int64_t>(uk.mr, g.k - k0);
              const float* a[8];
              for (int64_t r = 0; r < uk.mr; ++r) a[r] = dx + k0 + std::min(r, rv - 1);  // repeat the last
              uk.fn(tiles, steps.data(), a, vx, tile, 16 * nv);
              for (int64_t r = 0; r < rv; ++r) {  // the first step writes the partial (no memset)
                float* to = mx + (k0 + r) * s.cp;
                const float* from = tile + r * 16 * nv;
                if (si == 0) std::memcpy(to, from, sizeof(float) * 16 * nv);
                else
                  for (int64_t j = 0; j < 16 * nv; ++j) to[j] += from[j];
              }
            }
          }
        }
      }
    }
  }
  // dw += G^T M G per output channel, M the partials added in chunk order as they are read.
  thread_local AlignedBuffer scratch_buf;
  wk.weight_grad(s, parts, chunks, part_size, 0, g.k, scratch_buf.get(static_cast<size_t>(9 * s.cp)), dw);
#else
  (void)g, (void)x, (void)dy, (void)dw, (void)threads;
#endif
}

}  // namespace pipar::kernels::cpu::detail
