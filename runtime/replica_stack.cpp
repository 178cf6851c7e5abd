// K server-side replicas as one stacked part (replica_stack.h).
#include "runtime/replica_stack.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <utility>

namespace pipar {

namespace {

// Slice r of a stacked tensor holding k equal slices.
View slice(Tensor& t, int r, int k) {
  const int64_t len = t.numel() / k;
  return {t.data() + r * len, {len, 1, 1, 1}, t.device()};
}

}  // namespace

ReplicaStack::ReplicaStack(const Model& like, size_t split, int replicas, kernels::SgdParams sgd, Device device, int gpu)
    : k_(replicas), split_(split), opt_(sgd), dev_(device, gpu) {
  check_split(like, split);
  if (replicas < 1) throw Error(detail::concat("replica stack: ", replicas, " replicas"));
  cut_ = like.block_out_shape(split - 1);
  classes_ = like.block_out_shape(like.num_blocks() - 1).per_sample();
  body_ = std::make_unique<Sequential>();
  for (size_t b = split; b < like.num_blocks(); ++b) body_->add(like.block(b).body->stacked_sequential(replicas));
  {
    PartDevice::Scope on(dev_);
    body_->to(device);
  }
  body_->collect_params("", params_);
  body_->collect_buffers("", buffers_);
  dev_.zero_grad(params_);
}

ReplicaStack::~ReplicaStack() {
  PartDevice::Scope on(dev_);  // the stack's device memory goes on its GPU and stream
  body_.reset();
}

void ReplicaStack::set_profiling(bool on) {
  profiling_ = on;
  profile_ = Profile{};
  for (size_t b = 0; b < body_->size(); ++b) profile_.blocks.push_back(body_->at(b).describe());
  profile_.forward.assign(body_->size(), 0.0);
  profile_.backward.assign(body_->size(), 0.0);
}

void ReplicaStack::check_replica(int r, const char* who) const {
  if (r < 0 || r >= k_) throw Error(detail::concat("replica stack: ", who, " replica ", r, " of ", k_));
}

std::vector<std::pair<Tensor*, Tensor*>> ReplicaStack::slices_of(Model& m) {
  check_split(m, split_);
  const std::vector<Param*> mp = m.params(split_);
  const std::vector<Buffer> mb = m.buffers(split_);
  if (mp.size() != params_.size() || mb.size() != buffers_.size())
    throw Error(detail::concat("replica stack: ", m.name(), " blocks [", split_, ", ", m.num_blocks(), ") have ", mp.size(),
                               " parameters and ", mb.size(), " statistics, the stack's replica ", params_.size(), " and ",
                               buffers_.size()));
  std::vector<std::pair<Tensor*, Tensor*>> pairs;
  auto add = [&](Tensor& stack, Tensor& replica, const std::string& name) {
    if (stack.numel() != replica.numel() * k_)
      throw Error(detail::concat("replica stack: ", name, " of ", m.name(), " has ", replica.numel(), " values, the stack ",
                                 stack.numel(), " for ", k_, " replicas"));
    pairs.emplace_back(&stack, &replica);
  };
  for (size_t i = 0; i < mp.size(); ++i) {
    add(params_[i]->value, mp[i]->value, mp[i]->name);
    add(params_[i]->grad, mp[i]->grad, mp[i]->name);
    add(params_[i]->momentum, mp[i]->momentum, mp[i]->name);
  }
  for (size_t i = 0; i < mb.size(); ++i) add(*buffers_[i].value, *mb[i].value, mb[i].name);
  return pairs;
}

void ReplicaStack::load(int r, Model& m) { copy_replica(r, m, true); }
void ReplicaStack::store(int r, Model& m) { copy_replica(r, m, false); }

void ReplicaStack::copy_replica(int r, Model& m, bool into_stack) {
  check_replica(r, into_stack ? "load of" : "store of");
  PartDevice::Scope on(dev_);
  for (auto [stack, replica] : slices_of(m)) {
    const View sl = slice(*stack, r, k_);
    if (into_stack) kernels::device_copy(sl.device, sl.data, replica->device(), replica->raw(), replica->bytes(), dev_.stream());
    else kernels::device_copy(replica->device(), replica->raw(), sl.device, sl.data, replica->bytes(), dev_.stream());
  }
  dev_.synchronize();
}

ReplicaStack::Staging& ReplicaStack::staging(int64_t n) {
  if (staged_[0].n != n) {
    std::swap(staged_[0], staged_[1]);
    if (staged_[0].n != n) {
      const Shape4 xs{n, cut_.c * k_, cut_.h, cut_.w};
      staged_[0] = Staging{n, Tensor::empty_host(xs, DType::kF32, true), Tensor::empty_host({n * k_, 1, 1, 1}, DType::kI32, true),
                           Tensor::empty_host({n, k_, 1, 1}, DType::kF32, true),
                           device() == Device::kCpu ? Tensor() : Tensor::empty_host(xs, DType::kF32, true)};
    }
  }
  return staged_[0];
}

std::vector<ServerPart::Result> ReplicaStack::train_micro(const std::vector<Item>& items, int64_t batch_size) {
  if (items.empty()) return {};
  // With profiling on, lap(t) waits for the device and adds the time since the last lap to t.
  auto mark = std::chrono::steady_clock::now();
  auto lap = [&](double& into) {
    if (!profiling_) return;
    dev_.synchronize();
    const auto now = std::chrono::steady_clock::now();
    into += std::chrono::duration<double>(now - mark).count();
    mark = now;
  };
  const int64_t n = items[0].activation.shape().n, f = cut_.per_sample();
  const Shape4 want{n, cut_.c, cut_.h, cut_.w};
  std::vector<int> slot(static_cast<size_t>(k_), -1);  // the item of each replica, -1: absent
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    check_replica(it.replica, "micro-batch for");
    if (slot[static_cast<size_t>(it.replica)] >= 0)
      throw Error(detail::concat("replica stack: two micro-batches for replica ", it.replica, " in one group"));
    slot[static_cast<size_t>(it.replica)] = static_cast<int>(i);
    if (!(it.activation.shape() == want))
      throw Error(detail::concat("replica stack: replica ", it.replica, "'s activation ", it.activation.shape().str(),
                                 " in a group of ", want.str(), " (a group's micro-batches have one size and the cut's shape)"));
    if (it.labels.dtype() != DType::kI32 || it.labels.numel() != n)
      throw Error(detail::concat("replica stack: replica ", it.replica, " has ", it.labels.numel(), " labels for ", n,
                                 " samples"));
  }
  if (batch_size < n) throw Error(detail::concat("replica stack: micro-batch of ", n, " in a batch of ", batch_size));
  const bool all = items.size() == static_cast<size_t>(k_);

