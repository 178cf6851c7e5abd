// Per-layer choice of the implementation of a conv or linear pass on CUDA (host-only header).
// For each pass and layer shape the autotuner times the allowed implementations once (our
// hand-written GEMM on im2col, cuBLAS on the same im2col, every cuDNN algorithm that accepts the
// shape) with CUDA events on the op's stream, keeps the fastest in memory, and records it in the
// on-disk KernelCache under a key that names the GPU and the CUDA, cuBLAS and cuDNN versions, so
// that later runs skip the timing. Verified on an H200 (OpsCuda.VendorAndAutoKernelsMatchCpu).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/ops_cuda.h"
#include "kernels/stream_ref.h"

namespace pipar::kernels::cuda {

struct Impl {
  enum Kind { kHandwritten, kCublas, kCudnn };
  Kind kind = kHandwritten;
  int algo = -1;  // kCudnn: the cuDNN algorithm (cudnnConvolution*Algo_t)
  std::string str() const;  // "handwritten", "cublas", "cudnn:3"
  static bool parse(const std::string& s, Impl* out);
  bool vendor() const { return kind != kHandwritten; }
};

// Which implementations a pass may use (process-wide, thread-safe):
//   kHandwritten  our kernels, through the GEMM backend set_gemm_backend names (the behaviour before
//                 the autotuner; tests of one GEMM backend use it)
//   kVendor       cuDNN for convolutions (its fastest algorithm for the shape; cuBLAS on im2col where
//                 the build has no cuDNN), cuBLAS for linear layers
//   kAuto         the fastest of all, per shape and pass
// Initial value: the environment variable PIPAR_KERNELS (handwritten, vendor or auto), else auto.
enum class KernelChoice { kHandwritten, kVendor, kAuto };
void set_kernel_choice(KernelChoice c);
KernelChoice kernel_choice();
const char* kernel_choice_name(KernelChoice c);
bool parse_kernel_choice(const std::string& s, KernelChoice* out);

// The implementation for `what` (the pass and shape, e.g. "conv.fwd|x=10,64,7,7|w=64,64,3,3|..."),
// among `candidates()` (every implementation able to run it, asked for only on the first call of a
// shape; those kernel_choice() excludes are skipped). `run(impl)` enqueues the pass with that
// implementation on s into buffers it may overwrite. The first call for a key not in the on-disk
// cache times each allowed candidate (a candidate that throws is left out) and synchronizes s; later
// calls are a lookup in memory.
Impl choose(const std::string& what, const std::function<std::vector<Impl>()>& candidates,
            const std::function<void(const Impl&)>& run, StreamRef s);

// Forgets this process's choices and reads the cache from `path` ("" = memory only) from now on: for
// tests and benchmarks that need a known cache (the default is KernelCache::default_path()).
void reset_tuner(const std::string& path);

// Runs f (a pass through gemm()) under impl's GEMM: cuBLAS or ours for this call, whatever the
// process-wide backend; kernel_choice() == kHandwritten leaves that backend in charge (the behaviour
// before the autotuner, and how the tests pick one GEMM backend).
template <class F>
void with_gemm(const Impl& impl, F&& f) {
  if (kernel_choice() == KernelChoice::kHandwritten) return f();
  ScopedGemmBackend guard(impl.kind == Impl::kCublas ? GemmBackend::kCublas : GemmBackend::kHandwritten);
  f();
}

// This GPU's, these libraries' and our kernels' prefix of every key
// ("NVIDIA H200|sm90|cuda13000|cublas13.0.0|cudnn91900|ours2").
std::string device_key();
// The on-disk cache's file ("" = memory only) and its entries for this device_key(): "what → value".
std::string cache_path();
std::vector<std::string> cached_choices();

}  // namespace pipar::kernels::cuda
