// CUDA GEMM under conv2d and linear: a shared-memory tiled, register-blocked kernel of our own
// (64x64 block tile, 16-deep K slices, 4x4 outputs per thread, built for sm_90) and the cuBLAS
// alternative (cublasSgemm / cublasSgemmStridedBatched, FP32 math), chosen by set_gemm_backend or
// PIPAR_GEMM_BACKEND. Row-major throughout; batches run in gridDim.z, in one level (strided) or two (a
// convolution's samples by its groups, gemm_batched_2d: one launch where cuBLAS loops over one level).
// Split-K: where the output has too few tiles to fill the GPU (a dense layer of 10 samples, the
// weight gradient of a convolution: 2 to 20 tiles against 132 multiprocessors on an H200) but K is
// long, the K range is cut into S chunks, each block writes its partial tile to scratch, and a second
// kernel sums the S partials in a fixed order (deterministic, no atomics) and applies alpha and beta.
// Verified on an H200 (OpsCuda.*: against a double reference, exact on small integers).
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/blas.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/runtime_cuda.h"

namespace pipar::kernels::cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16;  // block tile
constexpr int kMicro = 4;                               // kMicro x kMicro outputs per thread
constexpr int kGemmThreads = (kTileM / kMicro) * (kTileN / kMicro);  // 256
constexpr int64_t kMaxGridYZ = 65535;
static_assert(kTileM * kTileK == 4 * kGemmThreads && kTileN * kTileK == 4 * kGemmThreads,
              "each thread loads 4 elements of each tile");

// --- kernels --------------------------------------------------------------------------------------

// Matrix number i of a batch is (i / inner_count, i % inner_count): A's starts at
// a + outer * a_outer + inner * a_inner (likewise B and C). One level (inner_count 1, inner strides 0)
// is a plain strided batch; two are a convolution's samples by its groups.
struct Batch2 {
  int64_t inner_count;
  int64_t a_outer, a_inner, b_outer, b_inner, c_outer, c_inner;
  __host__ __device__ int64_t a(int64_t i) const { return (i / inner_count) * a_outer + (i % inner_count) * a_inner; }
  __host__ __device__ int64_t b(int64_t i) const { return (i / inner_count) * b_outer + (i % inner_count) * b_inner; }
  __host__ __device__ int64_t c(int64_t i) const { return (i / inner_count) * c_outer + (i % inner_count) * c_inner; }
};

// C[m,n] = alpha * op(A) op(B) + beta * C, block (x, y, z) a 64x64 tile of matrix batch0 + z / splits.
// Thread (ty, tx) of the 16x16 block owns rows ty + 16i and columns tx + 16j (i, j < 4) of the tile,
// so shared-memory reads broadcast along A and run across banks along B. Tiles are zero-filled past
// the matrix edges, so every shared element read in the K loop was written in the same slice. Split-K (splits > 1): the block
// sums K range [chunk * k_chunk, (chunk + 1) * k_chunk), chunk = z % splits, only, and stores its raw
// sums (no alpha, no beta) at partial[((chunk * batches + batch) * m + row) * n + col], for
// gemm_splitk_reduce.
template <bool TransA, bool TransB>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_tiled_kernel(int64_t m, int64_t n, int64_t k, float alpha, const float* __restrict__ a, int64_t lda,
                      const float* __restrict__ b, int64_t ldb, float beta, float* c, int64_t ldc, Batch2 bt,
                      int64_t batch0, int splits, int64_t k_chunk, float* partial, int64_t batches) {
  __shared__ float as[kTileK][kTileM + 1];  // as[kk][r] = op(A)[m0 + r, k0 + kk]; +1 against bank conflicts
  __shared__ float bs[kTileK][kTileN + 1];  // bs[kk][j] = op(B)[k0 + kk, n0 + j]
  const int64_t batch = batch0 + blockIdx.z / splits, chunk = blockIdx.z % splits;
  const int64_t k_begin = chunk * k_chunk, k_end = k_begin + k_chunk < k ? k_begin + k_chunk : k;
  a += bt.a(batch);
  b += bt.b(batch);
  c += bt.c(batch);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int tid = threadIdx.x, tx = tid % (kTileN / kMicro), ty = tid / (kTileN / kMicro);

  float acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    // Load mapping follows the memory layout so that consecutive threads read consecutive addresses.
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = tid + l * kGemmThreads;
      const int r = TransA ? idx % kTileM : idx / kTileK;
      const int kk = TransA ? idx / kTileM : idx % kTileK;
      const int64_t gr = m0 + r, gk = k0 + kk;
      float v = 0.0f;
      if (gr < m && gk < k_end) v = TransA ? a[gk * lda + gr] : a[gr * lda + gk];
      as[kk][r] = v;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = tid + l * kGemmThreads;
      const int j = TransB ? idx / kTileK : idx % kTileN;
      const int kk = TransB ? idx % kTileK : idx / kTileN;
      const int64_t gc = n0 + j, gk = k0 + kk;
      float v = 0.0f;
      if (gc < n && gk < k_end) v = TransB ? b[gc * ldb + gk] : b[gk * ldb + gc];
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

  float* out = splits > 1 ? partial + (chunk * batches + batch) * m * n : nullptr;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= n) continue;
      if (out) {
        out[row * n + col] = acc[i][j];
        continue;
      }
      float* p = c + row * ldc + col;
      *p = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *p;
    }
  }
}