  // The group on the host, stacked: sample s of replica r at [(s*K + r)*F, ...); absent replicas zero.
  Staging& stage = staging(n);
  Tensor x = stage.x, y = stage.y;
  for (int r = 0; r < k_; ++r) {
    const int i = slot[static_cast<size_t>(r)];
    const Tensor a = i < 0 ? Tensor() : items[static_cast<size_t>(i)].activation.to(Device::kCpu);
    const Tensor l = i < 0 ? Tensor() : items[static_cast<size_t>(i)].labels.to(Device::kCpu);
    for (int64_t s = 0; s < n; ++s) {
      float* dst = x.data() + (s * k_ + r) * f;
      if (i < 0) std::memset(dst, 0, static_cast<size_t>(f) * sizeof(float));
      else std::memcpy(dst, a.data() + s * f, static_cast<size_t>(f) * sizeof(float));
      y.idata()[s * k_ + r] = i < 0 ? 0 : l.idata()[s];
    }
  }

  PartDevice::Scope on(dev_);
  const Device d = device();
  const StreamRef st = dev_.stream();
  lap(profile_.assemble);
  std::vector<Tensor> saved;  // absent replicas' batch-norm statistics, put back after the forward
  if (!all)
    for (const Buffer& b : buffers_) saved.push_back(b.value->clone());
  Tensor dx, losses, probs;
  {
    Tape tape;
    const Tensor xd = x.to(d), yd = y.to(d);
    lap(profile_.upload);
    // With profiling on, each block's forward and backward timed.
    std::function<void(size_t)> after_forward, after_backward;
    if (profiling_) {
      after_forward = [&](size_t b) { lap(profile_.forward[b]); };
      after_backward = [&](size_t b) { lap(profile_.backward[b]); };
    }
    const Tensor logits = body_->forward(xd, &tape, dev_.ctx, after_forward);
    Tensor dlogits;
    softmax_cross_entropy_queued(logits.reshape({n * k_, classes_, 1, 1}), yd, 1.0f / static_cast<float>(batch_size),
                                 losses, probs, &dlogits, st);
    if (!all) {  // absent replicas' rows get no gradient: every gradient they accumulate is zero
      Tensor mask = stage.mask;  // 1 for the listed replicas
      for (int64_t s = 0; s < n; ++s)
        for (int r = 0; r < k_; ++r) mask.data()[s * k_ + r] = slot[static_cast<size_t>(r)] < 0 ? 0.0f : 1.0f;
      Tensor masked = Tensor::empty({n, k_, classes_, 1}, d);
      const Tensor md = mask.to(d);
      kernels::channel_mul_forward(dlogits.reshape({n, k_, classes_, 1}).view(), md.view(), masked.view(), st);
      dlogits = masked;
    }
    lap(profile_.loss);
    dx = body_->backward(dlogits.reshape({n, classes_ * k_, 1, 1}), tape, dev_.ctx, after_backward);
  }  // the tape's device memory goes back to the pool on the stack's stream
  for (size_t j = 0; j < saved.size(); ++j)
    for (int r = 0; r < k_; ++r)
      if (slot[static_cast<size_t>(r)] < 0) {
        const View dst = slice(*buffers_[j].value, r, k_), src = slice(saved[j], r, k_);
        kernels::device_copy(d, dst.data, d, src.data, static_cast<size_t>(dst.numel()) * sizeof(float), st);
      }
  Tensor hdx = dx;  // on the host; from a GPU through the staging buffer, complete on return (the stream is idle)
  if (d != Device::kCpu) {
    if (dx.bytes() != stage.dx.bytes())
      throw Error(detail::concat("replica stack: cut gradient ", dx.shape().str(), " for a group staged as ", stage.dx.shape().str()));
    kernels::device_copy(Device::kCpu, stage.dx.raw(), d, dx.raw(), dx.bytes());
    hdx = stage.dx;
  }
  const std::vector<float> hl = losses.to_vector(), hp = probs.to_vector();

