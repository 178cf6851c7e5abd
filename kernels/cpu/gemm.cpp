// The packed, cache-blocked GEMM (GotoBLAS/BLIS loop order) under conv2d and linear: packing of A and
// B into aligned panels, the portable micro-kernel, run-time choice of the AVX2/AVX-512 ones, and the
// serial and threaded drivers declared in gemm_internal.h.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/ops.h"
#include "kernels/parallel.h"

namespace pipar::kernels::cpu {
namespace detail {

// --- scratch ----------------------------------------------------------------------------------------

AlignedBuffer::~AlignedBuffer() { std::free(ptr_); }

float* AlignedBuffer::get(size_t n) {
  if (n > cap_) {
    std::free(ptr_);
    const size_t bytes = (std::max<size_t>(n, 16) * sizeof(float) + 63) / 64 * 64;
    ptr_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!ptr_) throw std::bad_alloc();
    cap_ = bytes / sizeof(float);
  }
  return ptr_;
}

// --- portable micro-kernel --------------------------------------------------------------------------
// GCC/Clang vector extensions: 4-float vectors map to SSE on x86-64 and NEON on ARM. 6 × 8 keeps 12
// accumulators + 2 B vectors + 1 broadcast within the 16 registers of SSE.

namespace {
typedef float Vec4 __attribute__((vector_size(16)));

template <int kMr, int kNv>
void micro_kernel_vec4(int64_t kc, const float* __restrict a, const float* __restrict b, int64_t ldb,
                       float* __restrict c, int64_t ldc, bool accumulate) {
  Vec4 acc[kMr][kNv];
  for (int i = 0; i < kMr; ++i)
    for (int v = 0; v < kNv; ++v) acc[i][v] = Vec4{0, 0, 0, 0};
  for (int64_t p = 0; p < kc; ++p) {
    Vec4 bv[kNv];
    for (int v = 0; v < kNv; ++v) std::memcpy(&bv[v], b + p * ldb + 4 * v, sizeof(Vec4));
    for (int i = 0; i < kMr; ++i) {
      const float s = a[p * kMr + i];
      const Vec4 av = Vec4{s, s, s, s};
      for (int v = 0; v < kNv; ++v) acc[i][v] += av * bv[v];
    }
  }
  for (int i = 0; i < kMr; ++i)
    for (int v = 0; v < kNv; ++v) {
      float* dst = c + i * ldc + 4 * v;
      Vec4 out = acc[i][v];
      if (accumulate) {
        Vec4 old;
        std::memcpy(&old, dst, sizeof(Vec4));
        out += old;
      }
      std::memcpy(dst, &out, sizeof(Vec4));
    }
}
}  // namespace

MicroKernel micro_kernel_generic() { return {6, 8, &micro_kernel_vec4<6, 2>, "generic 6x8"}; }

MicroKernel select_micro_kernel() {
#if PIPAR_X86
  switch (cpu_isa()) {
    case Isa::kAvx512: return micro_kernel_avx512();
    case Isa::kAvx2: return micro_kernel_avx2();
    case Isa::kGeneric: break;
  }
#endif
  return micro_kernel_generic();
}

IndirectKernel select_indirect_kernel(int nv) {
#if PIPAR_X86
  if (cpu_isa() == Isa::kAvx512) return indirect_kernel_avx512(nv);
  if (cpu_isa() == Isa::kAvx2) return indirect_kernel_avx2(nv);
#endif
  (void)nv;
  return {};
}

void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd, const float* bias) {
#if PIPAR_X86
  if (cpu_isa() == Isa::kAvx512) return transpose_avx512(rows, cols, src, lds, dst, ldd, bias);
  if (cpu_isa() == Isa::kAvx2) return transpose_avx2(rows, cols, src, lds, dst, ldd, bias);
#endif
  for (int64_t j = 0; j < cols; ++j) {
    const float b = bias ? bias[j] : 0.0f;
    for (int64_t i = 0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j] + b;
  }
}

// --- dot-product kernel (C += A B^T) ------------------------------------------------------------------

