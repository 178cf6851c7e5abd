// Owning, move-only CUDA Stream and Event (CCCL's shape: owning type, non-owning StreamRef,
// from_native/release, destructors ignore errors), and the per-stream grow-only scratch workspace the
// ops use instead of cudaMalloc. Host-only header: CUDA types are forward-declared.
#pragma once
#include <cstddef>

#include "kernels/stream_ref.h"

struct CUevent_st;  // what cudaEvent_t points to

namespace pipar::kernels::cuda {

class Event;

// A cudaStreamNonBlocking stream on the current device (never the legacy default stream).
class Stream {
 public:
  Stream();  // throws pipar::Error (with the CUDA message) where no device is usable
  ~Stream();
  Stream(Stream&& o) noexcept : native_(o.native_) { o.native_ = nullptr; }
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  static Stream from_native(CUstream_st* s);  // adopts ownership
  CUstream_st* release();                     // gives ownership up (and the workspace stays)

  StreamRef ref() const { return StreamRef{native_}; }
  operator StreamRef() const { return ref(); }
  CUstream_st* native() const { return native_; }

  void synchronize() const;          // host blocks until all work queued so far is done
  void wait(const Event& e) const;   // GPU-side: later work waits for e (cudaStreamWaitEvent)

 private:
  struct Adopt {};
  Stream(Adopt, CUstream_st* s) : native_(s) {}
  CUstream_st* native_ = nullptr;
};

// kSync: cudaEventDisableTiming (cheap, for ordering); kTiming: can be used with elapsed_ms.
class Event {
 public:
  enum class Kind { kSync, kTiming };
  explicit Event(Kind kind = Kind::kSync);
  ~Event();
  Event(Event&& o) noexcept : native_(o.native_) { o.native_ = nullptr; }
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  CUevent_st* native() const { return native_; }
  void record(StreamRef s);
  void synchronize() const;   // host blocks until the recorded work is done
  bool query() const;         // true if done; never blocks
  // Milliseconds between two recorded timing events (both complete).
  static float elapsed_ms(const Event& start, const Event& stop);

 private:
  CUevent_st* native_ = nullptr;
};

// Scratch memory of at least `bytes` on stream s, valid for work enqueued on s until the next call for
// s (a later, larger request frees the old block stream-ordered with cudaFreeAsync and allocates a
// new one with cudaMallocAsync). One request per op: an op that needs several buffers carves them
// from one block. Thread-safe; never synchronizes.
void* stream_workspace(StreamRef s, size_t bytes);
// The block stream_workspace(s, ...) now returns (null: none yet); it moves when it grows.
const void* workspace_id(StreamRef s);
// Frees s's workspace (stream-ordered) and its cuBLAS handle; Stream's destructor calls it.
void release_stream_resources(StreamRef s) noexcept;

}  // namespace pipar::kernels::cuda
