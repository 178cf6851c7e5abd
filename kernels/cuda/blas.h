// cuBLAS handles, one per stream (ggml's per-[device][stream] idea), created on first use, bound to
// the stream and set to FP32 math (CUBLAS_DEFAULT_MATH: no TF32), plus PIPAR_CUBLAS_CHECK.
#pragma once
#include <cublas_v2.h>

#include "kernels/error.h"
#include "kernels/stream_ref.h"

namespace pipar::kernels::cuda {

[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line);

// The cached handle of stream s (thread-safe; a handle is used only for its stream's work).
cublasHandle_t blas_handle(StreamRef s);
// Destroys s's handle if one exists (called when the stream is destroyed).
void release_blas_handle(StreamRef s) noexcept;

}  // namespace pipar::kernels::cuda

#define PIPAR_CUBLAS_CHECK(expr)                                                                   \
  do {                                                                                             \
    cublasStatus_t pipar_st_ = (expr);                                                             \
    if (pipar_st_ != CUBLAS_STATUS_SUCCESS)                                                        \
      ::pipar::kernels::cuda::throw_cublas_error(pipar_st_, #expr, __FILE__, __LINE__);            \
  } while (0)