namespace {
void dot_kernel_vec4(int64_t len, const float* const* a, const float* const* b, float* out) {
  Vec4 acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = Vec4{0, 0, 0, 0};
  for (int64_t p = 0; p < len; p += 4) {
    Vec4 av[4], bv[4];
    for (int i = 0; i < 4; ++i) std::memcpy(&av[i], a[i] + p, sizeof(Vec4));
    for (int j = 0; j < 4; ++j) std::memcpy(&bv[j], b[j] + p, sizeof(Vec4));
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) out[i * 4 + j] = (acc[i][j][0] + acc[i][j][1]) + (acc[i][j][2] + acc[i][j][3]);
}
}  // namespace

DotKernel dot_kernel_generic() { return {4, &dot_kernel_vec4}; }

DotKernel select_dot_kernel() {
#if PIPAR_X86
  switch (cpu_isa()) {
    case Isa::kAvx512: return dot_kernel_avx512();
    case Isa::kAvx2: return dot_kernel_avx2();
    case Isa::kGeneric: break;
  }
#endif
  return dot_kernel_generic();
}

void gemm_nt_accumulate(int64_t m, int64_t n, int64_t len, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc) {
  const DotKernel dk = select_dot_kernel();
  const int64_t body = len / dk.width * dk.width;
  // Blocks of 32 B rows stay in L2 while every 4-row block of A passes over them.
  for (int64_t jb = 0; jb < n; jb += 32)
  for (int64_t i0 = 0; i0 < m; i0 += 4) {
    const float* ar[4];
    for (int i = 0; i < 4; ++i) ar[i] = a + std::min<int64_t>(i0 + i, m - 1) * lda;  // edge: repeat the last row
    for (int64_t j0 = jb; j0 < std::min<int64_t>(n, jb + 32); j0 += 4) {
      const float* br[4];
      for (int j = 0; j < 4; ++j) br[j] = b + std::min<int64_t>(j0 + j, n - 1) * ldb;
      float out[16];
      if (body > 0) dk.fn(body, ar, br, out);
      else std::fill(out, out + 16, 0.0f);
      for (int i = 0; i < 4 && i0 + i < m; ++i)
        for (int j = 0; j < 4 && j0 + j < n; ++j) {
          float sum = out[i * 4 + j];
          for (int64_t p = body; p < len; ++p) sum += ar[i][p] * br[j][p];
          c[(i0 + i) * ldc + j0 + j] += sum;
        }
    }
  }
}

// --- packing ----------------------------------------------------------------------------------------

namespace {

// One mr × kc panel of alpha·op(A): rows [i0, i0+mr) (zero past m), depth [p0, p0+kc).
void pack_a_panel(bool trans_a, int64_t m, float alpha, const float* a, int64_t lda, int64_t i0, int64_t p0,
                  int64_t kc, int mr, float* __restrict dst) {
  const int64_t rows = std::min<int64_t>(mr, m - i0);
  if (!trans_a) {
    for (int64_t ii = 0; ii < rows; ++ii) {
      const float* src = a + (i0 + ii) * lda + p0;
      for (int64_t p = 0; p < kc; ++p) dst[p * mr + ii] = alpha * src[p];
    }
    for (int64_t ii = rows; ii < mr; ++ii)
      for (int64_t p = 0; p < kc; ++p) dst[p * mr + ii] = 0.0f;
  } else {
    for (int64_t p = 0; p < kc; ++p) {
      const float* src = a + (p0 + p) * lda + i0;
      float* d = dst + p * mr;
      for (int64_t ii = 0; ii < rows; ++ii) d[ii] = alpha * src[ii];
      for (int64_t ii = rows; ii < mr; ++ii) d[ii] = 0.0f;
    }
  }
}

// op(B) rows [p0, p0+kc), columns [j0, j0+nc) as nc/nr panels of kc × nr (zero past the columns).
void pack_b_block(bool trans_b, const float* b, int64_t ldb, int64_t p0, int64_t kc, int64_t j0, int64_t nc,
                  int nr, float* __restrict dst) {
  for (int64_t jr = 0; jr < nc; jr += nr) {
    const int64_t cols = std::min<int64_t>(nr, nc - jr);
    float* panel = dst + jr * kc;
    if (!trans_b) {
      const float* src = b + p0 * ldb + j0 + jr;
      if (cols == nr) {
        for (int64_t p = 0; p < kc; ++p) std::memcpy(panel + p * nr, src + p * ldb, sizeof(float) * nr);
      } else {
        for (int64_t p = 0; p < kc; ++p) {
          float* d = panel + p * nr;
          for (int64_t jj = 0; jj < cols; ++jj) d[jj] = src[p * ldb + jj];
          for (int64_t jj = cols; jj < nr; ++jj) d[jj] = 0.0f;
        }
      }
    } else {
      // B is [n, k]: op(B)[p][j] = b[j*ldb + p]. Read along k (contiguous), write with stride nr.
      for (int64_t jj = 0; jj < cols; ++jj) {
        const float* src = b + (j0 + jr + jj) * ldb + p0;
        for (int64_t p = 0; p < kc; ++p) panel[p * nr + jj] = src[p];
      }
      if (cols < nr)
        for (int64_t p = 0; p < kc; ++p)
          for (int64_t jj = cols; jj < nr; ++jj) panel[p * nr + jj] = 0.0f;
    }
  }
}

void scale_block(float beta, float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t i = m0; i < m1; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f)
      for (int64_t j = n0; j < n1; ++j) row[j] = 0.0f;
    else
      for (int64_t j = n0; j < n1; ++j) row[j] *= beta;
  }
}

}  // namespace

