// Federated averaging of model state.
#include "runtime/aggregation.h"

namespace pipar {

std::vector<Tensor*> state_tensors(Model& m, size_t begin, size_t end) {
  std::vector<Tensor*> out;
  for (Param* p : m.params(begin, end)) out.push_back(&p->value);
  for (const Buffer& b : m.buffers(begin, end)) out.push_back(b.value);
  return out;
}

std::vector<Tensor> copy_state(Model& m, size_t begin, size_t end) {
  std::vector<Tensor> out;
  for (Tensor* t : state_tensors(m, begin, end)) out.push_back(t->to(Device::kCpu).clone());
  return out;
}

void load_state(Model& m, const std::vector<Tensor>& state, size_t begin, size_t end) {
  const std::vector<Tensor*> dst = state_tensors(m, begin, end);
  if (dst.size() != state.size())
    throw ShapeError(detail::concat("load_state: ", m.name(), " blocks [", begin, ", ", end == Model::kEnd ? m.num_blocks() : end,
                                    ") hold ", dst.size(), " tensors, got ", state.size()));
  for (size_t i = 0; i < dst.size(); ++i) {
    if (!(dst[i]->shape() == state[i].shape()))
      throw ShapeError(detail::concat("load_state: tensor ", i, " of ", m.name(), " is ", dst[i]->shape().str(), ", got ",
                                      state[i].shape().str()));
    *dst[i] = state[i].to(dst[i]->device()).clone();
  }
}

std::vector<Tensor> fedavg(const std::vector<std::vector<Tensor>>& states, const std::vector<double>& weights) {
  if (states.empty() || states.size() != weights.size())
    throw Error(detail::concat("fedavg: ", states.size(), " states with ", weights.size(), " weights"));
  double total = 0;
  for (double w : weights) {
    if (!(w >= 0)) throw Error("fedavg: negative or NaN weight");
    total += w;
  }
  FedAvg avg(total);
  for (size_t k = 0; k < states.size(); ++k) avg.add(states[k], weights[k]);
  return avg.result();
}

FedAvg::FedAvg(double total_weight) : total_(total_weight) {
  if (!(total_ > 0)) throw Error("fedavg: weights sum to zero");
}

void FedAvg::add(const std::vector<Tensor>& state, double weight) {
  if (!(weight >= 0)) throw Error("fedavg: negative or NaN weight");
  if (added_ == 0) {
    for (const Tensor& t : state) {
      shapes_.push_back(t.shape());
      acc_.emplace_back(static_cast<size_t>(t.numel()), 0.0);
    }
  }
  const double w = weight / total_;
  for (size_t i = 0; i < shapes_.size(); ++i) {
    if (state.size() != shapes_.size() || !(state[i].shape() == shapes_[i]))
      throw ShapeError(detail::concat("fedavg: state ", added_, " tensor ", i, " does not match state 0 (", shapes_[i].str(), ")"));
    const std::vector<float> v = state[i].to_vector();
    std::vector<double>& acc = acc_[i];
    for (size_t j = 0; j < v.size(); ++j) acc[j] += w * v[j];
  }
  ++added_;
}

std::vector<Tensor> FedAvg::result() const {
  if (added_ == 0) throw Error("fedavg: no state added");
  std::vector<Tensor> out;
  out.reserve(acc_.size());
  for (size_t i = 0; i < acc_.size(); ++i) {
    Tensor t = Tensor::empty(shapes_[i]);
    for (size_t j = 0; j < acc_[i].size(); ++j) t.data()[j] = static_cast<float>(acc_[i][j]);
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace pipar
