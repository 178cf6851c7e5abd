// The Winograd F(2x2, 3x3) transforms of conv_winograd.h in AVX2 + FMA (compiled with the AVX2 flags of
// kernels/CMakeLists.txt, used where cpu_isa() is AVX2 or AVX-512). Vectors of 8 run along channels:
// a tile is 16 patch positions of the padded input in (channels last), 16 transformed positions out,
// and 4 pixels of output channels back.
//
// Matrices (Lavin & Gray, F(2, 3)): B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],
// G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1], A^T = [1 1 1 0; 0 1 -1 -1]. On small-integer inputs
// every intermediate is a multiple of 1/4 far inside float's 24 bits, so results are exact there.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/conv_winograd.h"
#include "kernels/cpu/gemm_internal.h"

namespace pipar::kernels::cpu::detail {
namespace {

// Loads the first n (< 8 allowed) floats of p, zeros in the other lanes.
__m256 load_first(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(n, 0))), lane);
  return _mm256_maskload_ps(p, mask);
}

void weights_avx2(const WinogradShape& s, const float* w, bool flipped, int64_t c0, int64_t c1, float* wt, float* ut) {
  const int64_t cn = c1 - c0, k = s.k, xi_stride = s.c * s.kp;
  // Rows of k floats per (channel, tap): forward w [k][c·9] → wt[(cc·9 + tap)·k]; flipped w [c·k][9] →
  // wt[(tap·cn + cc)·k], read at tap 8 - tap.
  if (!flipped) transpose_avx2(k, 9 * cn, w + 9 * c0, 9 * s.c, wt, k, nullptr);
  else transpose_avx2(cn * k, 9, w + c0 * k * 9, 9, wt, cn * k, nullptr);
  const __m256 half = _mm256_set1_ps(0.5f);
  for (int64_t cc = 0; cc < cn; ++cc) {
    const float* g[9];
    for (int tap = 0; tap < 9; ++tap) g[tap] = flipped ? wt + ((8 - tap) * cn + cc) * k : wt + (cc * 9 + tap) * k;
    float* u = ut + (c0 + cc) * s.kp;
    for (int64_t k0 = 0; k0 < s.kp; k0 += 8) {
      const int64_t live = k - k0;  // zeros past k
      __m256 t[4][3];               // G g
      for (int j = 0; j < 3; ++j) {
        const __m256 g0 = load_first(g[j] + k0, live), g1 = load_first(g[3 + j] + k0, live),
                     g2 = load_first(g[6 + j] + k0, live);
        t[0][j] = g0;
        t[1][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(g0, g1), g2));
        t[2][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(g0, g1), g2));
        t[3][j] = g2;
      }
      for (int a = 0; a < 4; ++a) {  // (G g) G^T
        float* ua = u + 4 * a * xi_stride + k0;
        _mm256_storeu_ps(ua, t[a][0]);
        _mm256_storeu_ps(ua + xi_stride, _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(t[a][0], t[a][1]), t[a][2])));
        _mm256_storeu_ps(ua + 2 * xi_stride,
                         _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(t[a][0], t[a][1]), t[a][2])));
        _mm256_storeu_ps(ua + 3 * xi_stride, t[a][2]);
      }
    }
  }
}

void input_avx2(const WinogradShape& s, const float* x, int64_t n, int64_t ty0, int64_t ty1, float* xpad, float* v,
                int64_t vstride) {
  const int64_t cp = s.cp, prow = s.wpad() * cp, rows = 2 * (ty1 - ty0) + 2, plane = s.h * s.w;
  // Input rows 2·ty0 - ph ... channels last with zeros around (and past c), so that the padding costs
  // no tests in the transform: the rows inside the image transposed in one call (whole 8x8 register
  // blocks along the run of pixels; per row, planes 7 or 14 wide left a partial block in every row),
  // then copied into the padded rows.
  thread_local AlignedBuffer xt_buf;
  std::memset(xpad, 0, sizeof(float) * rows * prow);
  const int64_t iy0 = std::max<int64_t>(0, 2 * ty0 - s.ph), iy1 = std::min(s.h, 2 * ty0 - s.ph + rows);
  if (iy1 > iy0) {
    float* xt = xt_buf.get(static_cast<size_t>((iy1 - iy0) * s.w * cp));
    transpose_avx2(s.c, (iy1 - iy0) * s.w, x + n * s.c * plane + iy0 * s.w, plane, xt, cp, nullptr);
    for (int64_t iy = iy0; iy < iy1; ++iy) {
      const int64_t py = iy - (2 * ty0 - s.ph);
      std::memcpy(xpad + py * prow + s.pw * cp, xt + (iy - iy0) * s.w * cp, sizeof(float) * s.w * cp);
    }
  }
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < s.tw; ++tx) {
      const float* base = xpad + 2 * (ty - ty0) * prow + 2 * tx * cp;
      float* vt = v + ((ty - ty0) * s.tw + tx) * cp;
      for (int64_t c0 = 0; c0 < cp; c0 += 8) {
        __m256 r[4][4];  // B^T d: combinations of patch rows, per patch column
        for (int j = 0; j < 4; ++j) {
          const float* col = base + j * cp + c0;
          const __m256 d0 = _mm256_loadu_ps(col), d1 = _mm256_loadu_ps(col + prow), d2 = _mm256_loadu_ps(col + 2 * prow),
                       d3 = _mm256_loadu_ps(col + 3 * prow);
          r[0][j] = _mm256_sub_ps(d0, d2), r[1][j] = _mm256_add_ps(d1, d2);
          r[2][j] = _mm256_sub_ps(d2, d1), r[3][j] = _mm256_sub_ps(d1, d3);
        }
        for (int i = 0; i < 4; ++i) {  // (B^T d) B
          float* vi = vt + 4 * i * vstride + c0;
          _mm256_storeu_ps(vi, _mm256_sub_ps(r[i][0], r[i][2]));
          _mm256_storeu_ps(vi + vstride, _mm256_add_ps(r[i][1], r[i][2]));
          _mm256_storeu_ps(vi + 2 * vstride, _mm256_sub_ps(r[i][2], r[i][1]));
          _mm256_storeu_ps(vi + 3 * vstride, _mm256_sub_ps(r[i][1], r[i][3]));
        }
      }
    }
}

