// Internals of the packed, cache-blocked GEMM (gemm.cpp): the micro-kernels per ISA, the packed-A
// layout, and the serial and threaded drivers that conv2d.cpp and linear.cpp call directly (to pack
// weights once per call, and to run one GEMM per thread with per-thread partial sums).
#pragma once
#include <cstddef>
#include <cstdint>

namespace pipar::kernels::cpu::detail {

// --- blocking ---------------------------------------------------------------------------------------
// kc × nr B micro-panel (16 KiB at nr 16) stays in L1 while the kc × mc A block (up to 128 KiB) sits
// in L2 (1 MiB per Zen 4 core); kc × nc B block (up to 2 MiB) in L3.
constexpr int64_t kKc = 256;
constexpr int64_t kMc = 128;
constexpr int64_t kNc = 2048;

// --- micro-kernels ----------------------------------------------------------------------------------
// C tile [mr, nr] (row stride ldc) = (accumulate ? C : 0) + A panel · B panel over kc, where the A
// panel holds kc columns of mr values (packed) and the B panel kc rows of nr values, ldb apart (nr
// when packed; a row stride when the kernel reads B in place).
using MicroKernelFn = void (*)(int64_t kc, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                               bool accumulate);
struct MicroKernel {
  int mr = 0, nr = 0;
  MicroKernelFn fn = nullptr;
  const char* name = "";
};
MicroKernel micro_kernel_generic();
#if PIPAR_X86
MicroKernel micro_kernel_avx2();    // gemm_avx2.cpp
MicroKernel micro_kernel_avx512();  // gemm_avx512.cpp
#endif
MicroKernel select_micro_kernel();  // by cpu_isa(), read at each call

// Dot-product kernel for C += A · B^T with both operands' rows contiguous (the conv weight gradient,
// whose reduction runs along rows): out[i*4 + j] = sum_{p < len} a[i][p] * b[j][p] for 4 × 4 rows,
// len a multiple of the kernel's width (the driver sums the tail).
using DotKernelFn = void (*)(int64_t len, const float* const* a, const float* const* b, float* out);
struct DotKernel {
  int width = 0;
  DotKernelFn fn = nullptr;
};
DotKernel dot_kernel_generic();
#if PIPAR_X86
DotKernel dot_kernel_avx2();
DotKernel dot_kernel_avx512();
#endif
DotKernel select_dot_kernel();
// C[m, n] += A [m, len] · B [n, len]^T (row strides lda, ldb, ldc) on the calling thread.
void gemm_nt_accumulate(int64_t m, int64_t n, int64_t len, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc);

// Indirect kernel for direct convolution (conv2d.cpp): out[r·ldo + j] = sum_{q < steps} a[r][off[2q]] ·
// b[off[2q+1] + j] for r < mr, j < 16·nv. Each A row is read through its own pointer at offsets shared
// by all rows (output pixels at a convolution's tap offsets, or taps at pixel offsets), so the image is
// read in place, without im2col; B rows (weights or dy, channels last) are vectors, also picked by
// offset, so that a step list can leave out taps (those in the zero padding for a class of pixels).
// AVX-512 and AVX2 only: fn is null elsewhere and callers keep the GEMM path.
using IndirectKernelFn = void (*)(int64_t steps, const int64_t* off, const float* const* a, const float* b,
                                  float* out, int64_t ldo);
struct IndirectKernel {
  int mr = 0, nv = 0;
  IndirectKernelFn fn = nullptr;
};
#if PIPAR_X86
IndirectKernel indirect_kernel_avx2(int nv);    // nv in 1..4 vectors of 16 channels; mr 6 (gemm_avx2.cpp)
// transpose() in 8 × 8 register blocks.
void transpose_avx2(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd,
                    const float* bias);
IndirectKernel indirect_kernel_avx512(int nv);  // nv in 1..4 vectors of 16 channels
// transpose() in 16 × 16 register blocks.
void transpose_avx512(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd,
                      const float* bias);
#endif
IndirectKernel select_indirect_kernel(int nv);  // by cpu_isa(); fn null on the portable build
// dst[j·ldd + i] = src[i·lds + j] (+ bias[j] when bias is not null) for i < rows, j < cols: AVX-512 or
// AVX2 blocks where available, a plain loop elsewhere.
void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd, const float* bias);

// --- scratch ----------------------------------------------------------------------------------------
// A 64-byte aligned float buffer that only grows (per-thread scratch; reused across calls).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept : ptr_(o.ptr_), cap_(o.cap_) { o.ptr_ = nullptr, o.cap_ = 0; }
  AlignedBuffer& operator=(AlignedBuffer&&) = delete;
  ~AlignedBuffer();
  float* get(size_t n);  // at least n floats; contents unspecified after growth

 private:
  float* ptr_ = nullptr;
  size_t cap_ = 0;
};

// --- packed A ---------------------------------------------------------------------------------------
// alpha·op(A) [m, k] packed once: for each kc block (kKc deep), m_pad/mr panels of kc × mr values,
// rows past m zero. A block of rows [i0, i0 + mc) at depth p0 is contiguous.
class PackedA {
 public:
  // threads > 1 opens a parallel region; threads == 1 packs on the calling thread (usable inside one).
  void pack(const MicroKernel& uk, bool trans_a, int64_t m, int64_t k, float alpha, const float* a, int64_t lda,
            int threads);
  const float* panel(int64_t p0, int64_t i0) const { return data_ + p0 * m_pad_ + i0 * kc_at(p0); }
  int64_t kc_at(int64_t p0) const { return k_ - p0 < kKc ? k_ - p0 : kKc; }
  int64_t m() const { return m_; }
  int64_t k() const { return k_; }
  int mr() const { return mr_; }

 private:
  AlignedBuffer buf_;
  float* data_ = nullptr;
  int64_t m_ = 0, k_ = 0, m_pad_ = 0;
  int mr_ = 0;
};

// --- drivers ----------------------------------------------------------------------------------------
// How the drivers read B: packed into kc × nr panels first (op(B) is [k, n]; kTrans: B is stored
// [n, k]), or in place (kDirect: B is [k, ldb] row-major, and columns up to n rounded up to nr are
// readable; ldb should not be a multiple of 32 floats, to avoid L1 set conflicts).
enum class BLayout { kPack, kTrans, kDirect };

// C[m0:m1, n0:n1] = A · op(B) + beta · C on the calling thread. m0 must be a multiple of mr.
// beta == 0 never reads C.
void gemm_packed_serial(const MicroKernel& uk, const PackedA& a, BLayout bl, const float* b, int64_t ldb,
                        float beta, float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// The same over all of C [m, n], split over `threads` threads (1: the calling thread).
void gemm_packed(const MicroKernel& uk, const PackedA& a, BLayout bl, int64_t n, const float* b, int64_t ldb,
                 float beta, float* c, int64_t ldc, int threads);
// A row stride >= n for B and C buffers read in place: a multiple of 16 floats, odd in 64-byte lines.
inline int64_t direct_ld(int64_t n) {
  int64_t ld = (n + 15) / 16 * 16;
  if ((ld / 16) % 2 == 0) ld += 16;
  return ld;
}
// The full gemm of ops.h on the calling thread only (for callers already inside a parallel region).
void gemm_serial(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
// Threads worth using for an m × n × k product (small products stay on one thread).
int gemm_threads(int64_t m, int64_t n, int64_t k);

}  // namespace pipar::kernels::cpu::detail
