// NCCL for the multi-GPU server (kernels/device.h GpuGroup): one communicator per GPU of this process,
// built with ncclCommInitAll, and an in-place sum all-reduce over float buffers, one per GPU, each
// ordered on its own stream. Compiled only where NCCL was found (PIPAR_HAS_NCCL).
// Verified on an H200 with one rank (NcclCuda.FedAvgOnGpusEqualsTheHostAverage); more ranks need more GPUs.
#if PIPAR_HAS_NCCL
#include <nccl.h>

#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/runtime_cuda.h"

namespace pipar::kernels::cuda {

namespace {
[[noreturn]] void throw_nccl(ncclResult_t r, const char* what) {
  throw Error(detail::concat("NCCL ", what, " failed: ", ncclGetErrorString(r)));
}
#define PIPAR_NCCL_CHECK(expr)                          \
  do {                                                  \
    const ncclResult_t pipar_r_ = (expr);               \
    if (pipar_r_ != ncclSuccess) throw_nccl(pipar_r_, #expr); \
  } while (0)

struct Comms {
  std::vector<ncclComm_t> comms;
};
}  // namespace

std::string nccl_version() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  return detail::concat(v / 10000, ".", (v / 100) % 100, ".", v % 100);
}

void* nccl_init_all(const std::vector<int>& gpus) {
  auto c = std::make_unique<Comms>();
  c->comms.resize(gpus.size());
  PIPAR_NCCL_CHECK(ncclCommInitAll(c->comms.data(), static_cast<int>(gpus.size()), gpus.data()));
  return c.release();
}

void nccl_destroy(void* comms) noexcept {
  auto* c = static_cast<Comms*>(comms);
  if (!c) return;
  for (ncclComm_t m : c->comms) ncclCommDestroy(m);
  delete c;
}

void nccl_all_reduce_sum(void* comms, const std::vector<int>& gpus, const std::vector<float*>& bufs, size_t count,
                         const std::vector<StreamRef>& streams) {
  auto* c = static_cast<Comms*>(comms);
  PIPAR_CHECK(c && bufs.size() == c->comms.size() && streams.size() == bufs.size() && gpus.size() == bufs.size(),
              "NCCL all-reduce: ", bufs.size(), " buffers and ", streams.size(), " streams for ", c ? c->comms.size() : 0, " ranks");
  int saved = 0;
  PIPAR_CUDA_CHECK(cudaGetDevice(&saved));
  // One thread drives every rank: the calls are grouped, else the first would wait for the others.
  PIPAR_NCCL_CHECK(ncclGroupStart());
  ncclResult_t r = ncclSuccess;
  for (size_t i = 0; i < bufs.size() && r == ncclSuccess; ++i) {
    cudaSetDevice(gpus[i]);
    r = ncclAllReduce(bufs[i], bufs[i], count, ncclFloat, ncclSum, c->comms[i], native(streams[i]));
  }
  const ncclResult_t end = ncclGroupEnd();
  cudaSetDevice(saved);
  if (r != ncclSuccess) throw_nccl(r, "ncclAllReduce");
  if (end != ncclSuccess) throw_nccl(end, "ncclGroupEnd");
}

}  // namespace pipar::kernels::cuda
#endif
