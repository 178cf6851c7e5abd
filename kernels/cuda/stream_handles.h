// A library handle per CUDA stream (cuBLAS, cuDNN; ggml's per-[device][stream] idea), host-only: created
// on a stream's first use, bound to it, destroyed when the stream goes (release_stream_resources).
#pragma once
#include <mutex>
#include <unordered_map>

#include "kernels/error.h"
#include "kernels/stream_ref.h"

namespace pipar::kernels::cuda {

template <class Handle>
class StreamHandles {
 public:
  // s's handle; `create()` makes one (bound to s, or throwing) the first time. Thread-safe.
  template <class Create>
  Handle get(StreamRef s, Create&& create) {
    PIPAR_CHECK(!s.is_null(), "library calls need an explicit stream");
    std::lock_guard<std::mutex> lock(mu_);
    auto it = handles_.find(s.native);
    if (it != handles_.end()) return it->second;
    Handle h = create();
    handles_.emplace(s.native, h);
    return h;
  }
  // Takes s's handle out, if it has one, and passes it to destroy (outside the lock).
  template <class Destroy>
  void release(StreamRef s, Destroy&& destroy) noexcept {
    Handle h{};
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = handles_.find(s.native);
      if (it == handles_.end()) return;
      h = it->second;
      handles_.erase(it);
    }
    destroy(h);
  }

 private:
  std::mutex mu_;
  std::unordered_map<CUstream_st*, Handle> handles_;
};

}  // namespace pipar::kernels::cuda
