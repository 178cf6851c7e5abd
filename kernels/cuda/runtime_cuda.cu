// CUDA device discovery and memory for the runtime (host code; no kernels).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/runtime_cuda.h"

namespace pipar::kernels::cuda {

std::string unavailable_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear it: no driver or no device is not a sticky error
    return detail::concat("no usable CUDA device: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  }
  if (n == 0) return "no CUDA device found";
  return "";
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

namespace {
// The default pool returns freed memory to the OS at every synchronization unless told to keep it.
void keep_pool_memory() {
  static const bool done = [] {
    int dev = 0;
    PIPAR_CUDA_CHECK(cudaGetDevice(&dev));
    cudaMemPool_t pool;
    PIPAR_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
    uint64_t keep = UINT64_MAX;
    PIPAR_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return true;
  }();
  (void)done;
}
}  // namespace

void* malloc_device(size_t bytes, StreamRef s) {
  void* p = nullptr;
  if (s.is_null()) {
    PIPAR_CUDA_CHECK(cudaMalloc(&p, bytes == 0 ? 1 : bytes));
  } else {
    keep_pool_memory();
    PIPAR_CUDA_CHECK(cudaMallocAsync(&p, bytes == 0 ? 1 : bytes, native(s)));
  }
  return p;
}

void free_device(void* p, StreamRef s) noexcept {
  if (s.is_null()) cudaFree(p);  // frees pool memory too (after waiting for the device)
  else cudaFreeAsync(p, native(s));
}

void synchronize(StreamRef s) { PIPAR_CUDA_CHECK(cudaStreamSynchronize(native(s))); }

void* malloc_host_pinned(size_t bytes) {
  void* p = nullptr;
  PIPAR_CUDA_CHECK(cudaMallocHost(&p, bytes == 0 ? 1 : bytes));
  return p;
}

void free_host_pinned(void* p) noexcept { cudaFreeHost(p); }

void memcpy_async(void* dst, const void* src, size_t bytes, int kind, StreamRef s) {
  const cudaMemcpyKind k = kind == 0 ? cudaMemcpyHostToDevice : kind == 1 ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice;
  if (s.is_null()) {
    PIPAR_CUDA_CHECK(cudaMemcpy(dst, src, bytes, k));
  } else {
    PIPAR_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, k, native(s)));
  }
}

}  // namespace pipar::kernels::cuda
