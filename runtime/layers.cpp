// The layers of layers.h on top of the op interface (kernels/ops.h): device-agnostic, so the same
// layer runs on the CPU backend or on CUDA once its tensors live there.
#include "runtime/layers.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "kernels/rng.h"

namespace pipar {

namespace k = kernels;

// --- tape -----------------------------------------------------------------------------------------

Tensor Tape::pop() {
  PIPAR_CHECK(!stack_.empty(), "backward pass popped an empty tape: forward was not run in training mode");
  Tensor t = std::move(stack_.back());
  stack_.pop_back();
  return t;
}

size_t Tape::bytes() const {
  size_t b = 0;
  for (const Tensor& t : stack_) b += t.defined() ? t.bytes() : 0;
  return b;
}

namespace {

Param make_param(const std::string& name, Shape4 shape, bool decay) {
  Param p;
  p.name = name;
  p.value = Tensor::zeros(shape);
  p.grad = Tensor::zeros(shape);
  p.momentum = Tensor::zeros(shape);
  p.decay = decay;
  return p;
}

// PyTorch's default initialization for conv and linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
void init_uniform(Tensor& t, int64_t fan_in, uint64_t seed) {
  const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
  float* d = t.data();
  for (int64_t i = 0; i < t.numel(); ++i) d[i] = (2.0f * uniform01(seed, static_cast<uint64_t>(i)) - 1.0f) * bound;
}

void move_param(Param& p, Device d) {
  p.value = p.value.to(d);
  p.grad = p.grad.to(d);
  p.momentum = p.momentum.to(d);
}

Tensor empty_like(Shape4 s, const Context& ctx) { return Tensor::empty(s, ctx.device); }

void require_tape(Tape* tape, const char* layer) {
  if (!tape) throw Error(detail::concat(layer, ": training forward needs a tape"));
}

// Layers whose backward needs only the input's per-sample shape remember it here (it is fixed for a
// layer inside a model); the batch size comes from dy, so micro-batches of any size share it.
struct InputShape {
  Shape4 per_sample{0, 0, 0, 0};
  void record(Shape4 s) { per_sample = {1, s.c, s.h, s.w}; }
  Shape4 with_batch(int64_t n) const { return {n, per_sample.c, per_sample.h, per_sample.w}; }
};

// --- convolution ----------------------------------------------------------------------------------

class Conv2d : public Layer {
 public:
  // seed == kNoInit: parameters stay zero (a stacked layer, whose replicas' weights are loaded).
  static constexpr uint64_t kNoInit = ~uint64_t{0};
  Conv2d(int in, int out, int k, int stride, int pad, int groups, bool bias, uint64_t seed) : in_(in), out_(out) {
    p_.kh = p_.kw = k;
    p_.sh = p_.sw = stride;
    p_.ph = p_.pw = pad;
    p_.groups = groups;
    if (in % groups || out % groups) throw ShapeError(detail::concat("conv: channels ", in, "→", out, " not divisible by groups ", groups));
    w_ = make_param("weight", {out, in / groups, k, k}, true);
    const int64_t fan_in = static_cast<int64_t>(in / groups) * k * k;
    if (seed != kNoInit) init_uniform(w_.value, fan_in, hash64(seed, 1));
    if (bias) {
      b_ = make_param("bias", {out, 1, 1, 1}, false);
      if (seed != kNoInit) init_uniform(b_.value, fan_in, hash64(seed, 2));
      has_bias_ = true;
    }
  }
  // k replicas: k times the channels and the groups, so group g of replica r is group r*groups + g and
  // its weight rows are replica r's rows of group g.
  LayerPtr stacked(int k) const override {
    return std::make_unique<Conv2d>(in_ * k, out_ * k, p_.kh, p_.sh, p_.ph, p_.groups * k, has_bias_, kNoInit);
  }
  std::string describe() const override {
    std::ostringstream os;
    os << (p_.groups == in_ && p_.groups == out_ && p_.groups > 1 ? "dwconv " : "conv ") << p_.kh << "x" << p_.kw << " "
       << in_ << "→" << out_ << (p_.sh > 1 ? " s" + std::to_string(p_.sh) : "");
    return os.str();
  }
  Shape4 out_shape(Shape4 in) const override { return k::conv2d_out_shape(in, w_.value.shape(), p_); }
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override {
    Tensor y = empty_like(out_shape(x.shape()), ctx);
    k::conv2d_forward(p_, x.view(), w_.value.view(), has_bias_ ? b_.value.view() : ConstView{}, y.view(), ctx.stream);
    if (ctx.training) {
      require_tape(tape, "conv");
      tape->push(x);
    }
    return y;
  }
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) override {
    Tensor x = tape.pop();
    k::conv2d_backward_weight(p_, x.view(), dy.view(), w_.grad.view(), ctx.stream);
    if (has_bias_) k::conv2d_backward_bias(dy.view(), b_.grad.view(), ctx.stream);
    if (!ctx.input_grad) return {};
    Tensor dx = empty_like(x.shape(), ctx);
    k::conv2d_backward_input(p_, dy.view(), w_.value.view(), dx.view(), ctx.stream);
    return dx;
  }
  void collect_params(const std::string& prefix, std::vector<Param*>& out) override {
    w_.name = prefix + "weight";
    out.push_back(&w_);
    if (has_bias_) {
      b_.name = prefix + "bias";
      out.push_back(&b_);
    }
  }
  int64_t flops(Shape4 in) const override { return k::conv2d_flops(in, w_.value.shape(), p_); }
  void to(Device d) override {
    move_param(w_, d);
    if (has_bias_) move_param(b_, d);
  }