// C = alpha * (sum over the splits' partials, in chunk order) + beta * C, one thread per element.
__global__ void gemm_splitk_reduce(int64_t m, int64_t n, int64_t batches, int splits, const float* __restrict__ partial,
                                   float alpha, float beta, float* c, int64_t ldc, Batch2 bt) {
  const int64_t total = batches * m * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int sp = 0; sp < splits; ++sp) sum += partial[sp * total + e];
    const int64_t batch = e / (m * n), row = (e / n) % m, col = e % n;
    float* p = c + bt.c(batch) + row * ldc + col;
    *p = beta == 0.0f ? alpha * sum : alpha * sum + beta * *p;
  }
}

int multiprocessors() {
  int dev = 0, sms = 0;
  PIPAR_CUDA_CHECK(cudaGetDevice(&dev));
  PIPAR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms > 0 ? sms : 1;
}

// How many K chunks: enough blocks for about two waves of the multiprocessors, each chunk at least
// kMinChunkTiles K slices (shorter chunks cost more in partials than they gain), at most kMaxSplits.
constexpr int64_t kMinChunkTiles = 4, kMaxSplits = 64;
int64_t split_count(int64_t blocks, int64_t k) {
  const int64_t want = 2 * static_cast<int64_t>(multiprocessors());
  if (blocks >= want) return 1;
  int64_t s = ceil_div(want, blocks);
  const int64_t by_k = ceil_div(k, kTileK) / kMinChunkTiles;
  if (s > by_k) s = by_k;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 2 ? 1 : s;
}

// --- launchers ------------------------------------------------------------------------------------

