// Host-side CUDA runtime helpers (device discovery, memory), called from dispatch.cpp only.
#pragma once
#include <cstddef>
#include <string>

#include "kernels/stream_ref.h"

namespace pipar::kernels::cuda {

std::string unavailable_reason();
int device_count();
void* malloc_device(size_t bytes);
void free_device(void* p) noexcept;
// kind: 0 host→device, 1 device→host, 2 device→device.
void memcpy_async(void* dst, const void* src, size_t bytes, int kind, StreamRef s);

}  // namespace pipar::kernels::cuda