 private:
  k::Conv2dParams p_;
  int in_, out_;
  Param w_, b_;
  bool has_bias_ = false;
};

// --- linear ---------------------------------------------------------------------------------------

// groups > 1: that many dense layers side by side (a stacked layer: ops.h's grouped_linear_*), with
// weights [groups*out, in]; parameters stay zero (the replicas' weights are loaded).
class Linear : public Layer {
 public:
  Linear(int in, int out, bool bias, uint64_t seed, int groups = 1) : in_(in), out_(out), groups_(groups) {
    w_ = make_param("weight", {static_cast<int64_t>(out) * groups, in, 1, 1}, true);
    if (groups == 1) init_uniform(w_.value, in, hash64(seed, 1));
    if (bias) {
      b_ = make_param("bias", {static_cast<int64_t>(out) * groups, 1, 1, 1}, false);
      if (groups == 1) init_uniform(b_.value, in, hash64(seed, 2));
      has_bias_ = true;
    }
  }
  std::string describe() const override {
    return "dense " + std::to_string(in_) + "→" + std::to_string(out_) + (groups_ > 1 ? " x" + std::to_string(groups_) : "");
  }
  Shape4 out_shape(Shape4 in) const override { return k::linear_out_shape(in, w_.value.shape(), groups_); }
  LayerPtr stacked(int k) const override { return std::make_unique<Linear>(in_, out_, has_bias_, 0, groups_ * k); }
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override {
    Tensor y = empty_like(out_shape(x.shape()), ctx);
    k::grouped_linear_forward(groups_, x.view(), w_.value.view(), has_bias_ ? b_.value.view() : ConstView{}, y.view(),
                              ctx.stream);
    if (ctx.training) {
      require_tape(tape, "dense");
      tape->push(x);
    }
    return y;
  }
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) override {
    Tensor x = tape.pop();
    k::grouped_linear_backward_weight(groups_, x.view(), dy.view(), w_.grad.view(), ctx.stream);
    if (has_bias_) k::linear_backward_bias(dy.view(), b_.grad.view(), ctx.stream);
    if (!ctx.input_grad) return {};
    Tensor dx = empty_like(x.shape(), ctx);
    k::grouped_linear_backward_input(groups_, dy.view(), w_.value.view(), dx.view(), ctx.stream);
    return dx;
  }
  void collect_params(const std::string& prefix, std::vector<Param*>& out) override {
    w_.name = prefix + "weight";
    out.push_back(&w_);
    if (has_bias_) {
      b_.name = prefix + "bias";
      out.push_back(&b_);
    }
  }
  int64_t flops(Shape4 in) const override { return 2 * in.n * static_cast<int64_t>(in_) * out_ * groups_; }
  void to(Device d) override {
    move_param(w_, d);
    if (has_bias_) move_param(b_, d);
  }

