// Owning Stream and Event, and the per-stream workspace (host code only; no kernels).
// Verified on an H200 (OpsCuda.StreamAndEventBasics, OpsCuda.TwoStreamsMatchOneStream, memcheck in .ci/gpu).
#include "kernels/cuda/stream.h"

#include <mutex>
#include <unordered_map>

#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cudnn_conv.h"

namespace pipar::kernels::cuda {

// --- Stream ---------------------------------------------------------------------------------------

Stream::Stream() {
  cudaStream_t s = nullptr;
  PIPAR_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  native_ = s;
}

Stream::~Stream() {
  if (!native_) return;
  release_stream_resources(ref());
  cudaStreamDestroy(native_);  // errors ignored: destructors do not throw
}

Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    Stream old(std::move(*this));  // destroys the current stream at scope end
    native_ = o.native_;
    o.native_ = nullptr;
  }
  return *this;
}

Stream Stream::from_native(CUstream_st* s) { return Stream(Adopt{}, s); }

CUstream_st* Stream::release() {
  CUstream_st* s = native_;
  native_ = nullptr;
  return s;
}

void Stream::synchronize() const { PIPAR_CUDA_CHECK(cudaStreamSynchronize(native_)); }

void Stream::wait(const Event& e) const { PIPAR_CUDA_CHECK(cudaStreamWaitEvent(native_, e.native(), 0)); }

// --- Event ----------------------------------------------------------------------------------------

Event::Event(Kind kind) {
  cudaEvent_t e = nullptr;
  PIPAR_CUDA_CHECK(cudaEventCreateWithFlags(&e, kind == Kind::kTiming ? cudaEventDefault : cudaEventDisableTiming));
  native_ = e;
}

Event::~Event() {
  if (native_) cudaEventDestroy(native_);
}

Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    if (native_) cudaEventDestroy(native_);
    native_ = o.native_;
    o.native_ = nullptr;
  }
  return *this;
}

void Event::record(StreamRef s) {
  PIPAR_CHECK(!s.is_null(), "Event::record needs an explicit stream");
  PIPAR_CUDA_CHECK(cudaEventRecord(native_, cuda::native(s)));
}

void Event::synchronize() const { PIPAR_CUDA_CHECK(cudaEventSynchronize(native_)); }

bool Event::query() const {
  const cudaError_t e = cudaEventQuery(native_);
  if (e == cudaErrorNotReady) return false;
  PIPAR_CUDA_CHECK(e);
  return true;
}

float Event::elapsed_ms(const Event& start, const Event& stop) {
  float ms = 0.0f;
  PIPAR_CUDA_CHECK(cudaEventElapsedTime(&ms, start.native_, stop.native_));
  return ms;
}

// --- workspace ------------------------------------------------------------------------------------

namespace {

struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
};

std::mutex& workspace_mutex() {
  static std::mutex m;
  return m;
}
// Leaked on purpose: freeing device memory during static destruction, after the driver may have
// shut down, is an error.
std::unordered_map<CUstream_st*, Workspace>& workspaces() {
  static auto* w = new std::unordered_map<CUstream_st*, Workspace>();
  return *w;
}

}  // namespace

void* stream_workspace(StreamRef s, size_t bytes) {
  PIPAR_CHECK(!s.is_null(), "CUDA ops need an explicit stream (the workspace is per stream)");
  std::lock_guard<std::mutex> lock(workspace_mutex());
  Workspace& ws = workspaces()[s.native];
  if (ws.bytes >= bytes && ws.ptr) return ws.ptr;
  // Growing would free the block graphs captured earlier on s use, and make the new one the graph's
  // own: refused while s is capturing (the capture then fails and the work runs uncaptured; a graph
  // is captured only after the same work ran once uncaptured, which grew the workspace already).
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  PIPAR_CUDA_CHECK(cudaStreamIsCapturing(native(s), &capturing));
  if (capturing != cudaStreamCaptureStatusNone)
    throw Error(detail::concat("the stream's workspace would grow from ", ws.bytes, " to ", bytes, " bytes during a CUDA graph capture"));
  // Grow by at least 1.5x so that slowly growing requests do not reallocate every call; 256-byte
  // granularity keeps every carved sub-buffer aligned.
  size_t want = bytes < 256 ? 256 : (bytes + 255) / 256 * 256;
  if (want < ws.bytes + ws.bytes / 2) want = (ws.bytes + ws.bytes / 2 + 255) / 256 * 256;
  if (ws.ptr) {
    // Stream-ordered: the block is freed only after the work already queued on s has used it.
    PIPAR_CUDA_CHECK(cudaFreeAsync(ws.ptr, native(s)));
    ws.ptr = nullptr;
    ws.bytes = 0;
  }
  void* p = nullptr;
  PIPAR_CUDA_CHECK(cudaMallocAsync(&p, want, native(s)));
  ws.ptr = p;
  ws.bytes = want;
  return p;
}

const void* workspace_id(StreamRef s) {
  std::lock_guard<std::mutex> lock(workspace_mutex());
  auto it = workspaces().find(s.native);
  return it == workspaces().end() ? nullptr : it->second.ptr;
}

void release_stream_resources(StreamRef s) noexcept {
  if (s.is_null()) return;
  {
    std::lock_guard<std::mutex> lock(workspace_mutex());
    auto it = workspaces().find(s.native);
    if (it != workspaces().end()) {
      if (it->second.ptr) cudaFreeAsync(it->second.ptr, native(s));
      workspaces().erase(it);
    }
  }
  release_blas_handle(s);
  release_cudnn_handle(s);
}

}  // namespace pipar::kernels::cuda
