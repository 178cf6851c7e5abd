// Device memory and discovery behind one host-only interface (no CUDA header): the runtime allocates
// and copies tensors through these, on CPU or CUDA alike.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/stream_ref.h"
#include "kernels/tensor_view.h"

namespace pipar::kernels {

bool cuda_built();                     // the CUDA runtime part was compiled in
bool cuda_ops_built();                 // ... and every op of ops.h has a CUDA implementation
std::string cuda_unavailable_reason(); // "" when a CUDA device is usable, else why not
inline bool cuda_available() { return cuda_unavailable_reason().empty(); }
int cuda_device_count();               // 0 where none is usable
int64_t cuda_memory_free();            // free memory of the GPU in use, bytes; -1 where none is usable
std::vector<std::string> cuda_devices();  // "GPU 0: name, memory, compute capability" per usable GPU
std::string nccl_version();               // "2.27.3", or "" where NCCL is not built

// The CUDA backend's choice of implementation for conv and linear layers (kernels/cuda/autotune.h):
// "handwritten" (ours), "vendor" (cuDNN, cuBLAS) or "auto" (the fastest per layer shape, timed once
// and cached on disk). Another value throws pipar::Error; a build without CUDA checks and ignores it.
void set_cuda_kernels(const std::string& choice);
std::string cuda_kernels();
// The autotuner's cache file ("" = memory only) and its entries for the GPU in use, "what -> impl ms"
// (empty without a usable GPU).
std::string cuda_kernel_cache_path();
std::vector<std::string> cuda_kernel_choices();

// --- the GPUs of this process ---------------------------------------------------------------------
// The GPU this thread's CUDA work goes to (cudaSetDevice) while the scope lasts: its allocations,
// streams and kernels. A multi-GPU server runs each replica's work under its GPU's scope. gpu < 0:
// nothing changes (any build). Throws pipar::Error where the GPU does not exist or CUDA is not built.
class ScopedCudaDevice {
 public:
  explicit ScopedCudaDevice(int gpu);
  ~ScopedCudaDevice();
  ScopedCudaDevice(const ScopedCudaDevice&) = delete;
  ScopedCudaDevice& operator=(const ScopedCudaDevice&) = delete;

 private:
  int prev_ = -1;
};

// "" where NCCL is built in and a GPU is usable, else why not.
std::string nccl_unavailable_reason();
// One NCCL communicator over some GPUs of this process (ncclCommInitAll: one rank per GPU, driven
// from one thread), for the multi-GPU server's averaging; the same code for one GPU (a communicator
// of size one) and many. Throws pipar::Error (naming nccl_unavailable_reason) where NCCL cannot run.
class GpuGroup {
 public:
  explicit GpuGroup(std::vector<int> gpus);
  ~GpuGroup();
  GpuGroup(const GpuGroup&) = delete;
  GpuGroup& operator=(const GpuGroup&) = delete;
  const std::vector<int>& gpus() const { return gpus_; }
  int size() const { return static_cast<int>(gpus_.size()); }
  // In place, bufs[r] (on gpus()[r], all of one length) becomes the sum over the ranks; rank r's
  // part ordered on streams[r] (queued, not waited for).
  void all_reduce_sum(const std::vector<View>& bufs, const std::vector<StreamRef>& streams);

 private:
  std::vector<int> gpus_;
  void* comms_ = nullptr;
};

// --- the thread's current stream --------------------------------------------------------------------
// The CUDA stream that this thread's runtime work is ordered on (the trainer's; later a server lane's).
// While one is set: CUDA memory comes from the device's stream-ordered pool (cudaMallocAsync and
// cudaFreeAsync on it; freed blocks stay cached for reuse, so a training loop never calls cudaMalloc),
// and a device_copy given no stream runs on it and returns once complete, so that a host read sees
// every kernel queued before it. Unset (the default): cudaMalloc, cudaFree and synchronous copies.
StreamRef current_stream();
class ScopedStream {
 public:
  explicit ScopedStream(StreamRef s);
  ~ScopedStream();
  ScopedStream(const ScopedStream&) = delete;
  ScopedStream& operator=(const ScopedStream&) = delete;

 private:
  StreamRef prev_;
};

// A stream of the device's own, for code that includes no CUDA header (runtime/): a non-blocking
// CUDA stream on kCuda (throws pipar::Error where none is usable); nothing to create on kCpu (null).
class DeviceStream {
 public:
  explicit DeviceStream(Device d);
  ~DeviceStream();
  DeviceStream(const DeviceStream&) = delete;
  DeviceStream& operator=(const DeviceStream&) = delete;
  StreamRef ref() const { return s_; }
  void synchronize() const;  // host waits for all work queued on it (no-op on the CPU)

 private:
  StreamRef s_{};
};

// A CUDA graph: the work one callable queues on a stream, captured once and replayed by launch() at
// the cost of one launch instead of one per kernel (small micro-batches are launch-bound). The
// callable runs with `s` as the thread's current stream, so the tensors it allocates and frees become
// the graph's own memory, allocated and freed again at every replay. It must not read results on the
// host nor synchronize, and it must have run once uncaptured at the same shapes (kernel choices
// timed, workspaces grown). The graph holds raw addresses: every tensor it reads or writes that
// lives outside it must stay where it was (see stream_workspace_id). Without CUDA: capture throws.
class DeviceGraph {
 public:
  DeviceGraph() = default;
  ~DeviceGraph();
  DeviceGraph(DeviceGraph&& o) noexcept : exec_(o.exec_) { o.exec_ = nullptr; }
  DeviceGraph& operator=(DeviceGraph&& o) noexcept;
  DeviceGraph(const DeviceGraph&) = delete;
  DeviceGraph& operator=(const DeviceGraph&) = delete;

  // Throws pipar::Error naming why where the work cannot be captured (the stream stays usable).
  void capture(StreamRef s, const std::function<void()>& fn);
  void launch(StreamRef s) const;  // queues one replay on s

 private:
  void* exec_ = nullptr;
};
// The identity of stream s's scratch workspace, which the CUDA ops share and which moves when it
// grows: a graph captured on s is valid only while this is unchanged (null on the CPU).
const void* stream_workspace_id(StreamRef s);

// 64-byte aligned host memory, or device memory on CUDA (stream-ordered on the current stream, if
// any). Throws pipar::Error on failure.
void* device_alloc(Device d, size_t bytes);
// `alloc_stream`: the current stream when p was allocated. CUDA memory is freed stream-ordered when
// that stream is still this thread's current one, else with cudaFree (which waits for the device).
void device_free(Device d, void* p, StreamRef alloc_stream = {}) noexcept;
// Page-locked host memory (cudaMallocHost) where a CUDA device is usable, so that buffers crossing to
// the GPU every batch copy at full speed; elsewhere 64-byte aligned memory. *pinned says which, and
// pinned_free must be told the same.
void* pinned_alloc(size_t bytes, bool* pinned);
void pinned_free(void* p, bool pinned) noexcept;
// Copy between any two devices. With a null stream the copy is complete on return (ordered after the
// current stream's work, if one is set).
void device_copy(Device dst_dev, void* dst, Device src_dev, const void* src, size_t bytes, StreamRef s = {});

}  // namespace pipar::kernels
