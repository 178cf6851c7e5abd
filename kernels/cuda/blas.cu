// cuBLAS handle cache (one handle per stream) and cuBLAS error reporting. Host code only.
// NOT verified on a GPU (written on a machine without one): handle creation and the FP32 math mode.
#include <mutex>
#include <unordered_map>

#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.cuh"

namespace pipar::kernels::cuda {
namespace {

std::mutex& handle_mutex() {
  static std::mutex m;
  return m;
}
// Leaked on purpose (no cublasDestroy during static destruction, after the driver may be gone).
std::unordered_map<CUstream_st*, cublasHandle_t>& handles() {
  static auto* h = new std::unordered_map<CUstream_st*, cublasHandle_t>();
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
  PIPAR_CHECK(!s.is_null(), "cuBLAS calls need an explicit stream");
  std::lock_guard<std::mutex> lock(handle_mutex());
  auto it = handles().find(s.native);
  if (it != handles().end()) return it->second;
  // First use on this stream: cublasCreate allocates (once per stream, not per op).
  cublasHandle_t h = nullptr;
  PIPAR_CUBLAS_CHECK(cublasCreate(&h));
  // FP32 results must match the CPU to 1e-4: keep TF32 tensor-op math off.
  const cublasStatus_t st1 = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
  const cublasStatus_t st2 = cublasSetStream(h, native(s));
  if (st1 != CUBLAS_STATUS_SUCCESS || st2 != CUBLAS_STATUS_SUCCESS) {
    cublasDestroy(h);
    PIPAR_CUBLAS_CHECK(st1 != CUBLAS_STATUS_SUCCESS ? st1 : st2);
  }
  handles().emplace(s.native, h);
  return h;
}

void release_blas_handle(StreamRef s) noexcept {
  cublasHandle_t h = nullptr;
  {
    std::lock_guard<std::mutex> lock(handle_mutex());
    auto it = handles().find(s.native);
    if (it == handles().end()) return;
    h = it->second;
    handles().erase(it);
  }
  cublasDestroy(h);
}

}  // namespace pipar::kernels::cuda
