// Host-side CUDA runtime helpers (device discovery, memory), called from dispatch.cpp only.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/stream_ref.h"

namespace pipar::kernels::cuda {

std::string unavailable_reason();
int device_count();
int64_t memory_free();  // cudaMemGetInfo's free bytes on the current device; -1 where it fails
int current_device();   // cudaGetDevice, checked
// "GPU 0: NVIDIA H200, 139.8 GiB, compute 9.0" per usable device.
std::vector<std::string> describe_devices();
void set_device(int gpu);  // cudaSetDevice, checked
// NCCL (kernels/cuda/nccl.cpp; defined only where PIPAR_HAS_NCCL): a communicator per GPU of gpus
// (ncclCommInitAll), destroyed with nccl_destroy; an in-place float sum all-reduce of bufs[i] (count
// floats on gpus[i]) on streams[i], the ranks' calls grouped.
std::string nccl_version();
void* nccl_init_all(const std::vector<int>& gpus);
void nccl_destroy(void* comms) noexcept;
void nccl_all_reduce_sum(void* comms, const std::vector<int>& gpus, const std::vector<float*>& bufs, size_t count,
                         const std::vector<StreamRef>& streams);
// With a stream: from the device's default memory pool, stream-ordered (the pool keeps freed memory
// cached: its release threshold is raised once to "never"). Without: cudaMalloc / cudaFree.
void* malloc_device(size_t bytes, StreamRef s);
void free_device(void* p, StreamRef s) noexcept;
// kind: 0 host→device, 1 device→host, 2 device→device. A null s: complete on return (cudaMemcpy, then
// the legacy stream synchronized).
void memcpy_async(void* dst, const void* src, size_t bytes, int kind, StreamRef s);
void synchronize(StreamRef s);  // cudaStreamSynchronize, checked
// CUDA graphs (kernels/device.h DeviceGraph): captures what fn queues on s (thread-local capture
// mode) and instantiates it; returns the cudaGraphExec_t. Where fn throws or the capture fails, the
// capture is ended and discarded (s usable again) and pipar::Error names why.
void* graph_capture(StreamRef s, const std::function<void()>& fn);
void graph_launch(void* exec, StreamRef s);
void graph_destroy(void* exec) noexcept;
void* malloc_host_pinned(size_t bytes);   // cudaMallocHost, checked
void free_host_pinned(void* p) noexcept;  // cudaFreeHost

// Device scratch for the autotuner's trial runs of an accumulating pass (they must not add into the
// real gradient): allocated from the pool on the first get(), freed stream-ordered with the object.
class TrialScratch {
 public:
  explicit TrialScratch(StreamRef s) : s_(s) {}
  ~TrialScratch() {
    if (p_) free_device(p_, s_);
  }
  TrialScratch(const TrialScratch&) = delete;
  TrialScratch& operator=(const TrialScratch&) = delete;
  float* get(int64_t floats) {
    if (!p_) p_ = static_cast<float*>(malloc_device(sizeof(float) * static_cast<size_t>(floats), s_));
    return p_;
  }

 private:
  StreamRef s_;
  float* p_ = nullptr;
};

}  // namespace pipar::kernels::cuda