  std::vector<ServerPart::Result> out(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const int r = items[i].replica;
    Tensor g = Tensor::empty({n, cut_.c, cut_.h, cut_.w});
    for (int64_t s = 0; s < n; ++s)
      std::memcpy(g.data() + s * f, hdx.data() + (s * k_ + r) * f, static_cast<size_t>(f) * sizeof(float));
    out[i].grad = g;
    out[i].stats = loss_stats_rows(hl.data(), hp.data(), y.idata(), classes_, r, n, k_);
  }
  dev_.synchronize();
  lap(profile_.download);
  if (profiling_) ++profile_.groups;
  return out;
}

void ReplicaStack::step(const std::vector<int>& replicas) {
  std::vector<bool> listed(static_cast<size_t>(k_), false);
  for (int r : replicas) {
    check_replica(r, "step of");
    listed[static_cast<size_t>(r)] = true;
  }
  if (std::count(listed.begin(), listed.end(), true) == k_) return dev_.step(opt_, params_);  // one update per parameter
  PartDevice::Scope on(dev_);
  for (Param* p : params_)
    for (int r = 0; r < k_; ++r) {
      if (!listed[static_cast<size_t>(r)]) continue;
      const View g = slice(p->grad, r, k_);
      kernels::sgd_step(opt_.params_for(*p), slice(p->value, r, k_), g, slice(p->momentum, r, k_), dev_.stream());
      kernels::fill(0.0f, g, dev_.stream());
    }
  dev_.synchronize();
}

}  // namespace pipar