void PackedA::pack(const MicroKernel& uk, bool trans_a, int64_t m, int64_t k, float alpha, const float* a,
                   int64_t lda, int threads) {
  mr_ = uk.mr;
  m_ = m;
  k_ = k;
  m_pad_ = (m + mr_ - 1) / mr_ * mr_;
  data_ = buf_.get(static_cast<size_t>(std::max<int64_t>(m_pad_ * k, 1)));
  const int64_t panels = m_pad_ / mr_;
  const int64_t blocks = (k + kKc - 1) / kKc;
  const int64_t items = panels * blocks;
  auto pack_item = [&](int64_t it) {
    const int64_t p0 = (it / panels) * kKc, i0 = (it % panels) * mr_;
    pack_a_panel(trans_a, m, alpha, a, lda, i0, p0, kc_at(p0), mr_, data_ + p0 * m_pad_ + i0 * kc_at(p0));
  };
  if (threads > 1 && items > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t it = 0; it < items; ++it) pack_item(it);
  } else {
    for (int64_t it = 0; it < items; ++it) pack_item(it);
  }
}

// --- drivers ----------------------------------------------------------------------------------------

void gemm_packed_serial(const MicroKernel& uk, const PackedA& a, BLayout bl, const float* b, int64_t ldb,
                        float beta, float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 <= m0 || n1 <= n0) return;
  const int64_t k = a.k();
  const int mr = uk.mr, nr = uk.nr;
  if (k == 0) {
    if (beta != 1.0f) scale_block(beta, c, ldc, m0, m1, n0, n1);
    return;
  }
  bool accumulate_first = true;
  if (beta == 0.0f) accumulate_first = false;
  else if (beta != 1.0f) scale_block(beta, c, ldc, m0, m1, n0, n1);

  thread_local AlignedBuffer b_buf;
  const bool direct = bl == BLayout::kDirect;
  const int64_t nc_max = std::min<int64_t>(kNc, (n1 - n0 + nr - 1) / nr * nr);
  float* bp = direct ? nullptr : b_buf.get(static_cast<size_t>(std::min<int64_t>(kKc, k) * nc_max));
  alignas(64) float tmp[32 * 64];  // one edge tile; mr * nr <= 2048 for every kernel
  const int64_t mc_step = std::max<int64_t>(1, kMc / mr) * mr;

  for (int64_t j0 = n0; j0 < n1; j0 += kNc) {
    const int64_t nc = std::min<int64_t>(kNc, n1 - j0);
    for (int64_t p0 = 0; p0 < k; p0 += kKc) {
      const int64_t kc = a.kc_at(p0);
      if (!direct) pack_b_block(bl == BLayout::kTrans, b, ldb, p0, kc, j0, nc, nr, bp);
      const int64_t b_ld = direct ? ldb : nr;
      const bool acc = accumulate_first || p0 > 0;
      for (int64_t i0 = m0; i0 < m1; i0 += mc_step) {
        const int64_t mc = std::min<int64_t>(mc_step, m1 - i0);
        for (int64_t jr = 0; jr < nc; jr += nr) {
          const int64_t nv = std::min<int64_t>(nr, nc - jr);
          const float* b_panel = direct ? b + p0 * ldb + j0 + jr : bp + jr * kc;
          for (int64_t ir = 0; ir < mc; ir += mr) {
            const int64_t mv = std::min<int64_t>(mr, mc - ir);
            const float* a_panel = a.panel(p0, i0 + ir);
            float* ct = c + (i0 + ir) * ldc + j0 + jr;
            if (mv == mr && nv == nr) {
              uk.fn(kc, a_panel, b_panel, b_ld, ct, ldc, acc);
            } else {
              uk.fn(kc, a_panel, b_panel, b_ld, tmp, nr, false);
              for (int64_t i = 0; i < mv; ++i) {
                float* row = ct + i * ldc;
                const float* t = tmp + i * nr;
                if (acc)
                  for (int64_t j = 0; j < nv; ++j) row[j] += t[j];
                else
                  for (int64_t j = 0; j < nv; ++j) row[j] = t[j];
              }
            }
          }
        }
      }
    }
  }
}

