// The two halves of split training. A DevicePart runs blocks [0, P) of a model: forwards of several
// micro-batches back to back (one tape each), backwards as their gradients arrive, one optimizer
// step per batch. A ServerPart runs blocks [P, B) and the loss for one device: each micro-batch's
// loss is scaled by 1/batch (the whole batch's size), so the gradients accumulated over a batch's
// micro-batches equal the gradient of the batch's mean loss, and one step per batch is plain
// mini-batch SGD. With private labels (a U-shaped split) the server runs only the middle blocks
// [P, B-1) in a MiddlePart and the device keeps the last block and the loss (a ServerPart over block
// B-1, run on the device), so labels never leave it.
#pragma once
#include <map>
#include <memory>
#include <set>
#include <string>

#include "kernels/device.h"
#include "runtime/loss.h"
#include "runtime/model.h"

namespace pipar {

class DevicePart {
 public:
  DevicePart(Model& m, size_t split, kernels::SgdParams sgd);
  // Forward of micro-batch `micro` (an id unique among those in flight); returns the cut activation.
  Tensor forward(int micro, const Tensor& x);
  // Backward of micro-batch `micro` with the gradient of its cut activation; accumulates gradients.
  void backward(int micro, const Tensor& grad);
  void step();  // SGD step, then zero the gradients
  void set_lr(float lr) { opt_.params().lr = lr; }  // for the next step (learning-rate schedules)
  size_t in_flight() const { return tapes_.size(); }
  void reset() { tapes_.clear(); }  // drop micro-batches whose gradients will never come

 private:
  Model& m_;
  size_t split_;
  Sgd opt_;
  std::vector<Param*> params_;
  std::map<int, Tape> tapes_;
  Context ctx_;
};

// What a server-side part (ServerPart, MiddlePart) runs on: its device, its GPU (gpu >= 0 on a
// multi-GPU server; < 0 the current one) with a stream of its own created there, and the context of
// its passes (training, on that device and stream).
class PartDevice {
 public:
  PartDevice(Device device, int gpu);
  ~PartDevice();  // the stream goes on its GPU
  PartDevice(const PartDevice&) = delete;
  PartDevice& operator=(const PartDevice&) = delete;
  // For one call of the part: its GPU and stream are the thread's current ones.
  class Scope {
   public:
    explicit Scope(const PartDevice& d) : gpu_(d.gpu_), stream_(d.ctx.stream) {}

   private:
    kernels::ScopedCudaDevice gpu_;
    kernels::ScopedStream stream_;
  };
  void zero_grad(const std::vector<Param*>& params) const;          // on the stream; returns with it idle
  void step(Sgd& opt, const std::vector<Param*>& params) const;     // opt's step, then zero_grad
  void synchronize() const { stream_->synchronize(); }
  StreamRef stream() const { return ctx.stream; }

  Context ctx;

 private:
  int gpu_;
  std::unique_ptr<kernels::DeviceStream> stream_;
};

// On CUDA (the model already moved there with Model::to) a part owns a CUDA stream: its every kernel,
// allocation and copy is ordered on it, so that parts driven from different threads (server lanes,
// one replica per device) overlap on the GPU, their copies with each other's kernels. Inputs may be
// host tensors (they are copied in on the part's stream); what a part returns is on the host, and
// every method returns with the part's stream idle, so the caller may read or load the model's
// tensors from any thread afterwards. `gpu` >= 0 (a multi-GPU server): the GPU whose memory holds the
// model (moved there under kernels::ScopedCudaDevice(gpu)) and that runs all the part's work.
class ServerPart {
 public:
  ServerPart(Model& m, size_t split, kernels::SgdParams sgd, Device device = Device::kCpu, int gpu = -1);
  ~ServerPart();
  ServerPart(const ServerPart&) = delete;
  ServerPart& operator=(const ServerPart&) = delete;
  struct Result {
    Tensor grad;  // gradient of the cut activation, on the host
    LossStats stats;
  };
  // Forward, loss and backward of one micro-batch; batch_size is the whole batch's sample count.
  Result train_micro(const Tensor& activation, const Tensor& labels, int64_t batch_size);
  void step();
  void set_lr(float lr) { opt_.params().lr = lr; }  // for the next step (learning-rate schedules)
  Model& model() { return m_; }
  Device device() const { return dev_.ctx.device; }

