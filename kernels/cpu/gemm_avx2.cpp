// The AVX2 + FMA GEMM micro-kernel (compiled with -mavx2 -mfma on x86-64 only; picked at run time by
// select_micro_kernel()). 6 rows × 16 columns (BLIS's Haswell shape): 12 ymm accumulators, two B
// loads and one A broadcast per row per k step.
#include <immintrin.h>

#include <algorithm>

#include "kernels/cpu/gemm_internal.h"

namespace pipar::kernels::cpu::detail {
namespace {

template <int kMr, int kNv>
void micro_kernel_avx2_impl(int64_t kc, const float* __restrict a, const float* __restrict b, int64_t ldb,
                            float* __restrict c, int64_t ldc, bool accumulate) {
  __m256 acc[kMr][kNv];
#pragma GCC unroll 16
  for (int i = 0; i < kMr; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    __m256 bv[kNv];
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) bv[v] = _mm256_loadu_ps(b + p * ldb + 8 * v);
#pragma GCC unroll 16
    for (int i = 0; i < kMr; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + p * kMr + i);
#pragma GCC unroll 4
      for (int v = 0; v < kNv; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kMr; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) {
      float* dst = c + i * ldc + 8 * v;
      __m256 out = acc[i][v];
      if (accumulate) out = _mm256_add_ps(out, _mm256_loadu_ps(dst));
      _mm256_storeu_ps(dst, out);
    }
}

// 4 × 4 dot products, 16 ymm accumulators (all 16 registers; loads feed the FMAs directly).
void dot_kernel_avx2_impl(int64_t len, const float* const* a, const float* const* b, float* out) {
  __m256 acc[4][4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  for (int64_t p = 0; p < len; p += 8) {
    const __m256 av[4] = {_mm256_loadu_ps(a0 + p), _mm256_loadu_ps(a1 + p), _mm256_loadu_ps(a2 + p),
                          _mm256_loadu_ps(a3 + p)};
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256 bv = _mm256_loadu_ps((j == 0 ? b0 : j == 1 ? b1 : j == 2 ? b2 : b3) + p);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
    }
  }
  __m128 q[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    const __m256 v = acc[t / 4][t % 4];
    q[t] = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {
    const __m128 s01 = _mm_hadd_ps(q[4 * r], q[4 * r + 1]), s23 = _mm_hadd_ps(q[4 * r + 2], q[4 * r + 3]);
    _mm_storeu_ps(out + 4 * r, _mm_hadd_ps(s01, s23));
  }
}

// The indirect kernel (gemm_internal.h) in 16 ymm: mr = 6 rows × one 16-channel vector (two ymm) at a
// time, 12 accumulators + 2 B loads + 1 broadcast; the nv vectors of a call are done one after the
// other, each over all steps (the steps and A values are re-read from L1, the B rows are not).
template <int kMr>
void indirect_kernel_avx2_impl(int nv, int64_t steps, const int64_t* off, const float* const* a, const float* b,
                               float* out, int64_t ldo) {
  const float* rows[kMr];
#pragma GCC unroll 8
  for (int r = 0; r < kMr; ++r) rows[r] = a[r];
  for (int v = 0; v < nv; ++v) {
    __m256 acc[kMr][2];
#pragma GCC unroll 8
    for (int r = 0; r < kMr; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* bv0 = b + 16 * v;
    auto step = [&](int64_t q) __attribute__((always_inline)) {
      const int64_t o = off[2 * q];
      const float* brow = bv0 + off[2 * q + 1];
      const __m256 b0 = _mm256_loadu_ps(brow), b1 = _mm256_loadu_ps(brow + 8);
#pragma GCC unroll 8
      for (int r = 0; r < kMr; ++r) {
        const __m256 av = _mm256_broadcast_ss(rows[r] + o);
        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
      }
    };
    // Two steps per iteration (a few % over one, in L1-resident tests on Zen 3).
    int64_t q = 0;
    for (; q + 2 <= steps; q += 2) step(q), step(q + 1);
    if (q < steps) step(q);
#pragma GCC unroll 8
    for (int r = 0; r < kMr; ++r) {
      _mm256_storeu_ps(out + r * ldo + 16 * v, acc[r][0]);
      _mm256_storeu_ps(out + r * ldo + 16 * v + 8, acc[r][1]);
    }
  }
}

template <int kNv>
void indirect_kernel_avx2_nv(int64_t steps, const int64_t* off, const float* const* a, const float* b, float* out,
                             int64_t ldo) {
  indirect_kernel_avx2_impl<6>(kNv, steps, off, a, b, out, ldo);
}

// One 8 × 8 block (rows, cols <= 8; partial blocks through a zeroed stack copy): unpack, 64-bit
// shuffles, then 128-bit permutes.
// Lanes [0, n) set (n in 0..8), for the masked loads and stores of partial blocks.
__m256i lanes_below(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

void transpose_block8(int rows, int cols, const float* src, int64_t lds, float* dst, int64_t ldd, const float* bias) {
  __m256 r[8], t[8];
  if (cols == 8) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_loadu_ps(src + i * lds) : _mm256_setzero_ps();
  } else {  // partial rows of src: masked loads (never past the block), absent rows zero
    const __m256i mask = lanes_below(cols);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_maskload_ps(src + i * lds, mask) : _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  if (rows == 8) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
      if (j < cols) _mm256_storeu_ps(dst + j * ldd, bias ? _mm256_add_ps(t[j], _mm256_set1_ps(bias[j])) : t[j]);
  } else {  // partial columns of dst: masked stores
    const __m256i mask = lanes_below(rows);
    for (int j = 0; j < cols; ++j)
      _mm256_maskstore_ps(dst + j * ldd, mask, bias ? _mm256_add_ps(t[j], _mm256_set1_ps(bias[j])) : t[j]);
  }
}

}  // namespace

IndirectKernel indirect_kernel_avx2(int nv) {
  switch (nv) {
    case 1: return {6, 1, &indirect_kernel_avx2_nv<1>};
    case 2: return {6, 2, &indirect_kernel_avx2_nv<2>};
    case 3: return {6, 3, &indirect_kernel_avx2_nv<3>};
    default: return {6, 4, &indirect_kernel_avx2_nv<4>};
  }
}

void transpose_avx2(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd,
                    const float* bias) {
  for (int64_t j0 = 0; j0 < cols; j0 += 8)
    for (int64_t i0 = 0; i0 < rows; i0 += 8)
      transpose_block8(static_cast<int>(std::min<int64_t>(8, rows - i0)), static_cast<int>(std::min<int64_t>(8, cols - j0)),
                       src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd, bias ? bias + j0 : nullptr);
}

DotKernel dot_kernel_avx2() { return {8, &dot_kernel_avx2_impl}; }

MicroKernel micro_kernel_avx2() { return {6, 16, &micro_kernel_avx2_impl<6, 2>, "avx2 6x16"}; }

}  // namespace pipar::kernels::cpu::detail
