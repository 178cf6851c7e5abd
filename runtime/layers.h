// Layers: the units a model is built from. A layer keeps its parameters; everything a backward pass
// needs from its forward pass goes on a Tape that the caller owns, one tape per micro-batch in
// flight, so a pipeline can run several forwards before their backwards.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/ops.h"
#include "runtime/tensor.h"

namespace pipar {

// A trainable tensor with its gradient (accumulated over micro-batches) and SGD momentum.
struct Param {
  std::string name;
  Tensor value, grad, momentum;
  bool decay = true;  // weight decay applies (not to biases and batch-norm affine terms)
};

// A named non-trainable state tensor (batch-norm running statistics).
struct Buffer {
  std::string name;
  Tensor* value;
};

// The stack of tensors saved by forward passes for the matching backward passes (LIFO).
class Tape {
 public:
  void push(Tensor t) { stack_.push_back(std::move(t)); }
  Tensor pop();
  bool empty() const { return stack_.empty(); }
  size_t size() const { return stack_.size(); }
  size_t bytes() const;
  void clear() { stack_.clear(); }

 private:
  std::vector<Tensor> stack_;
};

// How a pass runs: training (batch-norm batch statistics, dropout on; needs a tape) or inference.
struct Context {
  bool training = true;
  Device device = Device::kCpu;
  StreamRef stream{};
  uint64_t seed = 0;  // dropout masks derive from (seed, layer, call)
  bool input_grad = true;  // backward must return dx (false for a model's first layer: saves work)
};

class Layer {
 public:
  virtual ~Layer() = default;
  virtual std::string describe() const = 0;           // "conv 3x3 32→64 s1 p1"
  virtual Shape4 out_shape(Shape4 in) const = 0;      // throws ShapeError on a bad input shape
  // tape may be null only when !ctx.training.
  virtual Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) = 0;
  virtual Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) = 0;
  virtual void collect_params(const std::string& prefix, std::vector<Param*>& out) { (void)prefix, (void)out; }
  virtual void collect_buffers(const std::string& prefix, std::vector<Buffer>& out) { (void)prefix, (void)out; }
  virtual int64_t flops(Shape4 in) const { (void)in; return 0; }  // forward multiply-adds * 2
  virtual void to(Device d) { (void)d; }
  // Its forward and backward queue the same device work at every call with the same input shape (no
  // host state that changes from call to call), so a CUDA graph of them replays what a call would do.
  // Dropout is not: its mask's seed counts the calls.
  virtual bool replayable() const { return true; }
  // The same layer for k replicas side by side (runtime/replica_stack.h): its input and output are the
  // k replicas' stacked along the channels (replica r's channels of a sample at [r*C, (r+1)*C)), and
  // each of its parameters and buffers is the k replicas' own stacked along the first dimension
  // (replica r's copy is elements [r*numel, (r+1)*numel)). Parameters start at zero. A layer whose
  // stacked form would not compute each replica's own result (dropout) throws pipar::Error.
  virtual std::unique_ptr<Layer> stacked(int k) const = 0;
};

using LayerPtr = std::unique_ptr<Layer>;

// --- layer constructors ---------------------------------------------------------------------------
// `seed` and `salt` make initialization deterministic: PyTorch's default, U(-1/sqrt(fan_in), +...).
LayerPtr make_conv2d(int in, int out, int k, int stride, int pad, int groups, bool bias, uint64_t seed);
LayerPtr make_linear(int in, int out, bool bias, uint64_t seed);
LayerPtr make_batch_norm(int c);
LayerPtr make_relu();
LayerPtr make_hardswish();
LayerPtr make_hardsigmoid();
LayerPtr make_max_pool(int k, int stride, int pad = 0);
LayerPtr make_avg_pool(int k, int stride, int pad = 0);
LayerPtr make_global_avg_pool();
LayerPtr make_flatten();
LayerPtr make_dropout(float p, uint64_t salt);  // masks from (ctx.seed, salt, call)

// Layers in order.
class Sequential : public Layer {
 public:
  Sequential() = default;
  explicit Sequential(std::vector<LayerPtr> layers) : layers_(std::move(layers)) {}
  Sequential& add(LayerPtr l) {
    layers_.push_back(std::move(l));
    return *this;
  }
  std::string describe() const override;
  Shape4 out_shape(Shape4 in) const override;
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override { return forward(x, tape, ctx, {}); }
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) override { return backward(dy, tape, ctx, {}); }
  // The same, calling after(i) once layer i has run (ReplicaStack's profile times each block).
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx, const std::function<void(size_t)>& after);
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx, const std::function<void(size_t)>& after);
  void collect_params(const std::string& prefix, std::vector<Param*>& out) override;
  void collect_buffers(const std::string& prefix, std::vector<Buffer>& out) override;
  int64_t flops(Shape4 in) const override;
  void to(Device d) override;
  bool replayable() const override;
  std::unique_ptr<Layer> stacked(int k) const override { return stacked_sequential(k); }
  std::unique_ptr<Sequential> stacked_sequential(int k) const;
  size_t size() const { return layers_.size(); }
  Layer& at(size_t i) { return *layers_.at(i); }

 private:
  std::vector<LayerPtr> layers_;
};

// out = act(main(x) + shortcut(x)); an empty shortcut is the identity; act is ReLU or none.
LayerPtr make_residual(std::unique_ptr<Sequential> main, std::unique_ptr<Sequential> shortcut, bool relu_after);
// Squeeze-and-excite: x * hardsigmoid(fc2(relu(fc1(avgpool(x))))), fcs as 1x1 convs with bias.
LayerPtr make_squeeze_excite(int c, int reduced, uint64_t seed);

}  // namespace pipar