 private:
  int in_, out_, groups_;
  Param w_, b_;
  bool has_bias_ = false;
};

// --- batch norm -----------------------------------------------------------------------------------

class BatchNorm2d : public Layer {
 public:
  explicit BatchNorm2d(int c) : c_(c) {
    gamma_ = make_param("weight", {c, 1, 1, 1}, false);
    beta_ = make_param("bias", {c, 1, 1, 1}, false);
    k::fill(1.0f, gamma_.value.view());
    running_mean_ = Tensor::zeros({c, 1, 1, 1});
    running_var_ = Tensor::zeros({c, 1, 1, 1});
    k::fill(1.0f, running_var_.view());
  }
  std::string describe() const override { return "bn " + std::to_string(c_); }
  LayerPtr stacked(int k) const override { return std::make_unique<BatchNorm2d>(c_ * k); }
  Shape4 out_shape(Shape4 in) const override {
    if (in.c != c_) throw ShapeError(detail::concat("bn ", c_, ": input ", in.str(), " has ", in.c, " channels"));
    return in;
  }
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override {
    out_shape(x.shape());
    Tensor y = empty_like(x.shape(), ctx);
    if (!ctx.training) {
      k::batch_norm_forward_inference(p_, x.view(), gamma_.value.view(), beta_.value.view(), running_mean_.view(),
                                      running_var_.view(), y.view(), ctx.stream);
      return y;
    }
    require_tape(tape, "bn");
    Tensor mean = empty_like({c_, 1, 1, 1}, ctx), invstd = empty_like({c_, 1, 1, 1}, ctx);
    k::batch_norm_forward_train(p_, x.view(), gamma_.value.view(), beta_.value.view(), running_mean_.view(),
                                running_var_.view(), mean.view(), invstd.view(), y.view(), ctx.stream);
    tape->push(x);
    tape->push(mean);
    tape->push(invstd);
    return y;
  }
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) override {
    Tensor invstd = tape.pop(), mean = tape.pop(), x = tape.pop();
    Tensor dx = empty_like(x.shape(), ctx);
    k::batch_norm_backward(x.view(), dy.view(), gamma_.value.view(), mean.view(), invstd.view(), dx.view(),
                           gamma_.grad.view(), beta_.grad.view(), ctx.stream);
    return dx;
  }
  void collect_params(const std::string& prefix, std::vector<Param*>& out) override {
    gamma_.name = prefix + "weight";
    beta_.name = prefix + "bias";
    out.push_back(&gamma_);
    out.push_back(&beta_);
  }
  void collect_buffers(const std::string& prefix, std::vector<Buffer>& out) override {
    out.push_back({prefix + "running_mean", &running_mean_});
    out.push_back({prefix + "running_var", &running_var_});
  }
  int64_t flops(Shape4 in) const override { return 4 * in.numel(); }
  void to(Device d) override {
    move_param(gamma_, d);
    move_param(beta_, d);
    running_mean_ = running_mean_.to(d);
    running_var_ = running_var_.to(d);
  }

 private:
  int c_;
  k::BatchNormParams p_;
  Param gamma_, beta_;
  Tensor running_mean_, running_var_;
};

// --- activations ----------------------------------------------------------------------------------

enum class Act { kRelu, kHardswish, kHardsigmoid };