void gemm_packed(const MicroKernel& uk, const PackedA& a, BLayout bl, int64_t n, const float* b, int64_t ldb,
                 float beta, float* c, int64_t ldc, int threads) {
  const int64_t m = a.m();
  if (threads <= 1) {
    gemm_packed_serial(uk, a, bl, b, ldb, beta, c, ldc, 0, m, 0, n);
    return;
  }
  // Split C by whole micro-tiles along n (threads share packed A, pack disjoint B) unless the split
  // along m balances clearly better.
  const int64_t tiles_n = (n + uk.nr - 1) / uk.nr, tiles_m = (m + uk.mr - 1) / uk.mr;
  auto efficiency = [&](int64_t tiles) {
    const int64_t per = (tiles + threads - 1) / threads;
    return static_cast<double>(tiles) / static_cast<double>(per * threads);
  };
  const bool split_n = efficiency(tiles_n) + 0.1 >= efficiency(tiles_m);
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t tiles = split_n ? tiles_n : tiles_m;
    const int64_t lo = tiles * t / nt, hi = tiles * (t + 1) / nt;
    if (split_n)
      gemm_packed_serial(uk, a, bl, b, ldb, beta, c, ldc, 0, m, lo * uk.nr, std::min(n, hi * uk.nr));
    else
      gemm_packed_serial(uk, a, bl, b, ldb, beta, c, ldc, lo * uk.mr, std::min(m, hi * uk.mr), 0, n);
  }
}

void gemm_serial(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const MicroKernel uk = select_micro_kernel();
  thread_local PackedA packed;
  packed.pack(uk, trans_a, m, k, alpha, a, lda, 1);
  gemm_packed_serial(uk, packed, trans_b ? BLayout::kTrans : BLayout::kPack, b, ldb, beta, c, ldc, 0, m, 0, n);
}

int gemm_threads(int64_t m, int64_t n, int64_t k) {
  if (omp_in_parallel()) return 1;
  // Waking a team costs a few microseconds: below ~256K multiply-adds one core is done sooner.
  const int64_t work = m * n * std::max<int64_t>(k, 1);
  if (work < 256 * 1024) return 1;
  const int t = num_threads();
  const int64_t useful = work / (128 * 1024);
  return static_cast<int>(std::min<int64_t>(t, std::max<int64_t>(useful, 1)));
}

}  // namespace detail

// --- entry point ------------------------------------------------------------------------------------

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const detail::MicroKernel uk = detail::select_micro_kernel();
  const int threads = detail::gemm_threads(m, n, k);
  thread_local detail::PackedA packed;
  packed.pack(uk, trans_a, m, k, alpha, a, lda, threads);
  detail::gemm_packed(uk, packed, trans_b ? detail::BLayout::kTrans : detail::BLayout::kPack, n, b, ldb, beta, c, ldc,
                      threads);
}

}  // namespace pipar::kernels::cpu
