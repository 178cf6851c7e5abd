// Shared CUDA helpers: error checks that name the call, the file and the CUDA message.
#pragma once
#include <cuda_runtime.h>

#include "kernels/error.h"
#include "kernels/stream_ref.h"

namespace pipar::kernels::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const char* expr, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  throw Error(detail::concat(file, ":", line, ": ", expr, " failed on cuda device ", dev, ": ",
                             cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

inline cudaStream_t native(::pipar::StreamRef s) { return reinterpret_cast<cudaStream_t>(s.native); }

}  // namespace pipar::kernels::cuda

#define PIPAR_CUDA_CHECK(expr)                                                                     \
  do {                                                                                             \
    cudaError_t pipar_err_ = (expr);                                                               \
    if (pipar_err_ != cudaSuccess) ::pipar::kernels::cuda::throw_cuda_error(pipar_err_, #expr, __FILE__, __LINE__); \
  } while (0)
