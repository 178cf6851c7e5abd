// Models: an ordered list of split-able blocks (a conv+BN+activation(+pool) unit, a residual block,
// a bottleneck, a dense layer). A split point P (1 <= P < blocks) cuts a model into a device part,
// blocks [0, P), and a server part, blocks [P, B).
#pragma once
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "runtime/layers.h"

namespace pipar {

struct ModelOptions {
  Shape4 input{1, 1, 28, 28};  // per-sample input shape (n ignored): 1x28x28 or 3x32x32
  int num_classes = 10;
  bool batch_norm = true;      // VGG only: --norm batch|none
  float width = 1.0f;          // channel multiplier (small instances for tests)
  uint64_t seed = 1;           // initialization
};

struct Block {
  std::string kind;  // "conv", "residual", "bottleneck", "dense"
  std::unique_ptr<Sequential> body;
};

class Model {
 public:
  static constexpr size_t kEnd = std::numeric_limits<size_t>::max();

  Model(std::string name, ModelOptions options) : name_(std::move(name)), options_(options) {}
  Model& add(std::string kind, std::unique_ptr<Sequential> body);

  const std::string& name() const { return name_; }
  const ModelOptions& options() const { return options_; }
  size_t num_blocks() const { return blocks_.size(); }
  const Block& block(size_t i) const { return blocks_.at(i); }
  Device device() const { return device_; }

  // Blocks [begin, end) (end = kEnd: to the last). x: [n, ...] input of block `begin`.
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx, size_t begin = 0, size_t end = kEnd);
  // dy: gradient of the output of block end-1; returns the gradient of block begin's input, or an
  // empty tensor when !ctx.input_grad.
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx, size_t begin = 0, size_t end = kEnd);

  std::vector<Param*> params(size_t begin = 0, size_t end = kEnd);
  std::vector<Buffer> buffers(size_t begin = 0, size_t end = kEnd);
  int64_t param_count(size_t begin = 0, size_t end = kEnd);
  // Per-sample shape of block i's output (the activation sent when cutting after block i).
  Shape4 block_out_shape(size_t i) const;
  int64_t forward_flops(size_t begin = 0, size_t end = kEnd) const;  // per sample
  void zero_grad();
  void to(Device d);
  bool replayable(size_t begin = 0, size_t end = kEnd) const;  // every layer of blocks [begin, end) is (Layer::replayable)

 private:
  size_t clamp_end(size_t end) const { return end == kEnd ? blocks_.size() : end; }
  void check_range(size_t begin, size_t end) const;

  std::string name_;
  ModelOptions options_;
  std::vector<Block> blocks_;
  Device device_ = Device::kCpu;
};

// The zoo: vgg5, vgg11, vgg16, resnet18, resnet50, mobilenetv3-small, mobilenetv3-large.
std::vector<std::string> model_names();
// Throws pipar::Error naming the known models for an unknown name.
std::unique_ptr<Model> build_model(const std::string& name, const ModelOptions& options);

// Validates a split point for a model: 1 <= p < blocks, else a clear pipar::Error.
void check_split(const Model& m, size_t p);

}  // namespace pipar
