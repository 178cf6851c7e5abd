// Federated averaging: the state of a model range (parameter values, then buffers such as batch-norm
// running statistics, in model order) copied out, averaged with sample-count weights, loaded back.
#pragma once
#include <vector>

#include "kernels/device.h"
#include "runtime/model.h"

namespace pipar {

// Pointers to the state tensors of blocks [begin, end): parameter values, then buffers.
std::vector<Tensor*> state_tensors(Model& m, size_t begin = 0, size_t end = Model::kEnd);
// Host copies of that state.
std::vector<Tensor> copy_state(Model& m, size_t begin = 0, size_t end = Model::kEnd);
// Loads a state (shapes checked: a mismatch throws ShapeError naming the tensor) onto the model's device.
void load_state(Model& m, const std::vector<Tensor>& state, size_t begin = 0, size_t end = Model::kEnd);
// sum_k weights[k] * states[k][i] / sum_k weights[k], in double precision, for every tensor i.
// Throws if the states disagree in count or shapes, or the weights do not sum to a positive value.
std::vector<Tensor> fedavg(const std::vector<std::vector<Tensor>>& states, const std::vector<double>& weights);

// FedAvg on the GPUs (a multi-GPU server, issue 8): replicas[r] are the states (as state_tensors
// gives them, all of one layout) of the replicas on group.gpus()[r], weights[r][k] the sample count of
// replicas[r][k]. Each GPU sums its replicas' state weighted by weight / total (single precision, one
// replica after another), an NCCL all-reduce sums those sums over the GPUs, and every replica (those
// of weight 0 too: devices that missed the round) gets the average in place. Equals fedavg up to float
// rounding. Throws pipar::Error on a layout mismatch, weights that do not sum to a positive value, or
// where NCCL cannot run.
void fedavg_on_gpus(kernels::GpuGroup& group, const std::vector<std::vector<std::vector<Tensor*>>>& replicas,
                    const std::vector<std::vector<double>>& weights);

// fedavg one state at a time, so that the K states need not all be held at once (a server with many
// devices): the same sums in the same order, given the weights' total up front. Memory: one double
// per averaged value.
class FedAvg {
 public:
  explicit FedAvg(double total_weight);  // throws unless positive
  void add(const std::vector<Tensor>& state, double weight);  // throws on a count or shape mismatch
  std::vector<Tensor> result() const;   // throws if nothing was added
  size_t added() const { return added_; }

 private:
  double total_;
  size_t added_ = 0;
  std::vector<Shape4> shapes_;
  std::vector<std::vector<double>> acc_;
};

}  // namespace pipar