class Activation : public Layer {
 public:
  explicit Activation(Act a) : a_(a) {}
  std::string describe() const override {
    return a_ == Act::kRelu ? "relu" : a_ == Act::kHardswish ? "hswish" : "hsigmoid";
  }
  Shape4 out_shape(Shape4 in) const override { return in; }
  LayerPtr stacked(int) const override { return std::make_unique<Activation>(a_); }  // element-wise
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override {
    Tensor y = empty_like(x.shape(), ctx);
    switch (a_) {
      case Act::kRelu: k::relu_forward(x.view(), y.view(), ctx.stream); break;
      case Act::kHardswish: k::hardswish_forward(x.view(), y.view(), ctx.stream); break;
      case Act::kHardsigmoid: k::hardsigmoid_forward(x.view(), y.view(), ctx.stream); break;
    }
    if (ctx.training) {
      require_tape(tape, "activation");
      tape->push(a_ == Act::kRelu ? y : x);  // relu's backward reads its output, the others their input
    }
    return y;
  }
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) override {
    Tensor saved = tape.pop();
    Tensor dx = empty_like(dy.shape(), ctx);
    switch (a_) {
      case Act::kRelu: k::relu_backward(saved.view(), dy.view(), dx.view(), ctx.stream); break;
      case Act::kHardswish: k::hardswish_backward(saved.view(), dy.view(), dx.view(), ctx.stream); break;
      case Act::kHardsigmoid: k::hardsigmoid_backward(saved.view(), dy.view(), dx.view(), ctx.stream); break;
    }
    return dx;
  }

 private:
  Act a_;
};

// --- pooling, flatten, dropout --------------------------------------------------------------------

class Pool2d : public Layer {
 public:
  Pool2d(bool max, int k, int stride, int pad) : max_(max) {
    p_.kh = p_.kw = k;
    p_.sh = p_.sw = stride;
    p_.ph = p_.pw = pad;
  }
  std::string describe() const override {
    return std::string(max_ ? "maxpool " : "avgpool ") + std::to_string(p_.kh) + "x" + std::to_string(p_.kw);
  }
  Shape4 out_shape(Shape4 in) const override { return k::pool2d_out_shape(in, p_); }
  LayerPtr stacked(int) const override { return std::make_unique<Pool2d>(max_, p_.kh, p_.sh, p_.ph); }  // per plane
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override {
    const Shape4 ys = out_shape(x.shape());
    in_.record(x.shape());
    Tensor y = empty_like(ys, ctx);
    if (max_) {
      Tensor argmax = Tensor::empty(ys, ctx.device, DType::kI32);
      k::max_pool2d_forward(p_, x.view(), y.view(), argmax.iview(), ctx.stream);
      if (ctx.training) {
        require_tape(tape, "maxpool");
        tape->push(argmax);
      }
    } else {
      k::avg_pool2d_forward(p_, x.view(), y.view(), ctx.stream);
    }
    return y;
  }
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) override {
    Tensor dx = empty_like(in_.with_batch(dy.shape().n), ctx);
    if (max_) {
      Tensor argmax = tape.pop();
      k::max_pool2d_backward(p_, dy.view(), argmax.iview(), dx.view(), ctx.stream);
    } else {
      k::avg_pool2d_backward(p_, dy.view(), dx.view(), ctx.stream);
    }
    return dx;
  }

 private:
  bool max_;
  k::Pool2dParams p_;
  InputShape in_;
};

class GlobalAvgPool : public Layer {
 public:
  std::string describe() const override { return "global avgpool"; }
  Shape4 out_shape(Shape4 in) const override { return {in.n, in.c, 1, 1}; }
  LayerPtr stacked(int) const override { return std::make_unique<GlobalAvgPool>(); }  // per plane
  Tensor forward(const Tensor& x, Tape*, const Context& ctx) override {
    in_.record(x.shape());
    Tensor y = empty_like(out_shape(x.shape()), ctx);
    k::global_avg_pool_forward(x.view(), y.view(), ctx.stream);
    return y;
  }
  Tensor backward(const Tensor& dy, Tape&, const Context& ctx) override {
    Tensor dx = empty_like(in_.with_batch(dy.shape().n), ctx);
    k::global_avg_pool_backward(dy.view(), dx.view(), ctx.stream);
    return dx;
  }

 private:
  InputShape in_;
};

