// The AVX-512 kernels (compiled with -mavx512f etc. on x86-64 only; picked at run time by cpu_isa()):
// the GEMM micro-kernel, 16 rows × 16 columns (16 zmm accumulators, one B load and 16 FMAs with an
// A broadcast per k step); the dot-product kernel; and for the direct convolution the indirect kernel
// and a 16 × 16 register transpose.
#include <immintrin.h>

#include <algorithm>

#include "kernels/cpu/gemm_internal.h"

namespace pipar::kernels::cpu::detail {
namespace {

template <int kMr, int kNv>
void micro_kernel_avx512_impl(int64_t kc, const float* __restrict a, const float* __restrict b, int64_t ldb,
                              float* __restrict c, int64_t ldc, bool accumulate) {
  __m512 acc[kMr][kNv];
#pragma GCC unroll 32
  for (int i = 0; i < kMr; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    __m512 bv[kNv];
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) bv[v] = _mm512_loadu_ps(b + p * ldb + 16 * v);
#pragma GCC unroll 32
    for (int i = 0; i < kMr; ++i) {
      const __m512 av = _mm512_set1_ps(a[p * kMr + i]);
#pragma GCC unroll 4
      for (int v = 0; v < kNv; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < kMr; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) {
      float* dst = c + i * ldc + 16 * v;
      __m512 out = acc[i][v];
      if (accumulate) out = _mm512_add_ps(out, _mm512_loadu_ps(dst));
      _mm512_storeu_ps(dst, out);
    }
}

// 4 × 4 dot products, 16 zmm accumulators; 8 loads per 16 FMAs.
void dot_kernel_avx512_impl(int64_t len, const float* const* a, const float* const* b, float* out) {
  __m512 acc[4][4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  for (int64_t p = 0; p < len; p += 16) {
    const __m512 av[4] = {_mm512_loadu_ps(a0 + p), _mm512_loadu_ps(a1 + p), _mm512_loadu_ps(a2 + p),
                          _mm512_loadu_ps(a3 + p)};
    const __m512 bv[4] = {_mm512_loadu_ps(b0 + p), _mm512_loadu_ps(b1 + p), _mm512_loadu_ps(b2 + p),
                          _mm512_loadu_ps(b3 + p)};
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(av[i], bv[j], acc[i][j]);
  }
  // Reduce 16 vectors to 16 sums: fold 512 → 256 → 128 bits, then a 4 × 4 transpose-add.
  // (Halves through memory: GCC 12's 512 → 256-bit extract and cast intrinsics trip -Wuninitialized.)
  __m128 q[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[t / 4][t % 4]);
    const __m256 h = _mm256_add_ps(_mm256_load_ps(lanes), _mm256_load_ps(lanes + 8));
    q[t] = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {
    const __m128 s01 = _mm_hadd_ps(q[4 * r], q[4 * r + 1]), s23 = _mm_hadd_ps(q[4 * r + 2], q[4 * r + 3]);
    _mm_storeu_ps(out + 4 * r, _mm_hadd_ps(s01, s23));
  }
}

// mr × nv accumulators (at most 24 of the 32 zmm): per step two offsets, nv B loads and mr broadcasts
// from the row pointers, which stay in general registers (mr <= 8).
template <int kMr, int kNv>
void indirect_kernel_avx512_impl(int64_t steps, const int64_t* off, const float* const* a, const float* b,
                                 float* out, int64_t ldo) {
  __m512 acc[kMr][kNv];
  const float* rows[kMr];
#pragma GCC unroll 8
  for (int r = 0; r < kMr; ++r) {
    rows[r] = a[r];
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < steps; ++q) {
    const int64_t o = off[2 * q];
    const float* brow = b + off[2 * q + 1];
    __m512 bv[kNv];
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) bv[v] = _mm512_loadu_ps(brow + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kMr; ++r) {
      const __m512 av = _mm512_set1_ps(rows[r][o]);
#pragma GCC unroll 4
      for (int v = 0; v < kNv; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNv; ++v) _mm512_storeu_ps(out + r * ldo + v * 16, acc[r][v]);
}

// GCC 12 reports the _mm512_undefined_ps() inside the unpack/shuffle intrinsics as maybe-uninitialized.
#pragma GCC diagnostic push
#if !defined(__clang__)  // a GCC-only warning (clang warns about the unknown option instead)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// One block of up to 16 × 16 (masked loads and stores at the edges): unpack pairs, then 64-bit and
// 128-bit lane shuffles, the usual 4-stage transpose (64 shuffles per 256 floats).
void transpose_block16(int rows, int cols, const float* src, int64_t lds, float* dst, int64_t ldd, const float* bias) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1), row_mask = static_cast<__mmask16>((1u << rows) - 1);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, src + i * lds) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 2
  for (int h = 0; h < 16; h += 8)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0x88);
      t[h + 4 + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0xDD);
    }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j)
    if (j < cols) {
      const __m512 v = bias ? _mm512_add_ps(r[j], _mm512_set1_ps(bias[j])) : r[j];
      _mm512_mask_storeu_ps(dst + j * ldd, row_mask, v);
    }
}
#pragma GCC diagnostic pop

}  // namespace

DotKernel dot_kernel_avx512() { return {16, &dot_kernel_avx512_impl}; }

void transpose_avx512(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd,
                      const float* bias) {
  for (int64_t j0 = 0; j0 < cols; j0 += 16)
    for (int64_t i0 = 0; i0 < rows; i0 += 16)
      transpose_block16(static_cast<int>(std::min<int64_t>(16, rows - i0)), static_cast<int>(std::min<int64_t>(16, cols - j0)),
                        src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd, bias ? bias + j0 : nullptr);
}

IndirectKernel indirect_kernel_avx512(int nv) {
  switch (nv) {
    case 1: return {8, 1, &indirect_kernel_avx512_impl<8, 1>};
    case 2: return {8, 2, &indirect_kernel_avx512_impl<8, 2>};
    case 3: return {8, 3, &indirect_kernel_avx512_impl<8, 3>};
    default: return {6, 4, &indirect_kernel_avx512_impl<6, 4>};
  }
}

MicroKernel micro_kernel_avx512() { return {16, 16, &micro_kernel_avx512_impl<16, 1>, "avx512 16x16"}; }

}  // namespace pipar::kernels::cpu::detail
