// The small-tap convolution kernels (conv_small_kernels.h) on AVX2 + FMA (compiled with -mavx2 -mfma on
// x86-64 only; picked at run time by cpu_isa()): 8-float vectors, 4 × 3 forward accumulators (of 16 ymm).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/cpu/conv_small.h"

namespace pipar::kernels::cpu::detail {
namespace small_taps_avx2 {
constexpr int kVec = 8;
constexpr int kNv = 3;
using Vec = __m256;
inline Vec madd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec splat(float s) { return _mm256_set1_ps(s); }
#include "kernels/cpu/conv_small_kernels.h"
}  // namespace small_taps_avx2

SmallTapKernels small_tap_kernels_avx2() { return small_taps_avx2::make_kernels(); }

}  // namespace pipar::kernels::cpu::detail
