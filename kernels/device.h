// Device memory and discovery behind one host-only interface (no CUDA header): the runtime allocates
// and copies tensors through these, on CPU or CUDA alike.
#pragma once
#include <cstddef>
#include <string>

#include "kernels/stream_ref.h"
#include "kernels/tensor_view.h"

namespace pipar::kernels {

bool cuda_built();                     // the CUDA runtime part was compiled in
bool cuda_ops_built();                 // ... and every op of ops.h has a CUDA implementation
std::string cuda_unavailable_reason(); // "" when a CUDA device is usable, else why not
inline bool cuda_available() { return cuda_unavailable_reason().empty(); }
int cuda_device_count();               // 0 where none is usable

// 64-byte aligned host memory, or device memory on CUDA. Throws pipar::Error on failure.
void* device_alloc(Device d, size_t bytes);
void device_free(Device d, void* p) noexcept;
// Copy between any two devices. With a null stream the copy is complete on return.
void device_copy(Device dst_dev, void* dst, Device src_dev, const void* src, size_t bytes, StreamRef s = {});

}  // namespace pipar::kernels