template <bool TransA, bool TransB>
void gemm_tiled(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                int64_t ldb, float beta, float* c, int64_t ldc, const Batch2& bt, int64_t batch, cudaStream_t s) {
  const int64_t grid_x = ceil_div(n, kTileN);
  PIPAR_CHECK(grid_x <= INT_MAX, "gemm: n = ", n, " is too large for one grid");
  // gridDim.y and .z are limited to 65535: split the rows and the batch into pieces that fit.
  const int64_t rows_per_launch = kMaxGridYZ * kTileM;
  const int64_t splits = m <= rows_per_launch && k > 0 && batch <= kMaxGridYZ / kMaxSplits
                             ? split_count(grid_x * ceil_div(m, kTileM) * batch, k)
                             : 1;
  if (splits > 1) {
    // k_chunk: whole K slices, so that only the last chunk is ragged; then as many chunks as it takes.
    const int64_t k_chunk = ceil_div(ceil_div(k, kTileK), splits) * kTileK, used = ceil_div(k, k_chunk);
    float* partial = static_cast<float*>(malloc_device(sizeof(float) * used * batch * m * n, StreamRef{s}));
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(ceil_div(m, kTileM)),
                    static_cast<unsigned>(batch * used));
    gemm_tiled_kernel<TransA, TransB><<<grid, kGemmThreads, 0, s>>>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt,
                                                                     0, static_cast<int>(used), k_chunk, partial, batch);
    PIPAR_CUDA_CHECK(cudaGetLastError());
    const int64_t total = batch * m * n;
    const int64_t blocks = ceil_div(total, int64_t{256}) < 4096 ? ceil_div(total, int64_t{256}) : 4096;
    gemm_splitk_reduce<<<static_cast<unsigned>(blocks), 256, 0, s>>>(m, n, batch, static_cast<int>(used), partial,
                                                                     alpha, beta, c, ldc, bt);
    PIPAR_CUDA_CHECK(cudaGetLastError());
    free_device(partial, StreamRef{s});
    return;
  }
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridYZ) {
    const int64_t nb = batch - b0 < kMaxGridYZ ? batch - b0 : kMaxGridYZ;
    for (int64_t r0 = 0; r0 < m; r0 += rows_per_launch) {
      const int64_t mr = m - r0 < rows_per_launch ? m - r0 : rows_per_launch;
      const float* ap = a + (TransA ? r0 : r0 * lda);
      float* cp = c + r0 * ldc;
      const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(ceil_div(mr, kTileM)),
                      static_cast<unsigned>(nb));
      gemm_tiled_kernel<TransA, TransB>
          <<<grid, kGemmThreads, 0, s>>>(mr, n, k, alpha, ap, lda, b, ldb, beta, cp, ldc, bt, b0, 1, k, nullptr, batch);
      PIPAR_CUDA_CHECK(cudaGetLastError());
    }
  }
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands and m, n. Two
// levels: a strided-batched call over the larger count, looped over the smaller.
void gemm_cublas(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const Batch2& bt,
                 int64_t outer, StreamRef s) {
  cublasHandle_t h = blas_handle(s);
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int64_t inner = bt.inner_count;
  auto batched = [&](const float* ap, int64_t sa, const float* bp, int64_t sb, float* cp, int64_t sc, int64_t count) {
    if (count == 1) {
      PIPAR_CUBLAS_CHECK(cublasSgemm(h, op_b, op_a, ni, mi, ki, &alpha, bp, static_cast<int>(ldb), ap,
                                     static_cast<int>(lda), &beta, cp, static_cast<int>(ldc)));
      return;
    }
    PIPAR_CUBLAS_CHECK(cublasSgemmStridedBatched(h, op_b, op_a, ni, mi, ki, &alpha, bp, static_cast<int>(ldb), sb, ap,
                                                 static_cast<int>(lda), sa, &beta, cp, static_cast<int>(ldc), sc,
                                                 static_cast<int>(count)));
  };
  if (inner >= outer) {
    for (int64_t o = 0; o < outer; ++o)
      batched(a + o * bt.a_outer, bt.a_inner, b + o * bt.b_outer, bt.b_inner, c + o * bt.c_outer, bt.c_inner, inner);
  } else {
    for (int64_t i = 0; i < inner; ++i)
      batched(a + i * bt.a_inner, bt.a_outer, b + i * bt.b_inner, bt.b_outer, c + i * bt.c_inner, bt.c_outer, outer);
  }
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

void gemm_batched_2d(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                     int64_t lda, int64_t a_outer, int64_t a_inner, const float* b, int64_t ldb, int64_t b_outer,
                     int64_t b_inner, float beta, float* c, int64_t ldc, int64_t c_outer, int64_t c_inner,
                     int64_t outer, int64_t inner, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "gemm");
  PIPAR_CHECK(m >= 0 && n >= 0 && k >= 0 && outer >= 0 && inner >= 0, "gemm: negative size m=", m, " n=", n, " k=", k,
              " batch=", outer, "x", inner);
  if (m == 0 || n == 0 || outer == 0 || inner == 0) return;
  const int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
  PIPAR_CHECK(lda >= (a_cols > 1 ? a_cols : 1) && ldb >= (b_cols > 1 ? b_cols : 1) && ldc >= n,
              "gemm: leading dimension too small (lda=", lda, " ldb=", ldb, " ldc=", ldc, " for m=", m, " n=", n,
              " k=", k, ")");
  PIPAR_CHECK(a && b && c, "gemm: null matrix pointer");
  const Batch2 bt{inner, a_outer, a_inner, b_outer, b_inner, c_outer, c_inner};
  const int64_t batch = outer * inner;
  const bool cublas_ok = fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) &&
                         fits_int(ldc) && fits_int(outer) && fits_int(inner);
  if (gemm_backend() == GemmBackend::kCublas && cublas_ok) {
    gemm_cublas(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt, outer, s);
    return;
  }
  if (trans_a && trans_b)
    gemm_tiled<true, true>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt, batch, st);
  else if (trans_a)
    gemm_tiled<true, false>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt, batch, st);
  else if (trans_b)
    gemm_tiled<false, true>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt, batch, st);
  else
    gemm_tiled<false, false>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt, batch, st);
}

void gemm_strided_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                          int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta,
                          float* c, int64_t ldc, int64_t stride_c, int64_t batch, StreamRef s) {
  gemm_batched_2d(trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, 0, b, ldb, stride_b, 0, beta, c, ldc, stride_c, 0,
                  batch, 1, s);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, StreamRef s) {
  gemm_strided_batched(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1, s);
}

}  // namespace pipar::kernels::cuda
