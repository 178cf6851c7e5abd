// Grid-stride loop indices of the 1-D kernels, in a header without CUDA includes so that kernel
// headers the CPU tests run through the kernel emulation (tests/kernels/cuda_emulation.h) can use it.
#pragma once
#include <cstdint>

namespace pipar::kernels::cuda {

// Index of this thread in a 1-D grid-stride loop, and the stride (int64: sizes may exceed 2^31).
__device__ inline int64_t global_index() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ inline int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

}  // namespace pipar::kernels::cuda
