// Device and server halves of split training.
#include "runtime/split.h"

namespace pipar {

DevicePart::DevicePart(Model& m, size_t split, kernels::SgdParams sgd) : m_(m), split_(split), opt_(sgd) {
  check_split(m, split);
  params_ = m.params(0, split);
  ctx_.device = m.device();
  ctx_.training = true;
  Sgd::zero_grad(params_);
}

Tensor DevicePart::forward(int micro, const Tensor& x) {
  auto [it, fresh] = tapes_.try_emplace(micro);
  if (!fresh) throw Error(detail::concat("device part: micro-batch ", micro, " is already in flight"));
  ctx_.seed = static_cast<uint64_t>(micro);
  return m_.forward(x, &it->second, ctx_, 0, split_);
}

void DevicePart::backward(int micro, const Tensor& grad) {
  auto it = tapes_.find(micro);
  if (it == tapes_.end()) throw Error(detail::concat("device part: gradient for micro-batch ", micro, " that is not in flight"));
  Context c = ctx_;
  c.input_grad = false;  // nothing consumes the gradient of the raw input
  m_.backward(grad, it->second, c, 0, split_);
  tapes_.erase(it);
}

void DevicePart::step() {
  opt_.step(params_);
  Sgd::zero_grad(params_);
}

namespace {
// m, once it is known to be on the part's device (checked before the part creates its stream).
Model& on_part_device(Model& m, Device device, const char* who) {
  if (m.device() != device)
    throw Error(detail::concat(who, ": the model is on ", device_name(m.device()), ", the part runs on ", device_name(device),
                               " (move the model with Model::to first)"));
  return m;
}

// The part's input on its device: a host tensor is copied in on the current stream (the part's).
Tensor on_device(const Tensor& t, Device d) { return t.device() == d ? t : t.to(d); }
}  // namespace

PartDevice::PartDevice(Device device, int gpu) : gpu_(gpu) {
  kernels::ScopedCudaDevice on_gpu(gpu);
  stream_ = std::make_unique<kernels::DeviceStream>(device);
  ctx.device = device;
  ctx.stream = stream_->ref();
  ctx.training = true;
}

PartDevice::~PartDevice() {
  kernels::ScopedCudaDevice on_gpu(gpu_);
  stream_.reset();
}

void PartDevice::zero_grad(const std::vector<Param*>& params) const {
  Scope on(*this);
  Sgd::zero_grad(params);
  synchronize();
}

void PartDevice::step(Sgd& opt, const std::vector<Param*>& params) const {
  Scope on(*this);
  opt.step(params, ctx.stream);
  Sgd::zero_grad(params);
  synchronize();  // the weights are final when this returns (averaging reads them)
}

ServerPart::ServerPart(Model& m, size_t split, kernels::SgdParams sgd, Device device, int gpu)
    : m_(on_part_device(m, device, "server part")), split_(split), opt_(sgd), dev_(device, gpu) {
  check_split(m, split);
  params_ = m.params(split);
  dev_.zero_grad(params_);
}

ServerPart::~ServerPart() {
  PartDevice::Scope on(dev_);  // the graphs' buffers go on the part's GPU and stream
  graphed_.clear();
}

ServerPart::Result ServerPart::train_micro(const Tensor& activation, const Tensor& labels, int64_t batch_size) {
  if (batch_size < activation.shape().n)
    throw Error(detail::concat("server part: micro-batch of ", activation.shape().n, " in a batch of ", batch_size));
  PartDevice::Scope on(dev_);
  if (!graphs_) return train_eager(activation, labels, batch_size);
  const GraphKey key{activation.shape().n, batch_size};
  if (!seen_.count(key)) {  // the first time uncaptured: kernel choices timed, workspaces grown
    Result r = train_eager(activation, labels, batch_size);
    seen_.insert(key);
    return r;
  }
  if (std::vector<const void*> now = graph_addresses(); now != graph_addresses_) {
    graphed_.clear();  // something a graph reads or writes has moved: capture again
    graph_addresses_ = std::move(now);
  }
  // A capture that fails, or a launch the driver refuses (none of the step ran): uncaptured from now on.
  auto uncaptured = [&](std::string why) {
    graphs_ = false;
    graphed_.clear();
    gstats_.off_reason = std::move(why);
    return train_eager(activation, labels, batch_size);
  };
  auto it = graphed_.find(key);
  if (it == graphed_.end()) {
    Graphed g;
    try {
      capture(g, activation, labels, batch_size);
    } catch (const Error& e) {
      return uncaptured(e.what());
    }
    ++gstats_.captures;
    it = graphed_.emplace(key, std::move(g)).first;
  }
  Graphed& g = it->second;
  try {
    replay(g, activation, labels);
  } catch (const Error& e) {
    return uncaptured(std::string("a replay failed: ") + e.what());
  }
  ++gstats_.replays;
  Result r;
  r.grad = g.grad.to(Device::kCpu);  // complete on return: the replay is done
  r.stats = loss_stats(g.losses, g.probs, labels);
  return r;
}

void ServerPart::set_graphs(bool on) {
  graphed_.clear();
  gstats_.off_reason.clear();
  graphs_ = false;
  if (!on) return;
  if (dev_.ctx.device != Device::kCuda) gstats_.off_reason = "CUDA graphs need the CUDA backend";
  else if (!m_.replayable(split_)) gstats_.off_reason = "a layer of the server part (dropout) changes at every call";
  else graphs_ = true;
  graph_buffers_.clear();
  for (const Buffer& b : m_.buffers(split_)) graph_buffers_.push_back(b.value);
}

// Every address a captured graph holds besides its own buffers: the part's weights and gradients,
// batch-norm statistics, and the stream's workspace.
std::vector<const void*> ServerPart::graph_addresses() const {
  std::vector<const void*> a;
  for (const Param* p : params_) a.push_back(p->value.raw()), a.push_back(p->grad.raw());
  for (const Tensor* b : graph_buffers_) a.push_back(b->raw());
  a.push_back(kernels::stream_workspace_id(dev_.stream()));
  return a;
}

void ServerPart::capture(Graphed& g, const Tensor& activation, const Tensor& labels, int64_t batch_size) {
  const Device d = dev_.ctx.device;
  g.x = Tensor::empty(activation.shape(), d);
  g.y = Tensor::empty(labels.shape(), d, DType::kI32);
  g.grad = Tensor::empty(activation.shape(), d);
  // The loss's outputs exist before the capture, so that they are not the graph's own memory.
  Shape4 ls = m_.block_out_shape(m_.num_blocks() - 1);
  ls.n = activation.shape().n;
  g.losses = Tensor::empty({ls.n, 1, 1, 1}, d);
  g.probs = Tensor::empty(ls, d);
  const float scale = 1.0f / static_cast<float>(batch_size);
  g.graph.capture(dev_.stream(), [&] {
    const Tensor dx = forward_backward(g.x, g.y, scale, g.losses, g.probs);
    kernels::device_copy(d, g.grad.raw(), d, dx.raw(), dx.bytes(), dev_.stream());
  });  // the tape, logits and gradients inside were the graph's own memory, freed within it
}

void ServerPart::replay(Graphed& g, const Tensor& activation, const Tensor& labels) {
  const Device d = dev_.ctx.device;
  kernels::device_copy(d, g.x.raw(), activation.device(), activation.raw(), activation.bytes(), dev_.stream());
  kernels::device_copy(d, g.y.raw(), labels.device(), labels.raw(), labels.bytes(), dev_.stream());
  g.graph.launch(dev_.stream());
}

Tensor ServerPart::forward_backward(const Tensor& x, const Tensor& y, float scale, Tensor& losses, Tensor& probs) {
  Tape tape;
  Tensor logits = m_.forward(x, &tape, dev_.ctx, split_);
  Tensor dlogits;
  softmax_cross_entropy_queued(logits, y, scale, losses, probs, &dlogits, dev_.stream());
  return m_.backward(dlogits, tape, dev_.ctx, split_);
}  // the tape's device memory goes back to the pool, ordered on the part's stream

ServerPart::Result ServerPart::train_eager(const Tensor& activation, const Tensor& labels, int64_t batch_size) {
  Tensor losses, probs;  // allocated by the loss
  Result r;
  r.grad = forward_backward(on_device(activation, dev_.ctx.device), on_device(labels, dev_.ctx.device),
                            1.0f / static_cast<float>(batch_size), losses, probs)
               .to(Device::kCpu);  // complete on return: the stream is idle
  r.stats = loss_stats(losses, probs, labels);  // read once the backward is queued, not in between
  return r;
}

void ServerPart::step() { dev_.step(opt_, params_); }

MiddlePart::MiddlePart(Model& m, size_t begin, size_t end, kernels::SgdParams sgd, Device device, int gpu)
    : m_(on_part_device(m, device, "middle part")), begin_(begin), end_(end), opt_(sgd), dev_(device, gpu) {
  if (begin < 1 || end <= begin || end >= m.num_blocks())
    throw Error(detail::concat("middle part: blocks [", begin, ", ", end, ") of ", m.name(), " (", m.num_blocks(),
                               " blocks) must leave the device at least the first and the last block"));
  params_ = m.params(begin, end);
  dev_.zero_grad(params_);
}

MiddlePart::~MiddlePart() { reset(); }

Tensor MiddlePart::forward(int64_t key, const Tensor& x) {
  auto [it, fresh] = tapes_.try_emplace(key);
  if (!fresh) throw Error(detail::concat("middle part: forward ", key, " is already in flight"));
  PartDevice::Scope on(dev_);
  try {
    Tensor y = m_.forward(on_device(x, dev_.ctx.device), &it->second.tape, dev_.ctx, begin_, end_);
    it->second.out = y.shape();
    return y.to(Device::kCpu);
  } catch (...) {
    tapes_.erase(it);  // nothing of a failed forward stays in flight
    throw;
  }
}

Tensor MiddlePart::backward(int64_t key, const Tensor& grad) {
  auto it = tapes_.find(key);
  if (it == tapes_.end()) throw Error(detail::concat("middle part: gradient for forward ", key, " that is not in flight"));
  if (!(grad.shape() == it->second.out))
    throw Error(detail::concat("middle part: gradient ", grad.shape().str(), " for an output ", it->second.out.str()));
  PartDevice::Scope on(dev_);
  Tensor g = m_.backward(on_device(grad, dev_.ctx.device), it->second.tape, dev_.ctx, begin_, end_).to(Device::kCpu);
  tapes_.erase(it);
  return g;
}

const Shape4* MiddlePart::pending(int64_t key) const {
  auto it = tapes_.find(key);
  return it == tapes_.end() ? nullptr : &it->second.out;
}

void MiddlePart::step() { dev_.step(opt_, params_); }

void MiddlePart::reset() {
  PartDevice::Scope on(dev_);  // the tapes' device memory goes back to the pool on the part's stream
  tapes_.clear();
}

void check_private_split(const Model& m, size_t p) {
  if (m.num_blocks() < 3 || p < 1 || p + 2 > m.num_blocks())
    throw Error(detail::concat("--labels private: split point ", p, " leaves the server no block; ", m.name(), " has ",
                               m.num_blocks(), " blocks and the device keeps the last, so the split must be 1..",
                               m.num_blocks() >= 3 ? m.num_blocks() - 2 : 0));
}

std::vector<int64_t> micro_batch_sizes(int64_t n, int k) {
  if (n <= 0 || k <= 0) throw Error(detail::concat("micro_batch_sizes: ", n, " samples in ", k, " micro-batches"));
  const int64_t parts = std::min<int64_t>(n, k);
  std::vector<int64_t> s(static_cast<size_t>(parts), n / parts);
  for (int64_t i = 0; i < n % parts; ++i) ++s[static_cast<size_t>(i)];
  return s;
}

}  // namespace pipar
