// cuBLAS handle cache (one handle per stream) and cuBLAS error reporting. Host code only.
// Verified on an H200 (OpsCuda.Gemm*, the cuBLAS backend against a double reference).
#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/stream_handles.h"

namespace pipar::kernels::cuda {
namespace {

// Leaked on purpose (no cublasDestroy during static destruction, after the driver may be gone).
StreamHandles<cublasHandle_t>& handles() {
  static auto* h = new StreamHandles<cublasHandle_t>();
  return *h;
}

}  // namespace

void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  throw Error(detail::concat(file, ":", line, ": ", expr, " failed on cuda device ", dev, ": ",
                             cublasGetStatusName(st), " (", cublasGetStatusString(st), ")"));
}

cublasHandle_t blas_handle(StreamRef s) {
  // First use on this stream: cublasCreate allocates (once per stream, not per op).
  return handles().get(s, [&] {
    cublasHandle_t h = nullptr;
    PIPAR_CUBLAS_CHECK(cublasCreate(&h));
    // FP32 results must match the CPU to 1e-4: keep TF32 tensor-op math off.
    const cublasStatus_t st1 = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
    const cublasStatus_t st2 = cublasSetStream(h, native(s));
    if (st1 != CUBLAS_STATUS_SUCCESS || st2 != CUBLAS_STATUS_SUCCESS) {
      cublasDestroy(h);
      PIPAR_CUBLAS_CHECK(st1 != CUBLAS_STATUS_SUCCESS ? st1 : st2);
    }
    return h;
  });
}

void release_blas_handle(StreamRef s) noexcept {
  handles().release(s, [](cublasHandle_t h) { cublasDestroy(h); });
}

}  // namespace pipar::kernels::cuda
