// Federated averaging of model state.
#include "runtime/aggregation.h"

#include <memory>

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

void fedavg_on_gpus(kernels::GpuGroup& group, const std::vector<std::vector<std::vector<Tensor*>>>& replicas,
                    const std::vector<std::vector<double>>& weights) {
  const size_t ranks = static_cast<size_t>(group.size());
  if (replicas.size() != ranks || weights.size() != ranks)
    throw Error(detail::concat("fedavg_on_gpus: replicas for ", replicas.size(), " and weights for ", weights.size(), " of ",
                               ranks, " GPUs"));
  double total = 0;
  const std::vector<Tensor*>* layout = nullptr;
  for (size_t r = 0; r < ranks; ++r) {
    if (replicas[r].size() != weights[r].size())
      throw Error(detail::concat("fedavg_on_gpus: GPU ", r, " has ", replicas[r].size(), " replicas and ", weights[r].size(), " weights"));
    for (size_t k = 0; k < replicas[r].size(); ++k) {
      if (!(weights[r][k] >= 0)) throw Error("fedavg_on_gpus: negative or NaN weight");
      total += weights[r][k];
      const std::vector<Tensor*>& st = replicas[r][k];
      if (!layout) layout = &st;
      bool same = st.size() == layout->size();
      for (size_t i = 0; same && i < st.size(); ++i)
        same = st[i]->shape() == (*layout)[i]->shape() && st[i]->device() == Device::kCuda;
      if (!same) throw ShapeError(detail::concat("fedavg_on_gpus: replica ", k, " on GPU ", r, " does not match the first's layout (CUDA tensors)"));
    }
  }
  if (!(total > 0)) throw Error("fedavg_on_gpus: weights sum to zero");
  int64_t floats = 0;
  std::vector<int64_t> offset;
  for (const Tensor* t : *layout) offset.push_back(floats), floats += t->numel();
  // Per GPU: a stream, and the weighted sum of its replicas in one flat buffer.
  std::vector<std::unique_ptr<kernels::DeviceStream>> streams(ranks);
  std::vector<Tensor> sums(ranks);
  auto flat = [](const Tensor& t, float* at) { return View{at, Shape4{t.numel(), 1, 1, 1}, Device::kCuda}; };
  for (size_t r = 0; r < ranks; ++r) {
    kernels::ScopedCudaDevice on_gpu(group.gpus()[r]);
    streams[r] = std::make_unique<kernels::DeviceStream>(Device::kCuda);
    kernels::ScopedStream on(streams[r]->ref());
    sums[r] = Tensor::zeros({floats, 1, 1, 1}, Device::kCuda);
    for (size_t k = 0; k < replicas[r].size(); ++k) {
      if (weights[r][k] == 0) continue;  // a device that missed the round: receives, adds nothing
      const float w = static_cast<float>(weights[r][k] / total);
      for (size_t i = 0; i < layout->size(); ++i) {
        const Tensor& t = *replicas[r][k][i];
        kernels::axpy(w, ConstView{t.data(), Shape4{t.numel(), 1, 1, 1}, Device::kCuda}, flat(t, sums[r].data() + offset[i]),
                      streams[r]->ref());
      }
    }
  }
  std::vector<View> bufs;
  std::vector<StreamRef> refs;
  for (size_t r = 0; r < ranks; ++r) bufs.push_back(sums[r].view()), refs.push_back(streams[r]->ref());
  group.all_reduce_sum(bufs, refs);
  for (size_t r = 0; r < ranks; ++r) {
    kernels::ScopedCudaDevice on_gpu(group.gpus()[r]);
    kernels::ScopedStream on(streams[r]->ref());
    for (const std::vector<Tensor*>& st : replicas[r])
      for (size_t i = 0; i < st.size(); ++i)
        kernels::device_copy(Device::kCuda, st[i]->raw(), Device::kCuda, sums[r].data() + offset[i], st[i]->bytes(),
                             streams[r]->ref());
    streams[r]->synchronize();
    sums[r] = Tensor();  // freed on its GPU, ordered on its stream
    streams[r].reset();  // and the stream with its resources, on its GPU
  }
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
