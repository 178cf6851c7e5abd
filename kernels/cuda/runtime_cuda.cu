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

void* graph_capture(StreamRef s, const std::function<void()>& fn) {
  PIPAR_CHECK(!s.is_null(), "a CUDA graph is captured from an explicit stream");
  cudaStream_t st = native(s);
  PIPAR_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  auto abandon = [&] {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(st, &g);  // ends it whatever its state; the partial graph is discarded
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();  // capture errors are not sticky; clear them for the eager work that follows
  };
  try {
    fn();
  } catch (const std::exception& e) {
    abandon();
    throw Error(std::string("CUDA graph capture: the work failed: ") + e.what());
  }
  cudaGraph_t g = nullptr;
  const cudaError_t end = cudaStreamEndCapture(st, &g);
  if (end != cudaSuccess || !g) {
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    throw Error(detail::concat("CUDA graph capture: cudaStreamEndCapture: ", cudaGetErrorName(end), " (",
                               cudaGetErrorString(end), "): the work did something a graph cannot hold"));
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, g, 0);
  cudaGraphDestroy(g);  // the executable graph keeps what it needs
  if (inst != cudaSuccess) {
    cudaGetLastError();
    throw Error(detail::concat("CUDA graph capture: cudaGraphInstantiate: ", cudaGetErrorName(inst), " (",
                               cudaGetErrorString(inst), ")"));
  }
  return exec;
}

void graph_launch(void* exec, StreamRef s) {
  PIPAR_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), native(s)));
}

void graph_destroy(void* exec) noexcept {
  if (exec) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec));
}

std::vector<std::string> describe_devices() {
  std::vector<std::string> out;
  for (int d = 0; d < device_count(); ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) {
      cudaGetLastError();
      out.push_back(detail::concat("GPU ", d, ": properties unavailable"));
      continue;
    }
    out.push_back(detail::concat("GPU ", d, ": ", prop.name, ", ", static_cast<double>(prop.totalGlobalMem) / (1 << 30),
                                 " GiB, compute ", prop.major, ".", prop.minor));
  }
  return out;
}

int current_device() {
  int d = 0;
  PIPAR_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

void set_device(int gpu) { PIPAR_CUDA_CHECK(cudaSetDevice(gpu)); }

int64_t memory_free() {
  size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return static_cast<int64_t>(free_bytes);
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
    // cudaMemcpy may return before a device-to-device copy (or the DMA of a pageable host-to-device
    // one) is done, and the runtime's streams are non-blocking: they would not wait for the legacy
    // stream. Complete on return, as promised.
    if (k != cudaMemcpyDeviceToHost) PIPAR_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  } else {
    PIPAR_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, k, native(s)));
  }
}

}  // namespace pipar::kernels::cuda
