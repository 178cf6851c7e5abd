// The model zoo of the paper, each model an ordered list of split-able blocks, for 1x28x28
// (MNIST, Fashion-MNIST) and 3x32x32 (CIFAR-10) inputs.
#include "runtime/model.h"

#include <algorithm>
#include <cmath>

#include "kernels/rng.h"

namespace pipar {

// --- Model ----------------------------------------------------------------------------------------

Model& Model::add(std::string kind, std::unique_ptr<Sequential> body) {
  blocks_.push_back({std::move(kind), std::move(body)});
  return *this;
}

void Model::check_range(size_t begin, size_t end) const {
  if (begin > end || end > blocks_.size())
    throw Error(detail::concat(name_, ": block range [", begin, ", ", end, ") outside [0, ", blocks_.size(), "]"));
}

Tensor Model::forward(const Tensor& x, Tape* tape, const Context& ctx, size_t begin, size_t end) {
  end = clamp_end(end);
  check_range(begin, end);
  Tensor h = x;
  for (size_t i = begin; i < end; ++i) h = blocks_[i].body->forward(h, tape, ctx);
  return h;
}

Tensor Model::backward(const Tensor& dy, Tape& tape, const Context& ctx, size_t begin, size_t end) {
  end = clamp_end(end);
  check_range(begin, end);
  Tensor d = dy;
  Context inner = ctx;
  inner.input_grad = true;
  for (size_t i = end; i-- > begin;) d = blocks_[i].body->backward(d, tape, i == begin ? ctx : inner);
  return d;
}

std::vector<Param*> Model::params(size_t begin, size_t end) {
  end = clamp_end(end);
  check_range(begin, end);
  std::vector<Param*> out;
  for (size_t i = begin; i < end; ++i) blocks_[i].body->collect_params("block" + std::to_string(i + 1) + ".", out);
  return out;
}

std::vector<Buffer> Model::buffers(size_t begin, size_t end) {
  end = clamp_end(end);
  check_range(begin, end);
  std::vector<Buffer> out;
  for (size_t i = begin; i < end; ++i) blocks_[i].body->collect_buffers("block" + std::to_string(i + 1) + ".", out);
  return out;
}

int64_t Model::param_count(size_t begin, size_t end) {
  int64_t n = 0;
  for (Param* p : params(begin, end)) n += p->value.numel();
  return n;
}

Shape4 Model::block_out_shape(size_t i) const {
  PIPAR_CHECK(i < blocks_.size(), "block ", i, " of ", blocks_.size());
  Shape4 s = options_.input;
  s.n = 1;
  for (size_t b = 0; b <= i; ++b) s = blocks_[b].body->out_shape(s);
  return s;
}

int64_t Model::forward_flops(size_t begin, size_t end) const {
  end = clamp_end(end);
  check_range(begin, end);
  Shape4 s = options_.input;
  s.n = 1;
  int64_t f = 0;
  for (size_t b = 0; b < end; ++b) {
    if (b >= begin) f += blocks_[b].body->flops(s);
    s = blocks_[b].body->out_shape(s);
  }
  return f;
}

void Model::zero_grad() {
  for (Param* p : params()) p->grad.zero();
}

void Model::to(Device d) {
  for (auto& b : blocks_) b.body->to(d);
  device_ = d;
}

bool Model::replayable(size_t begin, size_t end) const {
  end = clamp_end(end);
  check_range(begin, end);
  for (size_t b = begin; b < end; ++b)
    if (!blocks_[b].body->replayable()) return false;
  return true;
}

void check_split(const Model& m, size_t p) {
  if (p < 1 || p >= m.num_blocks())
    throw Error(detail::concat("split point ", p, " is outside 1..", m.num_blocks() - 1, " for ", m.name(), " (",
                               m.num_blocks(), " blocks)"));
}

// --- builders -------------------------------------------------------------------------------------
namespace {

// Rounds channels to a multiple of 8 (at least 8), as MobileNet does; also used for width scaling.
int make_divisible(double v, int divisor = 8) {
  int r = std::max(divisor, static_cast<int>(v + divisor / 2.0) / divisor * divisor);
  if (r < 0.9 * v) r += divisor;
  return r;
}

class Builder {
 public:
  explicit Builder(const ModelOptions& o) : o_(o) {}
  uint64_t next_seed() { return hash64(o_.seed, counter_++); }
  int ch(int c) const { return o_.width == 1.0f ? c : std::max(4, static_cast<int>(std::lround(c * o_.width))); }

