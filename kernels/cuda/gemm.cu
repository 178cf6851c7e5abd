// CUDA GEMM under conv2d and linear: a shared-memory tiled, register-blocked kernel of our own
// (64x64 block tile, 16-deep K slices, 4x4 outputs per thread, built for sm_90) and the cuBLAS
// alternative (cublasSgemm / cublasSgemmStridedBatched, FP32 math), chosen by set_gemm_backend or
// PIPAR_GEMM_BACKEND. Row-major throughout; batches run in gridDim.z.
// Checked only in a CPU emulation (blocks run as std::threads with barriers; handwritten kernels
// against the CPU backend, guard elements intact). NOT verified on a GPU: results, speed, the cuBLAS row-major
// mapping, and the grid splitting for m > 4M rows or more than 65535 batches.
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/blas.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"

namespace pipar::kernels::cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16;  // block tile
constexpr int kMicro = 4;                               // kMicro x kMicro outputs per thread
constexpr int kGemmThreads = (kTileM / kMicro) * (kTileN / kMicro);  // 256
constexpr int64_t kMaxGridYZ = 65535;
static_assert(kTileM * kTileK == 4 * kGemmThreads && kTileN * kTileK == 4 * kGemmThreads,
              "each thread loads 4 elements of each tile");

// --- kernels --------------------------------------------------------------------------------------

// C[m,n] = alpha * op(A) op(B) + beta * C for matrix blockIdx.z of the batch. Thread (ty, tx) of the
// 16x16 block owns rows ty + 16i and columns tx + 16j (i, j < 4) of the 64x64 tile, so shared-memory
// reads broadcast along A and run across banks along B. Tiles are zero-filled past the matrix edges,
// so every shared element read in the K loop was written in the same slice.
template <bool TransA, bool TransB>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_tiled_kernel(int64_t m, int64_t n, int64_t k, float alpha, const float* __restrict__ a, int64_t lda,
                      int64_t stride_a, const float* __restrict__ b, int64_t ldb, int64_t stride_b, float beta,
                      float* c, int64_t ldc, int64_t stride_c) {
  __shared__ float as[kTileK][kTileM + 1];  // as[kk][r] = op(A)[m0 + r, k0 + kk]; +1 against bank conflicts
  __shared__ float bs[kTileK][kTileN + 1];  // bs[kk][j] = op(B)[k0 + kk, n0 + j]
  const int64_t batch = blockIdx.z;
  a += batch * stride_a;
  b += batch * stride_b;
  c += batch * stride_c;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int tid = threadIdx.x, tx = tid % (kTileN / kMicro), ty = tid / (kTileN / kMicro);

  float acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    // Load mapping follows the memory layout so that consecutive threads read consecutive addresses.
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = tid + l * kGemmThreads;
      const int r = TransA ? idx % kTileM : idx / kTileK;
      const int kk = TransA ? idx / kTileM : idx % kTileK;
      const int64_t gr = m0 + r, gk = k0 + kk;
      float v = 0.0f;
      if (gr < m && gk < k) v = TransA ? a[gk * lda + gr] : a[gr * lda + gk];
      as[kk][r] = v;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = tid + l * kGemmThreads;
      const int j = TransB ? idx / kTileK : idx % kTileN;
      const int kk = TransB ? idx % kTileK : idx / kTileN;
      const int64_t gc = n0 + j, gk = k0 + kk;
      float v = 0.0f;
      if (gc < n && gk < k) v = TransB ? b[gc * ldb + gk] : b[gk * ldb + gc];
      bs[kk][j] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float ra[kMicro], rb[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) ra[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) rb[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
    }
    __syncthreads();  // the next slice overwrites as/bs
  }

#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= n) continue;
      float* p = c + row * ldc + col;
      *p = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *p;
    }
  }
}

// --- launchers ------------------------------------------------------------------------------------