void output_avx2(const WinogradShape& s, const float* m, int64_t mstride, int64_t n, int64_t ty0, int64_t ty1,
                 const float* bias, float* out, float* y) {
  const int64_t kp = s.kp, oy0 = 2 * ty0, oy1 = std::min(s.oh, 2 * ty1);
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < s.tw; ++tx) {
      const float* mt = m + ((ty - ty0) * s.tw + tx) * kp;
      const bool right = 2 * tx + 1 < s.ow, down = 2 * ty + 1 < s.oh;  // odd planes drop the last row/column
      float* o = out + ((2 * ty - oy0) * s.ow + 2 * tx) * kp;
      for (int64_t k0 = 0; k0 < kp; k0 += 8) {
        __m256 a0[4], a1[4];  // A^T m
        for (int j = 0; j < 4; ++j) {
          const float* q = mt + j * mstride + k0;
          const __m256 m0 = _mm256_loadu_ps(q), m1 = _mm256_loadu_ps(q + 4 * mstride),
                       m2 = _mm256_loadu_ps(q + 8 * mstride), m3 = _mm256_loadu_ps(q + 12 * mstride);
          a0[j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
          a1[j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
        }
        // (A^T m) A
        _mm256_storeu_ps(o + k0, _mm256_add_ps(_mm256_add_ps(a0[0], a0[1]), a0[2]));
        if (right) _mm256_storeu_ps(o + kp + k0, _mm256_sub_ps(_mm256_sub_ps(a0[1], a0[2]), a0[3]));
        if (down) {
          _mm256_storeu_ps(o + s.ow * kp + k0, _mm256_add_ps(_mm256_add_ps(a1[0], a1[1]), a1[2]));
          if (right) _mm256_storeu_ps(o + (s.ow + 1) * kp + k0, _mm256_sub_ps(_mm256_sub_ps(a1[1], a1[2]), a1[3]));
        }
      }
    }
  // Pixels of output rows [oy0, oy1) channels last → y planes, with the bias.
  transpose_avx2((oy1 - oy0) * s.ow, s.k, out, kp, y + n * s.k * s.oh * s.ow + oy0 * s.ow, s.oh * s.ow, bias);
}

// The weight gradient is the same identity read the other way: y = A^T [(G g) ⊙ (B^T d)] is linear in g,
// so dL/dg = G^T [(B^T d) ⊙ (A dy)] per tile (2-D: G^T [(B^T d B) ⊙ (A dy A^T)] G), summed over tiles.
void grad_output_avx2(const WinogradShape& s, const float* dy, int64_t n, int64_t ty0, int64_t ty1, float* dypad,
                      float* d, int64_t dstride) {
  const int64_t kp = s.kp, prow = 2 * s.tw * kp, plane = s.oh * s.ow;
  // dy rows [2·ty0, 2·ty1) channels last, zeros past the plane (odd planes). Lanes past k are left as
  // they are: they only reach D's lanes past k, which the GEMM never reads (its rows are channels < k).
  const int64_t oy0 = 2 * ty0, oy1 = std::min(s.oh, 2 * ty1);
  const float* src = dy + n * s.k * plane + oy0 * s.ow;
  if (s.ow == 2 * s.tw) {  // even width: the rows are contiguous in dypad too
    if (oy1 - oy0 < 2 * (ty1 - ty0)) std::memset(dypad + (oy1 - oy0) * prow, 0, sizeof(float) * prow);
    transpose_avx2(s.k, (oy1 - oy0) * s.ow, src, plane, dypad, kp, nullptr);
  } else {
    thread_local AlignedBuffer dyt_buf;
    float* dyt = dyt_buf.get(static_cast<size_t>((oy1 - oy0) * s.ow * kp));
    std::memset(dypad, 0, sizeof(float) * 2 * (ty1 - ty0) * prow);
    transpose_avx2(s.k, (oy1 - oy0) * s.ow, src, plane, dyt, kp, nullptr);
    for (int64_t oy = oy0; oy < oy1; ++oy)
      std::memcpy(dypad + (oy - oy0) * prow, dyt + (oy - oy0) * s.ow * kp, sizeof(float) * s.ow * kp);
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t ty = ty0; ty < ty1; ++ty)
    for (int64_t tx = 0; tx < s.tw; ++tx) {
      const float* base = dypad + 2 * (ty - ty0) * prow + 2 * tx * kp;
      float* dt = d + ((ty - ty0) * s.tw + tx) * kp;
      for (int64_t k0 = 0; k0 < kp; k0 += 8) {
        __m256 r[4][2];  // A dy: A = [1 0; 1 1; 1 -1; 0 -1] on the rows, per column
        for (int j = 0; j < 2; ++j) {
          const __m256 d0 = _mm256_loadu_ps(base + j * kp + k0), d1 = _mm256_loadu_ps(base + prow + j * kp + k0);
          r[0][j] = d0, r[1][j] = _mm256_add_ps(d0, d1), r[2][j] = _mm256_sub_ps(d0, d1), r[3][j] = _mm256_sub_ps(zero, d1);
        }
        for (int i = 0; i < 4; ++i) {  // (A dy) A^T
          float* di = dt + 4 * i * dstride + k0;
          _mm256_storeu_ps(di, r[i][0]);
          _mm256_storeu_ps(di + dstride, _mm256_add_ps(r[i][0], r[i][1]));
          _mm256_storeu_ps(di + 2 * dstride, _mm256_sub_ps(r[i][0], r[i][1]));
          _mm256_storeu_ps(di + 3 * dstride, _mm256_sub_ps(zero, r[i][1]));
        }
      }
    }
}

void weight_grad_avx2(const WinogradShape& s, const float* m, int64_t parts, int64_t part_stride, int64_t k0,
                      int64_t k1, float* scratch, float* dw) {
  const int64_t cp = s.cp, xi_stride = s.k * cp;
  const __m256 half = _mm256_set1_ps(0.5f);
  for (int64_t kk = k0; kk < k1; ++kk) {
    const float* mk = m + kk * cp;
    for (int64_t c0 = 0; c0 < cp; c0 += 8) {
      __m256 t[3][4];  // G^T M: G^T = [1 1/2 1/2 0; 0 1/2 -1/2 0; 0 1/2 1/2 1] on the rows, per column
      for (int j = 0; j < 4; ++j) {
        const float* q = mk + j * xi_stride + c0;
        __m256 m0 = _mm256_loadu_ps(q), m1 = _mm256_loadu_ps(q + 4 * xi_stride), m2 = _mm256_loadu_ps(q + 8 * xi_stride),
               m3 = _mm256_loadu_ps(q + 12 * xi_stride);
        for (int64_t p = 1; p < parts; ++p) {
          const float* qp = q + p * part_stride;
          m0 = _mm256_add_ps(m0, _mm256_loadu_ps(qp)), m1 = _mm256_add_ps(m1, _mm256_loadu_ps(qp + 4 * xi_stride));
          m2 = _mm256_add_ps(m2, _mm256_loadu_ps(qp + 8 * xi_stride)), m3 = _mm256_add_ps(m3, _mm256_loadu_ps(qp + 12 * xi_stride));
        }
        const __m256 sum = _mm256_mul_ps(half, _mm256_add_ps(m1, m2));
        t[0][j] = _mm256_add_ps(m0, sum), t[1][j] = _mm256_mul_ps(half, _mm256_sub_ps(m1, m2)), t[2][j] = _mm256_add_ps(sum, m3);
      }
      for (int i = 0; i < 3; ++i) {  // (G^T M) G: taps 3i .. 3i+2, rows of cp floats in scratch
        const __m256 sum = _mm256_mul_ps(half, _mm256_add_ps(t[i][1], t[i][2]));
        float* o = scratch + 3 * i * cp + c0;
        _mm256_storeu_ps(o, _mm256_add_ps(t[i][0], sum));
        _mm256_storeu_ps(o + cp, _mm256_mul_ps(half, _mm256_sub_ps(t[i][1], t[i][2])));
        _mm256_storeu_ps(o + 2 * cp, _mm256_add_ps(sum, t[i][3]));
      }
    }
    // [tap][c] → dw[kk][c][tap], added.
    float* to = dw + kk * s.c * 9;
    alignas(32) float block[8 * 9];
    for (int64_t c0 = 0; c0 < s.c; c0 += 8) {
      const int64_t cn = std::min<int64_t>(8, s.c - c0);
      transpose_avx2(9, cn, scratch + c0, cp, block, 9, nullptr);
      for (int64_t e = 0; e < cn * 9; ++e) to[c0 * 9 + e] += block[e];
    }
  }
}

}  // namespace

WinogradKernels winograd_kernels_avx2() {
  return {&weights_avx2, &input_avx2, &output_avx2, &grad_output_avx2, &weight_grad_avx2};
}

}  // namespace pipar::kernels::cpu::detail