  // CUDA graphs (CUDA only; off until set): a micro-batch's forward, loss and backward at a (size,
  // batch size) already trained once is captured into a graph and from then on replayed, one launch
  // instead of one per kernel, with the same arithmetic (tests: ServerPartCuda.Graphs*). The inputs
  // are copied into the graph's own buffers and the cut gradient and loss read out of them. A graph
  // is captured again when any tensor it uses has moved (loaded weights, a grown workspace). A part
  // with dropout (Layer::replayable) or whose capture fails runs uncaptured; graph_stats says why.
  void set_graphs(bool on);
  struct GraphStats {
    int64_t captures = 0, replays = 0;
    std::string off_reason;  // why graphs are off although asked for ("" while they are on)
  };
  const GraphStats& graph_stats() const { return gstats_; }

 private:
  struct Graphed {  // one (micro-batch size, batch size)
    kernels::DeviceGraph graph;
    Tensor x, y;                 // inputs, copied in before each replay
    Tensor grad, losses, probs;  // outputs, read after it
  };
  using GraphKey = std::pair<int64_t, int64_t>;
  // Forward, loss and backward on the part's device; returns the cut gradient (on the device). The
  // loss's outputs go into losses and probs (allocated unless they fit: a graph's buffers).
  Tensor forward_backward(const Tensor& x, const Tensor& y, float scale, Tensor& losses, Tensor& probs);
  Result train_eager(const Tensor& activation, const Tensor& labels, int64_t batch_size);
  void replay(Graphed& g, const Tensor& activation, const Tensor& labels);  // inputs copied in, graph queued
  void capture(Graphed& g, const Tensor& activation, const Tensor& labels, int64_t batch_size);
  std::vector<const void*> graph_addresses() const;

  Model& m_;
  size_t split_;
  Sgd opt_;
  std::vector<Param*> params_;
  PartDevice dev_;
  bool graphs_ = false;
  std::map<GraphKey, Graphed> graphed_;
  std::set<GraphKey> seen_;                  // trained once uncaptured (choices timed, workspace grown)
  std::vector<const void*> graph_addresses_;  // what the graphs in graphed_ were captured against
  std::vector<const Tensor*> graph_buffers_;  // the part's batch-norm statistics (their tensors may move)
  GraphStats gstats_;
};

// The server's part of a U-shaped split: blocks [begin, end) without the loss. Each forward keeps its
// tape under `key` until the device returns the gradient of the part's output (after its tail's loss).
// On CUDA as a ServerPart: its own stream, host tensors in and out.
class MiddlePart {
 public:
  MiddlePart(Model& m, size_t begin, size_t end, kernels::SgdParams sgd, Device device = Device::kCpu, int gpu = -1);
  ~MiddlePart();
  MiddlePart(const MiddlePart&) = delete;
  MiddlePart& operator=(const MiddlePart&) = delete;
  Tensor forward(int64_t key, const Tensor& x);  // the middle output; throws if key is in flight
  // Backward of the forward under `key` with the gradient of its output (shape as pending(key));
  // accumulates gradients, returns the gradient of the cut activation.
  Tensor backward(int64_t key, const Tensor& grad);
  const Shape4* pending(int64_t key) const;  // output shape of the forward in flight under key, or null
  void step();
  void set_lr(float lr) { opt_.params().lr = lr; }
  void reset();  // drop forwards whose gradients will never come

 private:
  struct InFlight {
    Tape tape;
    Shape4 out;
  };
  Model& m_;
  size_t begin_, end_;
  Sgd opt_;
  std::vector<Param*> params_;
  std::map<int64_t, InFlight> tapes_;
  PartDevice dev_;
};

// Validates a split point for private labels: the device keeps the last block, so 1 <= p <= blocks-2
// (the server needs at least one block); else a pipar::Error naming the model's block count.
void check_private_split(const Model& m, size_t p);

// Micro-batch sizes for a batch of n samples in k micro-batches: as even as possible (sizes differ by
// at most one), no sample dropped; k is capped at n.
std::vector<int64_t> micro_batch_sizes(int64_t n, int k);

}  // namespace pipar
