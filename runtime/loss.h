// Training-step helpers shared by every mode: softmax cross-entropy with accuracy, and SGD over a
// list of parameters.
#pragma once
#include <vector>

#include "kernels/ops.h"
#include "runtime/layers.h"

namespace pipar {

struct LossStats {
  double loss_sum = 0;  // sum of per-sample losses
  int64_t correct = 0;  // samples whose arg-max logit is the label
  int64_t count = 0;
  LossStats& operator+=(const LossStats& o) {
    loss_sum += o.loss_sum, correct += o.correct, count += o.count;
    return *this;
  }
  double mean_loss() const { return count ? loss_sum / count : 0.0; }
  double accuracy() const { return count ? static_cast<double>(correct) / count : 0.0; }
};

// logits [n, k]; labels int32 [n] on the logits' device. With dlogits non-null, writes the gradient
// scale * (softmax - onehot): scale = 1/batch for a batch's mean loss, or a micro-batch's share of it.
LossStats softmax_cross_entropy(const Tensor& logits, const Tensor& labels, float scale, Tensor* dlogits,
                                StreamRef s = {});
// The same device work, queued on s without reading anything back: the per-sample losses [n] and the
// probabilities [n, k] into `losses` and `probs` (and the gradient into *dlogits), each allocated on the
// logits' device unless it already has the right shape (a CUDA graph's own buffers). loss_stats reads them.
void softmax_cross_entropy_queued(const Tensor& logits, const Tensor& labels, float scale, Tensor& losses, Tensor& probs,
                                  Tensor* dlogits, StreamRef s = {});
// The statistics of per-sample losses [n] and softmax probabilities [n, k] (what the forward kernel
// writes) against labels [n], on any device (read to the host).
LossStats loss_stats(const Tensor& losses, const Tensor& probs, const Tensor& labels);
// The same over host arrays (losses [rows], probs [rows, classes], labels [rows]), for `count` rows
// first, first+step, ...: one replica's rows of a stacked loss (runtime/replica_stack.h).
LossStats loss_stats_rows(const float* losses, const float* probs, const int32_t* labels, int64_t classes, int64_t first,
                          int64_t count, int64_t step);

// SGD with momentum (PyTorch semantics); weight decay only on params with decay == true.
class Sgd {
 public:
  explicit Sgd(kernels::SgdParams p) : p_(p) {}
  void step(const std::vector<Param*>& params, StreamRef s = {});
  static void zero_grad(const std::vector<Param*>& params);
  kernels::SgdParams& params() { return p_; }
  // The step's parameters for p: weight decay only where p.decay.
  kernels::SgdParams params_for(const Param& p) const {
    kernels::SgdParams q = p_;
    if (!p.decay) q.weight_decay = 0.0f;
    return q;
  }

 private:
  kernels::SgdParams p_;
};

}  // namespace pipar
