// The AVX2 + FMA GEMM micro-kernel (compiled with -mavx2 -mfma on x86-64 only; picked at run time by
// select_micro_kernel()). 6 rows × 16 columns (BLIS's Haswell shape): 12 ymm accumulators, two B
// loads and one A broadcast per row per k step.
#include <immintrin.h>

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

}  // namespace

DotKernel dot_kernel_avx2() { return {8, &dot_kernel_avx2_impl}; }

MicroKernel micro_kernel_avx2() { return {6, 16, &micro_kernel_avx2_impl<6, 2>, "avx2 6x16"}; }

}  // namespace pipar::kernels::cpu::detail
