// CUDA GEMM under conv2d and linear: hand-written shared-memory tiled, register-blocked kernels of our
// own (gemm_kernels.cuh: a 64x64 and a double-buffered 128x128 tiling, K split where the output has
// too few tiles, built for sm_90) and the cuBLAS alternative (cublasSgemm /
// cublasSgemmStridedBatched, FP32 math), chosen by set_gemm_backend or PIPAR_GEMM_BACKEND. Row-major
// throughout; batches run in gridDim.z, in one level (strided) or two (a convolution's samples by its
// groups, gemm_batched_2d: one launch where cuBLAS loops over one level).
// The 64x64 kernel and split-K were verified on an H200 (OpsCuda.*: against a double reference, exact
// on small integers); the 128x128 kernel and the tile choice are tested on the CPU through the kernel
// emulation (tests/kernels/cuda_emulated_test.cpp) and have not yet run on a GPU.
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/blas.h"
#include "kernels/cuda/gemm_kernels.cuh"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/runtime_cuda.h"

namespace pipar::kernels::cuda {
namespace {

using gemm_detail::Batch2;
using gemm_detail::GemmPlan;
constexpr int64_t kMaxGridYZ = 65535;

int multiprocessors() {
  int dev = 0, sms = 0;
  PIPAR_CUDA_CHECK(cudaGetDevice(&dev));
  PIPAR_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms > 0 ? sms : 1;
}

// --- launchers ------------------------------------------------------------------------------------

template <bool TransA, bool TransB>
void gemm_tiled(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                int64_t ldb, float beta, float* c, int64_t ldc, const Batch2& bt, int64_t batch, cudaStream_t s) {
  // K chunks live in gridDim.z beside the batch, and one launch must hold every row (gridDim.y and .z
  // are limited to 65535).
  const bool split_ok = m <= kMaxGridYZ * gemm_detail::kSmallTile && k > 0 && batch <= kMaxGridYZ / gemm_detail::kMaxSplits;
  const GemmPlanning planning = gemm_planning();
  const gemm_detail::TilingRule rule = planning == GemmPlanning::kBaseline ? gemm_detail::TilingRule::kSmallOnly
                                       : planning == GemmPlanning::kLarge  ? gemm_detail::TilingRule::kLargeOnly
                                                                           : gemm_detail::TilingRule::kByShape;
  const GemmPlan plan = gemm_detail::plan_gemm(m, n, k, batch, multiprocessors(), split_ok, rule);
  const bool large = plan.tiling == gemm_detail::Tiling::kLarge;
  const auto kernel = large ? gemm_detail::gemm_large_kernel<TransA, TransB> : gemm_detail::gemm_small_kernel<TransA, TransB>;
  const int64_t grid_x = ceil_div(n, plan.tile);
  PIPAR_CHECK(grid_x <= INT_MAX, "gemm: n = ", n, " is too large for one grid");
  if (plan.splits > 1) {
    float* partial = static_cast<float*>(malloc_device(sizeof(float) * plan.splits * batch * m * n, StreamRef{s}));
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(ceil_div(m, plan.tile)),
                    static_cast<unsigned>(batch * plan.splits));
    kernel<<<grid, gemm_detail::kThreads, 0, s>>>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bt, 0,
                                     static_cast<int>(plan.splits), plan.k_chunk, partial, batch);
    PIPAR_CUDA_CHECK(cudaGetLastError());
    const int64_t total = batch * m * n;
    const int64_t blocks = ceil_div(total, int64_t{256}) < 4096 ? ceil_div(total, int64_t{256}) : 4096;
    gemm_detail::gemm_splitk_reduce<<<static_cast<unsigned>(blocks), 256, 0, s>>>(
        m, n, batch, static_cast<int>(plan.splits), partial, alpha, beta, c, ldc, bt);
    PIPAR_CUDA_CHECK(cudaGetLastError());
    free_device(partial, StreamRef{s});
    return;
  }
  const int64_t rows_per_launch = kMaxGridYZ * plan.tile;
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridYZ) {
    const int64_t nb = batch - b0 < kMaxGridYZ ? batch - b0 : kMaxGridYZ;
    for (int64_t r0 = 0; r0 < m; r0 += rows_per_launch) {
      const int64_t mr = m - r0 < rows_per_launch ? m - r0 : rows_per_launch;
      const float* ap = a + (TransA ? r0 : r0 * lda);
      float* cp = c + r0 * ldc;
      const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(ceil_div(mr, plan.tile)),
                      static_cast<unsigned>(nb));
      kernel<<<grid, gemm_detail::kThreads, 0, s>>>(mr, n, k, alpha, ap, lda, b, ldb, beta, cp, ldc, bt, b0, 1, k, nullptr, batch);
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

std::atomic<GemmPlanning>& planning_state() {
  static std::atomic<GemmPlanning> p{[] {
    const char* e = std::getenv("PIPAR_GEMM_PLANNING");
    if (e && std::strcmp(e, "baseline") == 0) return GemmPlanning::kBaseline;
    return e && std::strcmp(e, "large") == 0 ? GemmPlanning::kLarge : GemmPlanning::kAuto;
  }()};
  return p;
}

}  // namespace

// --- entry points ---------------------------------------------------------------------------------

namespace {
thread_local int t_backend_override = -1;  // ScopedGemmBackend: a GemmBackend, or -1 for none
}  // namespace

void set_gemm_backend(GemmBackend b) { backend_state().store(b); }
void set_gemm_planning(GemmPlanning p) { planning_state().store(p); }
GemmPlanning gemm_planning() { return planning_state().load(); }
const char* gemm_planning_name(GemmPlanning p) {
  return p == GemmPlanning::kBaseline ? "baseline" : p == GemmPlanning::kLarge ? "large" : "auto";
}
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
