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
  if (!(total > 0)) throw Error("fedavg: weights sum to zero");
  const size_t count = states[0].size();
  std::vector<Tensor> out;
  out.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const Shape4 s = states[0][i].shape();
    std::vector<double> acc(static_cast<size_t>(s.numel()), 0.0);
    for (size_t k = 0; k < states.size(); ++k) {
      if (states[k].size() != count || !(states[k][i].shape() == s))
        throw ShapeError(detail::concat("fedavg: state ", k, " tensor ", i, " does not match state 0 (", s.str(), ")"));
      const std::vector<float> v = states[k][i].to_vector();
      const double w = weights[k] / total;
      for (size_t j = 0; j < v.size(); ++j) acc[j] += w * v[j];
    }
    Tensor t = Tensor::empty(s);
    for (size_t j = 0; j < acc.size(); ++j) t.data()[j] = static_cast<float>(acc[j]);
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace pipar