 private:
  const ModelOptions& o_;
  uint64_t counter_ = 0;
};

std::unique_ptr<Sequential> seq() { return std::make_unique<Sequential>(); }

void check_input(const std::string& name, const ModelOptions& o) {
  if (o.input.c < 1 || o.input.h < 4 || o.input.w < 4 || o.num_classes < 2)
    throw Error(detail::concat(name, ": input ", o.input.str(), " with ", o.num_classes,
                               " classes is not supported (need c >= 1, h and w >= 4, classes >= 2)"));
}

// A conv+BN+ReLU(+maxpool) unit; without batch norm the conv has a bias.
std::unique_ptr<Sequential> conv_unit(Builder& b, int in, int out, bool bn, bool pool) {
  auto s = seq();
  s->add(make_conv2d(in, out, 3, 1, 1, 1, !bn, b.next_seed()));
  if (bn) s->add(make_batch_norm(out));
  s->add(make_relu());
  if (pool) s->add(make_max_pool(2, 2));
  return s;
}

std::unique_ptr<Model> build_vgg(const std::string& name, const std::vector<int>& cfg, int dense_hidden, int dense_blocks,
                                 const ModelOptions& o) {
  // cfg: channel counts, -1 = max-pool after the previous conv. A pool is dropped once the feature
  // map is 1x1 (28x28 inputs allow only four halvings).
  Builder b(o);
  auto m = std::make_unique<Model>(name, o);
  int in = static_cast<int>(o.input.c);
  int64_t h = o.input.h, w = o.input.w;
  for (size_t i = 0; i < cfg.size(); ++i) {
    if (cfg[i] < 0) continue;
    const bool pool = i + 1 < cfg.size() && cfg[i + 1] < 0 && h >= 2 && w >= 2;
    const int out = b.ch(cfg[i]);
    m->add("conv", conv_unit(b, in, out, o.batch_norm, pool));
    in = out;
    if (pool) h /= 2, w /= 2;
  }
  int features = static_cast<int>(in * h * w);
  const int hidden = b.ch(dense_hidden);
  for (int d = 0; d < dense_blocks; ++d) {
    auto s = seq();
    if (d == 0) s->add(make_flatten());
    const bool last = d + 1 == dense_blocks;
    s->add(make_linear(features, last ? o.num_classes : hidden, true, b.next_seed()));
    if (!last) s->add(make_relu());
    m->add("dense", std::move(s));
    features = hidden;
  }
  return m;
}

// ResNet basic block (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 with expansion 4).
std::unique_ptr<Sequential> resnet_block(Builder& b, int in, int planes, int stride, bool bottleneck, int* out_channels) {
  auto main = seq();
  int out;
  if (!bottleneck) {
    out = planes;
    main->add(make_conv2d(in, planes, 3, stride, 1, 1, false, b.next_seed())).add(make_batch_norm(planes)).add(make_relu());
    main->add(make_conv2d(planes, planes, 3, 1, 1, 1, false, b.next_seed())).add(make_batch_norm(planes));
  } else {
    out = planes * 4;
    main->add(make_conv2d(in, planes, 1, 1, 0, 1, false, b.next_seed())).add(make_batch_norm(planes)).add(make_relu());
    main->add(make_conv2d(planes, planes, 3, stride, 1, 1, false, b.next_seed())).add(make_batch_norm(planes)).add(make_relu());
    main->add(make_conv2d(planes, out, 1, 1, 0, 1, false, b.next_seed())).add(make_batch_norm(out));
  }
  std::unique_ptr<Sequential> shortcut;
  if (stride != 1 || in != out) {
    shortcut = seq();
    shortcut->add(make_conv2d(in, out, 1, stride, 0, 1, false, b.next_seed())).add(make_batch_norm(out));
  }
  *out_channels = out;
  auto s = seq();
  s->add(make_residual(std::move(main), std::move(shortcut), true));
  return s;
}

std::unique_ptr<Model> build_resnet(const std::string& name, const std::vector<int>& counts, bool bottleneck,
                                    const ModelOptions& o) {
  Builder b(o);
  auto m = std::make_unique<Model>(name, o);
  const int stem = b.ch(64);
  auto s = seq();
  s->add(make_conv2d(static_cast<int>(o.input.c), stem, 3, 1, 1, 1, false, b.next_seed())).add(make_batch_norm(stem)).add(make_relu());
  m->add("conv", std::move(s));
  int in = stem;
  const int planes[4] = {64, 128, 256, 512};
  for (int stage = 0; stage < 4; ++stage)
    for (int i = 0; i < counts[stage]; ++i) {
      int out = 0;
      m->add(bottleneck ? "bottleneck" : "residual",
             resnet_block(b, in, b.ch(planes[stage]), stage > 0 && i == 0 ? 2 : 1, bottleneck, &out));
      in = out;
    }
  auto head = seq();
  head->add(make_global_avg_pool()).add(make_flatten()).add(make_linear(in, o.num_classes, true, b.next_seed()));
  m->add("dense", std::move(head));
  return m;
}

struct Bneck {
  int k, exp, out;
  bool se, hs;
  int stride;
};

LayerPtr act(bool hs) { return hs ? make_hardswish() : make_relu(); }

std::unique_ptr<Model> build_mobilenetv3(const std::string& name, const std::vector<Bneck>& cfg, int last_conv,
                                         int last_dense, const ModelOptions& o) {
  // Small inputs (28x28, 32x32): the stem keeps stride 1 so that four stride-2 bottlenecks leave 2x2.
  Builder b(o);
  auto m = std::make_unique<Model>(name, o);
  auto ch = [&](int c) { return o.width == 1.0f ? c : make_divisible(c * o.width); };
  int in = ch(16);
  auto stem = seq();
  stem->add(make_conv2d(static_cast<int>(o.input.c), in, 3, 1, 1, 1, false, b.next_seed())).add(make_batch_norm(in)).add(make_hardswish());
  m->add("conv", std::move(stem));
  for (const Bneck& c : cfg) {
    const int exp = ch(c.exp), out = ch(c.out);
    auto body = seq();
    if (exp != in) body->add(make_conv2d(in, exp, 1, 1, 0, 1, false, b.next_seed())).add(make_batch_norm(exp)).add(act(c.hs));
    body->add(make_conv2d(exp, exp, c.k, c.stride, c.k / 2, exp, false, b.next_seed())).add(make_batch_norm(exp)).add(act(c.hs));
    if (c.se) body->add(make_squeeze_excite(exp, make_divisible(exp / 4.0), b.next_seed()));
    body->add(make_conv2d(exp, out, 1, 1, 0, 1, false, b.next_seed())).add(make_batch_norm(out));
    if (c.stride == 1 && in == out) {
      auto s = seq();
      s->add(make_residual(std::move(body), nullptr, false));
      m->add("bottleneck", std::move(s));
    } else {
      m->add("bottleneck", std::move(body));
    }
    in = out;
  }
  const int lc = ch(last_conv);
  auto last = seq();
  last->add(make_conv2d(in, lc, 1, 1, 0, 1, false, b.next_seed())).add(make_batch_norm(lc)).add(make_hardswish());
  m->add("conv", std::move(last));
  const int ld = ch(last_dense);
  auto d1 = seq();
  d1->add(make_global_avg_pool()).add(make_flatten()).add(make_linear(lc, ld, true, b.next_seed())).add(make_hardswish());
  m->add("dense", std::move(d1));
  auto d2 = seq();
  d2->add(make_linear(ld, o.num_classes, true, b.next_seed()));
  m->add("dense", std::move(d2));
  return m;
}

}  // namespace

std::vector<std::string> model_names() {
  return {"vgg5", "vgg11", "vgg16", "resnet18", "resnet50", "mobilenetv3-small", "mobilenetv3-large"};
}

std::unique_ptr<Model> build_model(const std::string& name_in, const ModelOptions& o) {
  std::string name = name_in;
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  check_input(name, o);
  const int M = -1;
  if (name == "vgg5") return build_vgg(name, {32, M, 64, M, 64}, 128, 2, o);
  if (name == "vgg11") return build_vgg(name, {64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M}, 512, 3, o);
  if (name == "vgg16")
    return build_vgg(name, {64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M}, 512, 3, o);
  if (name == "resnet18") return build_resnet(name, {2, 2, 2, 2}, false, o);
  if (name == "resnet50") return build_resnet(name, {3, 4, 6, 3}, true, o);
  if (name == "mobilenetv3-small" || name == "mobilenetv3small")
    return build_mobilenetv3("mobilenetv3-small",
                             {{3, 16, 16, true, false, 2},
                              {3, 72, 24, false, false, 2},
                              {3, 88, 24, false, false, 1},
                              {5, 96, 40, true, true, 2},
                              {5, 240, 40, true, true, 1},
                              {5, 240, 40, true, true, 1},
                              {5, 120, 48, true, true, 1},
                              {5, 144, 48, true, true, 1},
                              {5, 288, 96, true, true, 2},
                              {5, 576, 96, true, true, 1},
                              {5, 576, 96, true, true, 1}},
                             576, 1024, o);
  if (name == "mobilenetv3-large" || name == "mobilenetv3large")
    return build_mobilenetv3("mobilenetv3-large",
                             {{3, 16, 16, false, false, 1},
                              {3, 64, 24, false, false, 2},
                              {3, 72, 24, false, false, 1},
                              {5, 72, 40, true, false, 2},
                              {5, 120, 40, true, false, 1},
                              {5, 120, 40, true, false, 1},
                              {3, 240, 80, false, true, 2},
                              {3, 200, 80, false, true, 1},
                              {3, 184, 80, false, true, 1},
                              {3, 184, 80, false, true, 1},
                              {3, 480, 112, true, true, 1},
                              {3, 672, 112, true, true, 1},
                              {5, 672, 160, true, true, 2},
                              {5, 960, 160, true, true, 1},
                              {5, 960, 160, true, true, 1}},
                             960, 1280, o);
  std::string known;
  for (const auto& n : model_names()) known += (known.empty() ? "" : ", ") + n;
  throw Error("unknown model '" + name_in + "'; known models: " + known);
}

}  // namespace pipar