class Flatten : public Layer {
 public:
  std::string describe() const override { return "flatten"; }
  Shape4 out_shape(Shape4 in) const override { return {in.n, in.per_sample(), 1, 1}; }
  // Replica r's channels are contiguous within a sample, so its flattened features are [r*F, (r+1)*F).
  LayerPtr stacked(int) const override { return std::make_unique<Flatten>(); }
  Tensor forward(const Tensor& x, Tape*, const Context&) override {
    in_.record(x.shape());
    return x.reshape(out_shape(x.shape()));
  }
  Tensor backward(const Tensor& dy, Tape&, const Context&) override { return dy.reshape(in_.with_batch(dy.shape().n)); }

 private:
  InputShape in_;
};

class Dropout : public Layer {
 public:
  Dropout(float p, uint64_t salt) : p_(p), salt_(salt) {
    if (!(p >= 0.0f && p < 1.0f)) throw Error(detail::concat("dropout: p must be in [0, 1), got ", p));
  }
  std::string describe() const override { return "dropout " + std::to_string(p_).substr(0, 4); }
  bool replayable() const override { return p_ == 0.0f; }
  LayerPtr stacked(int) const override {
    if (p_ != 0.0f)
      throw Error("dropout cannot be stacked across replicas: its masks follow the element index, so a stacked "
                  "replica would not draw its own masks");
    return std::make_unique<Dropout>(p_, salt_);
  }
  Shape4 out_shape(Shape4 in) const override { return in; }
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override {
    if (!ctx.training || p_ == 0.0f) return x;
    require_tape(tape, "dropout");
    Tensor y = empty_like(x.shape(), ctx), mask = empty_like(x.shape(), ctx);
    k::dropout_forward(p_, hash64(hash64(ctx.seed, salt_), calls_++), x.view(), y.view(),
                       mask.view(), ctx.stream);
    tape->push(mask);
    return y;
  }
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) override {
    if (p_ == 0.0f) return dy;
    Tensor mask = tape.pop();
    Tensor dx = empty_like(dy.shape(), ctx);
    k::dropout_backward(mask.view(), dy.view(), dx.view(), ctx.stream);
    return dx;
  }

 private:
  float p_;
  uint64_t salt_;
  uint64_t calls_ = 0;
};

// --- composites -----------------------------------------------------------------------------------

class Residual : public Layer {
 public:
  Residual(std::unique_ptr<Sequential> main, std::unique_ptr<Sequential> shortcut, bool relu_after)
      : main_(std::move(main)), shortcut_(std::move(shortcut)), relu_after_(relu_after) {}
  std::string describe() const override {
    return "residual[" + main_->describe() + (shortcut_ ? " | " + shortcut_->describe() : std::string(" | identity")) +
           "]" + (relu_after_ ? " relu" : "");
  }
  Shape4 out_shape(Shape4 in) const override {
    const Shape4 a = main_->out_shape(in);
    const Shape4 b = shortcut_ ? shortcut_->out_shape(in) : in;
    if (!(a == b)) throw ShapeError("residual: main path gives " + a.str() + " but shortcut gives " + b.str());
    return a;
  }
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override {
    Tensor a = main_->forward(x, tape, ctx);
    Tensor b = shortcut_ ? shortcut_->forward(x, tape, ctx) : x;
    if (!(a.shape() == b.shape())) out_shape(x.shape());  // throws with the shapes
    Tensor y = empty_like(a.shape(), ctx);
    k::add_forward(a.view(), b.view(), y.view(), ctx.stream);
    if (relu_after_) {
      k::relu_forward(y.view(), y.view(), ctx.stream);
      if (ctx.training) tape->push(y);
    }
    return y;
  }
  Tensor backward(const Tensor& dy_in, Tape& tape, const Context& ctx) override {
    Tensor dy = dy_in;
    if (relu_after_) {
      Tensor y = tape.pop();
      dy = empty_like(dy_in.shape(), ctx);
      k::relu_backward(y.view(), dy_in.view(), dy.view(), ctx.stream);
    }
    Context inner = ctx;
    inner.input_grad = true;  // both paths' input gradients are summed below
    Tensor db = shortcut_ ? shortcut_->backward(dy, tape, inner) : dy;
    Tensor da = main_->backward(dy, tape, inner);
    if (!ctx.input_grad) return {};
    Tensor dx = empty_like(da.shape(), ctx);
    k::add_forward(da.view(), db.view(), dx.view(), ctx.stream);
    return dx;
  }
  void collect_params(const std::string& prefix, std::vector<Param*>& out) override {
    main_->collect_params(prefix + "main.", out);
    if (shortcut_) shortcut_->collect_params(prefix + "shortcut.", out);
  }
  void collect_buffers(const std::string& prefix, std::vector<Buffer>& out) override {
    main_->collect_buffers(prefix + "main.", out);
    if (shortcut_) shortcut_->collect_buffers(prefix + "shortcut.", out);
  }
  int64_t flops(Shape4 in) const override {
    return main_->flops(in) + (shortcut_ ? shortcut_->flops(in) : 0) + main_->out_shape(in).numel();
  }
  void to(Device d) override {
    main_->to(d);
    if (shortcut_) shortcut_->to(d);
  }
  bool replayable() const override { return main_->replayable() && (!shortcut_ || shortcut_->replayable()); }
  LayerPtr stacked(int k) const override {
    return std::make_unique<Residual>(main_->stacked_sequential(k), shortcut_ ? shortcut_->stacked_sequential(k) : nullptr,
                                      relu_after_);
  }