template <bool TransA, bool TransB>
void gemm_tiled(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, int64_t stride_a,
                const float* b, int64_t ldb, int64_t stride_b, float beta, float* c, int64_t ldc, int64_t stride_c,
                int64_t batch, cudaStream_t s) {
  const int64_t grid_x = ceil_div(n, kTileN);
  PIPAR_CHECK(grid_x <= INT_MAX, "gemm: n = ", n, " is too large for one grid");
  // gridDim.y and .z are limited to 65535: split the rows and the batch into pieces that fit.
  const int64_t rows_per_launch = kMaxGridYZ * kTileM;
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridYZ) {
    const int64_t nb = batch - b0 < kMaxGridYZ ? batch - b0 : kMaxGridYZ;
    for (int64_t r0 = 0; r0 < m; r0 += rows_per_launch) {
      const int64_t mr = m - r0 < rows_per_launch ? m - r0 : rows_per_launch;
      const float* ap = a + b0 * stride_a + (TransA ? r0 : r0 * lda);
      const float* bp = b + b0 * stride_b;
      float* cp = c + b0 * stride_c + r0 * ldc;
      const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(ceil_div(mr, kTileM)),
                      static_cast<unsigned>(nb));
      gemm_tiled_kernel<TransA, TransB>
          <<<grid, kGemmThreads, 0, s>>>(mr, n, k, alpha, ap, lda, stride_a, bp, ldb, stride_b, beta, cp, ldc, stride_c);
      PIPAR_CUDA_CHECK(cudaGetLastError());
    }
  }
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands and m, n.
void gemm_cublas(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta, float* c,
                 int64_t ldc, int64_t stride_c, int64_t batch, StreamRef s) {
  cublasHandle_t h = blas_handle(s);
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  if (batch == 1) {
    PIPAR_CUBLAS_CHECK(cublasSgemm(h, op_b, op_a, ni, mi, ki, &alpha, b, static_cast<int>(ldb), a,
                                   static_cast<int>(lda), &beta, c, static_cast<int>(ldc)));
    return;
  }
  PIPAR_CUBLAS_CHECK(cublasSgemmStridedBatched(h, op_b, op_a, ni, mi, ki, &alpha, b, static_cast<int>(ldb), stride_b,
                                               a, static_cast<int>(lda), stride_a, &beta, c, static_cast<int>(ldc),
                                               stride_c, static_cast<int>(batch)));
}

GemmBackend backend_from_env() {
  const char* e = std::getenv("PIPAR_GEMM_BACKEND");
  return e && std::strcmp(e, "cublas") == 0 ? GemmBackend::kCublas : GemmBackend::kHandwritten;
}

std::atomic<GemmBackend>& backend_state() {
  static std::atomic<GemmBackend> b{backend_from_env()};
  return b;
}

}  // namespace

// --- entry points ---------------------------------------------------------------------------------

namespace {
thread_local int t_backend_override = -1;  // ScopedGemmBackend: a GemmBackend, or -1 for none
}  // namespace

void set_gemm_backend(GemmBackend b) { backend_state().store(b); }
GemmBackend gemm_backend() {
  return t_backend_override >= 0 ? static_cast<GemmBackend>(t_backend_override) : backend_state().load();
}
ScopedGemmBackend::ScopedGemmBackend(GemmBackend b) : prev_(t_backend_override) {
  t_backend_override = static_cast<int>(b);
}
ScopedGemmBackend::~ScopedGemmBackend() { t_backend_override = prev_; }
const char* gemm_backend_name(GemmBackend b) { return b == GemmBackend::kCublas ? "cublas" : "handwritten"; }

void gemm_strided_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                          int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta,
                          float* c, int64_t ldc, int64_t stride_c, int64_t batch, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "gemm");
  PIPAR_CHECK(m >= 0 && n >= 0 && k >= 0 && batch >= 0, "gemm: negative size m=", m, " n=", n, " k=", k,
              " batch=", batch);
  if (m == 0 || n == 0 || batch == 0) return;
  const int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
  PIPAR_CHECK(lda >= (a_cols > 1 ? a_cols : 1) && ldb >= (b_cols > 1 ? b_cols : 1) && ldc >= n,
              "gemm: leading dimension too small (lda=", lda, " ldb=", ldb, " ldc=", ldc, " for m=", m, " n=", n,
              " k=", k, ")");
  PIPAR_CHECK(a && b && c, "gemm: null matrix pointer");
  const bool cublas_ok = fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) &&
                         fits_int(ldc) && fits_int(batch);
  if (gemm_backend() == GemmBackend::kCublas && cublas_ok) {
    gemm_cublas(trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch,
                s);
    return;
  }
  if (trans_a && trans_b)
    gemm_tiled<true, true>(m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch, st);
  else if (trans_a)
    gemm_tiled<true, false>(m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch, st);
  else if (trans_b)
    gemm_tiled<false, true>(m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch, st);
  else
    gemm_tiled<false, false>(m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch, st);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, StreamRef s) {
  gemm_strided_batched(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1, s);
}

}  // namespace pipar::kernels::cuda
