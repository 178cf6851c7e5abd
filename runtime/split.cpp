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

ServerPart::ServerPart(Model& m, size_t split, kernels::SgdParams sgd, Device device) : m_(m), split_(split), opt_(sgd) {
  check_split(m, split);
  params_ = m.params(split);
  ctx_.device = device;
  ctx_.training = true;
  Sgd::zero_grad(params_);
}

ServerPart::Result ServerPart::train_micro(const Tensor& activation, const Tensor& labels, int64_t batch_size) {
  if (batch_size < activation.shape().n)
    throw Error(detail::concat("server part: micro-batch of ", activation.shape().n, " in a batch of ", batch_size));
  Tape tape;
  Tensor logits = m_.forward(activation, &tape, ctx_, split_);
  Result r;
  Tensor dlogits;
  r.stats = softmax_cross_entropy(logits, labels, 1.0f / static_cast<float>(batch_size), &dlogits, ctx_.stream);
  r.grad = m_.backward(dlogits, tape, ctx_, split_);
  return r;
}

void ServerPart::step() {
  opt_.step(params_);
  Sgd::zero_grad(params_);
}

MiddlePart::MiddlePart(Model& m, size_t begin, size_t end, kernels::SgdParams sgd, Device device)
    : m_(m), begin_(begin), end_(end), opt_(sgd) {
  if (begin < 1 || end <= begin || end >= m.num_blocks())
    throw Error(detail::concat("middle part: blocks [", begin, ", ", end, ") of ", m.name(), " (", m.num_blocks(),
                               " blocks) must leave the device at least the first and the last block"));
  params_ = m.params(begin, end);
  ctx_.device = device;
  ctx_.training = true;
  Sgd::zero_grad(params_);
}

Tensor MiddlePart::forward(int64_t key, const Tensor& x) {
  auto [it, fresh] = tapes_.try_emplace(key);
  if (!fresh) throw Error(detail::concat("middle part: forward ", key, " is already in flight"));
  Tensor y = m_.forward(x, &it->second.tape, ctx_, begin_, end_);
  it->second.out = y.shape();
  return y;
}

Tensor MiddlePart::backward(int64_t key, const Tensor& grad) {
  auto it = tapes_.find(key);
  if (it == tapes_.end()) throw Error(detail::concat("middle part: gradient for forward ", key, " that is not in flight"));
  if (!(grad.shape() == it->second.out))
    throw Error(detail::concat("middle part: gradient ", grad.shape().str(), " for an output ", it->second.out.str()));
  Tensor g = m_.backward(grad, it->second.tape, ctx_, begin_, end_);
  tapes_.erase(it);
  return g;
}

const Shape4* MiddlePart::pending(int64_t key) const {
  auto it = tapes_.find(key);
  return it == tapes_.end() ? nullptr : &it->second.out;
}

void MiddlePart::step() {
  opt_.step(params_);
  Sgd::zero_grad(params_);
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