 private:
  std::unique_ptr<Sequential> main_, shortcut_;
  bool relu_after_;
};

class SqueezeExcite : public Layer {
 public:
  SqueezeExcite(int c, int reduced, uint64_t seed) : c_(c), r_(reduced) {
    squeeze_.add(make_global_avg_pool())
        .add(make_conv2d(c, reduced, 1, 1, 0, 1, true, hash64(seed, 1)))
        .add(make_relu())
        .add(make_conv2d(reduced, c, 1, 1, 0, 1, true, hash64(seed, 2)))
        .add(make_hardsigmoid());
  }
  // Stacked: the squeeze path's layers stacked (its 1x1 convolutions grouped per replica).
  SqueezeExcite(int c, int reduced, std::unique_ptr<Sequential> squeeze) : c_(c), r_(reduced), squeeze_(std::move(*squeeze)) {}
  std::string describe() const override { return "se " + std::to_string(c_) + "/" + std::to_string(r_); }
  LayerPtr stacked(int k) const override {
    return std::make_unique<SqueezeExcite>(c_ * k, r_ * k, squeeze_.stacked_sequential(k));
  }
  Shape4 out_shape(Shape4 in) const override {
    squeeze_.out_shape(in);
    return in;
  }
  Tensor forward(const Tensor& x, Tape* tape, const Context& ctx) override {
    Tensor s = squeeze_.forward(x, tape, ctx);
    Tensor y = empty_like(x.shape(), ctx);
    k::channel_mul_forward(x.view(), s.view(), y.view(), ctx.stream);
    if (ctx.training) {
      tape->push(x);
      tape->push(s);
    }
    return y;
  }
  Tensor backward(const Tensor& dy, Tape& tape, const Context& ctx) override {
    Tensor s = tape.pop(), x = tape.pop();
    Tensor dx = empty_like(x.shape(), ctx), ds = empty_like(s.shape(), ctx);
    k::channel_mul_backward(x.view(), s.view(), dy.view(), dx.view(), ds.view(), ctx.stream);
    Context inner = ctx;
    inner.input_grad = true;
    Tensor dx2 = squeeze_.backward(ds, tape, inner);
    k::add_forward(dx.view(), dx2.view(), dx.view(), ctx.stream);
    return dx;
  }
  void collect_params(const std::string& prefix, std::vector<Param*>& out) override {
    squeeze_.collect_params(prefix, out);
  }
  int64_t flops(Shape4 in) const override { return squeeze_.flops(in) + in.numel(); }
  void to(Device d) override { squeeze_.to(d); }
  bool replayable() const override { return squeeze_.replayable(); }

 private:
  int c_, r_;
  Sequential squeeze_;
};

}  // namespace

// --- sequential -----------------------------------------------------------------------------------

