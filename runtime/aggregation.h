// Federated averaging: the state of a model range (parameter values, then buffers such as batch-norm
// running statistics, in model order) copied out, averaged with sample-count weights, loaded back.
#pragma once
#include <vector>

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

}  // namespace pipar
