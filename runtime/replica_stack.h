// Cross-device batching by stacking: K server-side replicas of one model's part, blocks [P, B), run
// as ONE part whose every layer serves all K replicas in one call, so that a server with many devices
// that each send a small micro-batch launches one kernel per layer and pass instead of K.
//
// The layout (Layer::stacked): a micro-batch of n samples from each replica is one tensor [n, K*C, H,
// W], replica r's channels of sample s at [r*C, (r+1)*C); a convolution runs with K times the groups
// (replica r's channels only meet replica r's weights), a dense layer is a grouped GEMM (one batched
// GEMM over the replicas), batch norm normalizes K*C channels (each replica's statistics over its own
// samples), activations and pooling work per element or plane as before, and the loss runs over
// [n*K, classes] rows (replica r's rows r, K + r, ...). Each parameter and statistic of the stack is
// the K replicas' own stacked along its first dimension: replica r's copy is slice r.
//
// So a replica's results are its own part's results up to floating-point summation order (a grouped
// convolution may take another kernel than a plain one): tests/runtime/replica_stack_test.cpp.
//
// A group need not name every replica: the absent ones run on zeros, their loss gradient is masked to
// zero (so every gradient they accumulate is zero) and their batch-norm statistics are put back, so
// nothing of theirs changes. What a group cannot mix: micro-batches of different sizes (batch norm
// would see the padding), and layers whose stacked form differs (dropout, which Layer::stacked refuses).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "runtime/split.h"

namespace pipar {

// The most replicas the server puts in one stack (--server-batching stack); more devices make more
// stacks. The planner models the same.
inline constexpr int kServerStackMax = 64;

class ReplicaStack {
 public:
  // K = replicas copies of blocks [split, B) of a model like `like` (only its structure is read; the
  // replicas' weights come with load). On CUDA the stack lives on `gpu` (< 0: the current one) and runs
  // on a stream of its own; every method returns with it idle.
  ReplicaStack(const Model& like, size_t split, int replicas, kernels::SgdParams sgd, Device device = Device::kCpu,
               int gpu = -1);
  ~ReplicaStack();
  ReplicaStack(const ReplicaStack&) = delete;
  ReplicaStack& operator=(const ReplicaStack&) = delete;

  int replicas() const { return k_; }
  size_t split() const { return split_; }
  Device device() const { return dev_.ctx.device; }
  // Replica r's weights, gradients, momentum and batch-norm statistics from, or into, blocks [split, B)
  // of m: a model like `like`, on any device.
  void load(int r, Model& m);
  void store(int r, Model& m);

  struct Item {
    int replica = 0;
    Tensor activation;  // [n, C, H, W]: the cut activation of the replica's device, on any device
    Tensor labels;      // int32 [n]
  };
  // Forward, loss and backward of one micro-batch for each replica listed (distinct replicas, every
  // micro-batch n samples of a batch of batch_size), all in one pass; results (cut gradient on the
  // host, loss statistics) in the items' order. Gradients accumulate in the listed replicas' slices.
  std::vector<ServerPart::Result> train_micro(const std::vector<Item>& items, int64_t batch_size);
  // SGD step of the listed replicas (then their gradients are zeroed); all of them at once is one
  // update per parameter.
  void step(const std::vector<int>& replicas);
  void step(int r) { step(std::vector<int>{r}); }
  void set_lr(float lr) { opt_.params().lr = lr; }

  // Where a group's time goes (the server benchmark's breakdown): with profiling on, train_micro waits
  // for the device after each phase and after each block's forward and backward, and adds the wall
  // time of each here. Off by default: the waits forgo the overlap of host and device work. The
  // arithmetic is the same either way.
  struct Profile {
    int64_t groups = 0;
    double assemble = 0, upload = 0, loss = 0, download = 0;  // seconds, summed over the groups
    std::vector<std::string> blocks;                          // each block of the part, described
    std::vector<double> forward, backward;                    // seconds per block, summed
  };
  void set_profiling(bool on);
  const Profile& profile() const { return profile_; }

 private:
  void check_replica(int r, const char* who) const;
  void copy_replica(int r, Model& m, bool into_stack);  // load (into_stack) or store
  std::vector<std::pair<Tensor*, Tensor*>> slices_of(Model& m);  // (stack tensor, replica tensor) pairs

  // Host buffers a group is assembled in and its cut gradient comes back to (dx: on a GPU only), kept
  // from one group to the next for the last two micro-batch sizes seen (uneven micro-batches of a batch
  // take two sizes). Page-locked where a GPU is used: a page-locked allocation is one of CUDA's implicit
  // synchronization points (no stream's work overlaps it) and pins its pages one by one, so a group
  // should not pay for one, as it did when it allocated its 8 MB (VGG5, 64 replicas) each time.
  struct Staging {
    int64_t n = 0;
    Tensor x, y, mask, dx;
  };
  Staging& staging(int64_t n);

  int k_;
  size_t split_;
  Shape4 cut_;       // per-sample shape of a replica's cut activation
  int64_t classes_;  // logits per sample
  Sgd opt_;
  PartDevice dev_;
  std::unique_ptr<Sequential> body_;  // the stacked blocks [split, B)
  std::vector<Param*> params_;
  std::vector<Buffer> buffers_;
  bool profiling_ = false;
  Profile profile_;
  Staging staged_[2];  // [0]: the most recent size
};

}  // namespace pipar