std::string Sequential::describe() const {
  std::string s;
  for (const auto& l : layers_) {
    if (!s.empty()) s += ", ";
    s += l->describe();
  }
  return s;
}

Shape4 Sequential::out_shape(Shape4 in) const {
  for (const auto& l : layers_) in = l->out_shape(in);
  return in;
}

Tensor Sequential::forward(const Tensor& x, Tape* tape, const Context& ctx, const std::function<void(size_t)>& after) {
  Tensor h = x;
  for (size_t i = 0; i < layers_.size(); ++i) {
    h = layers_[i]->forward(h, tape, ctx);
    if (after) after(i);
  }
  return h;
}

Tensor Sequential::backward(const Tensor& dy, Tape& tape, const Context& ctx, const std::function<void(size_t)>& after) {
  Tensor d = dy;
  Context inner = ctx;
  inner.input_grad = true;
  for (size_t i = layers_.size(); i-- > 0;) {
    d = layers_[i]->backward(d, tape, i == 0 ? ctx : inner);
    if (after) after(i);
  }
  return d;
}

void Sequential::collect_params(const std::string& prefix, std::vector<Param*>& out) {
  for (size_t i = 0; i < layers_.size(); ++i) layers_[i]->collect_params(prefix + std::to_string(i) + ".", out);
}

void Sequential::collect_buffers(const std::string& prefix, std::vector<Buffer>& out) {
  for (size_t i = 0; i < layers_.size(); ++i) layers_[i]->collect_buffers(prefix + std::to_string(i) + ".", out);
}

int64_t Sequential::flops(Shape4 in) const {
  int64_t f = 0;
  for (const auto& l : layers_) {
    f += l->flops(in);
    in = l->out_shape(in);
  }
  return f;
}

void Sequential::to(Device d) {
  for (auto& l : layers_) l->to(d);
}

std::unique_ptr<Sequential> Sequential::stacked_sequential(int k) const {
  if (k < 1) throw Error(detail::concat("stacked layers: ", k, " replicas"));
  auto s = std::make_unique<Sequential>();
  for (const auto& l : layers_) s->add(l->stacked(k));
  return s;
}

bool Sequential::replayable() const {
  return std::all_of(layers_.begin(), layers_.end(), [](const LayerPtr& l) { return l->replayable(); });
}

// --- constructors ---------------------------------------------------------------------------------

LayerPtr make_conv2d(int in, int out, int k, int stride, int pad, int groups, bool bias, uint64_t seed) {
  return std::make_unique<Conv2d>(in, out, k, stride, pad, groups, bias, seed);
}
LayerPtr make_linear(int in, int out, bool bias, uint64_t seed) { return std::make_unique<Linear>(in, out, bias, seed); }
LayerPtr make_batch_norm(int c) { return std::make_unique<BatchNorm2d>(c); }
LayerPtr make_relu() { return std::make_unique<Activation>(Act::kRelu); }
LayerPtr make_hardswish() { return std::make_unique<Activation>(Act::kHardswish); }
LayerPtr make_hardsigmoid() { return std::make_unique<Activation>(Act::kHardsigmoid); }
LayerPtr make_max_pool(int k, int stride, int pad) { return std::make_unique<Pool2d>(true, k, stride, pad); }
LayerPtr make_avg_pool(int k, int stride, int pad) { return std::make_unique<Pool2d>(false, k, stride, pad); }
LayerPtr make_global_avg_pool() { return std::make_unique<GlobalAvgPool>(); }
LayerPtr make_flatten() { return std::make_unique<Flatten>(); }
LayerPtr make_dropout(float p, uint64_t salt) { return std::make_unique<Dropout>(p, salt); }
LayerPtr make_residual(std::unique_ptr<Sequential> main, std::unique_ptr<Sequential> shortcut, bool relu_after) {
  return std::make_unique<Residual>(std::move(main), std::move(shortcut), relu_after);
}
LayerPtr make_squeeze_excite(int c, int reduced, uint64_t seed) {
  return std::make_unique<SqueezeExcite>(c, reduced, seed);
}

}  // namespace pipar
