// The small-tap convolution kernels (conv_small_kernels.h) on AVX-512 (compiled with -mavx512f etc. on
// x86-64 only; picked at run time by cpu_isa()): 16-float vectors, 4 × 4 forward accumulators.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/cpu/conv_small.h"

namespace pipar::kernels::cpu::detail {
namespace small_taps_avx512 {
constexpr int kVec = 16;
constexpr int kNv = 4;
using Vec = __m512;
inline Vec madd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec splat(float s) { return _mm512_set1_ps(s); }
#include "kernels/cpu/conv_small_kernels.h"
}  // namespace small_taps_avx512

SmallTapKernels small_tap_kernels_avx512() { return small_taps_avx512::make_kernels(); }

}  // namespace pipar::kernels::cpu::detail
