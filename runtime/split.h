// The two halves of split training. A DevicePart runs blocks [0, P) of a model: forwards of several
// micro-batches back to back (one tape each), backwards as their gradients arrive, one optimizer
// step per batch. A ServerPart runs blocks [P, B) and the loss for one device: each micro-batch's
// loss is scaled by 1/batch (the whole batch's size), so the gradients accumulated over a batch's
// micro-batches equal the gradient of the batch's mean loss, and one step per batch is plain
// mini-batch SGD.
#pragma once
#include <map>

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

class ServerPart {
 public:
  ServerPart(Model& m, size_t split, kernels::SgdParams sgd, Device device = Device::kCpu);
  struct Result {
    Tensor grad;  // gradient of the cut activation (on the server's device)
    LossStats stats;
  };
  // Forward, loss and backward of one micro-batch; batch_size is the whole batch's sample count.
  Result train_micro(const Tensor& activation, const Tensor& labels, int64_t batch_size);
  void step();
  void set_lr(float lr) { opt_.params().lr = lr; }  // for the next step (learning-rate schedules)
  Model& model() { return m_; }

 private:
  Model& m_;
  size_t split_;
  Sgd opt_;
  std::vector<Param*> params_;
  Context ctx_;
};

// Micro-batch sizes for a batch of n samples in k micro-batches: as even as possible (sizes differ by
// at most one), no sample dropped; k is capped at n.
std::vector<int64_t> micro_batch_sizes(int64_t n, int k);

}  // namespace pipar
