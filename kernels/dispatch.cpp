// The dispatching entry points of ops.h: validate shapes and devices once, then one switch per op on
// the device. The only file of kernels/ that knows whether the CUDA backend was built.
#include <initializer_list>
#include <string>

#include <cstdlib>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <cstring>
#include <new>

#include "kernels/device.h"
#include "kernels/ops.h"
#if PIPAR_HAS_CUDA
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/runtime_cuda.h"
#include "kernels/cuda/autotune.h"
#include "kernels/cuda/stream.h"
#endif
#include "kernels/kernel_cache.h"

namespace pipar::kernels {
namespace {

struct Arg {
  const char* name;
  Shape4 shape;
  Device device;
  bool present;
  template <class T>
  Arg(const char* n, BasicView<T> v) : name(n), shape(v.shape), device(v.device), present(v.data != nullptr) {}
};

std::string describe(std::initializer_list<Arg> args) {
  std::string s;
  for (const Arg& a : args) {
    if (!a.present) continue;
    if (!s.empty()) s += ", ";
    s += a.name;
    s += " ";
    s += a.shape.str();
  }
  return s;
}

// The one device of all present views; throws if they disagree or a required view is missing.
Device device_of(const char* op, std::initializer_list<Arg> args) {
  const Arg* first = nullptr;
  for (const Arg& a : args) {
    if (!a.present) continue;
    if (!first) first = &a;
    else if (a.device != first->device)
      throw Error(detail::concat(op, ": ", first->name, " is on ", device_name(first->device), " but ", a.name,
                                 " is on ", device_name(a.device)));
  }
  if (!first) throw Error(detail::concat(op, ": no tensor given"));
  return first->device;
}

void require(const char* op, bool ok, const char* what, std::initializer_list<Arg> args) {
  if (!ok) throw ShapeError(detail::concat(op, ": ", what, " (", describe(args), ")"));
}
void require_present(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (!a.present) throw Error(detail::concat(op, ": tensor ", a.name, " is missing (null data)"));
}

[[noreturn, maybe_unused]] void no_cuda(const char* op) {
#if PIPAR_HAS_CUDA
  throw Unsupported(detail::concat(op, ": no CUDA implementation in this build"));
#else
  throw Unsupported(detail::concat(op, ": built without CUDA (PIPAR_CUDA=OFF)"));
#endif
}

thread_local ShapeRecorder t_recorder = nullptr;
thread_local void* t_recorder_user = nullptr;

void record(bool conv, const Conv2dParams& p, ConstView x, ConstView w, ConstView b) {
  if (t_recorder == nullptr) return;
  LayerShape l;
  l.conv = conv, l.p = p, l.x = x.shape, l.w = w.shape, l.bias = !b.empty();
  t_recorder(l, t_recorder_user);
}

}  // namespace

void set_shape_recorder(ShapeRecorder r, void* user) {
  t_recorder = r;
  t_recorder_user = user;
}

#ifndef PIPAR_CUDA_OPS
#define PIPAR_CUDA_OPS 0  // set to 1 once kernels/cuda implements every op of ops.h
#endif
#if PIPAR_HAS_CUDA && PIPAR_CUDA_OPS
#define PIPAR_CUDA_CALL(op, ...) cuda::op(__VA_ARGS__, s)
#else
#define PIPAR_CUDA_CALL(op, ...) ((void)s, no_cuda(#op))
#endif

// One switch per op. `args` lists every view (for device checks and messages).
#define PIPAR_DISPATCH(op, args, ...)                      \
  switch (device_of(#op, args)) {                          \
    case Device::kCpu: cpu::op(__VA_ARGS__); return;       \
    case Device::kCuda: PIPAR_CUDA_CALL(op, __VA_ARGS__); return; \
  }

#define ARGS(...) std::initializer_list<Arg>{__VA_ARGS__}
#define A(v) Arg(#v, v)

// --- convolution ----------------------------------------------------------------------------------

void conv2d_forward(const Conv2dParams& p, ConstView x, ConstView w, ConstView b, View y, StreamRef s) {
  const auto args = ARGS(A(x), A(w), A(b), A(y));
  require_present("conv2d_forward", ARGS(A(x), A(w), A(y)));
  const Shape4 ys = conv2d_out_shape(x.shape, w.shape, p);
  require("conv2d_forward", y.shape == ys, "y must be [n, k, oh, ow]", args);
  require("conv2d_forward", b.empty() || b.numel() == w.shape.n, "bias must have k elements", args);
  record(true, p, x, w, b);
  PIPAR_DISPATCH(conv2d_forward, args, p, x, w, b, y);
}

void conv2d_backward_input(const Conv2dParams& p, ConstView dy, ConstView w, View dx, StreamRef s) {
  const auto args = ARGS(A(dy), A(w), A(dx));
  require_present("conv2d_backward_input", args);
  require("conv2d_backward_input", dy.shape == conv2d_out_shape(dx.shape, w.shape, p),
          "dy must be the output shape of dx", args);
  PIPAR_DISPATCH(conv2d_backward_input, args, p, dy, w, dx);
}

void conv2d_backward_weight(const Conv2dParams& p, ConstView x, ConstView dy, View dw, StreamRef s) {
  const auto args = ARGS(A(x), A(dy), A(dw));
  require_present("conv2d_backward_weight", args);
  require("conv2d_backward_weight", dy.shape == conv2d_out_shape(x.shape, dw.shape, p),
          "dy must be the output shape of x", args);
  PIPAR_DISPATCH(conv2d_backward_weight, args, p, x, dy, dw);
}

void conv2d_backward_bias(ConstView dy, View db, StreamRef s) {
  const auto args = ARGS(A(dy), A(db));
  require_present("conv2d_backward_bias", args);
  require("conv2d_backward_bias", db.numel() == dy.shape.c, "db must have one element per channel", args);
  PIPAR_DISPATCH(conv2d_backward_bias, args, dy, db);
}

// --- linear ---------------------------------------------------------------------------------------

void grouped_linear_forward(int groups, ConstView x, ConstView w, ConstView b, View y, StreamRef s) {
  const auto args = ARGS(A(x), A(w), A(b), A(y));
  require_present("linear_forward", ARGS(A(x), A(w), A(y)));
  const Shape4 ys = linear_out_shape(x.shape, w.shape, groups);
  require("linear_forward", y.shape.n == ys.n && y.numel() == ys.numel(), "y must be [n, out]", args);
  require("linear_forward", b.empty() || b.numel() == w.shape.n, "bias must have out elements", args);
  if (groups == 1) record(false, Conv2dParams{}, x, w, b);
  PIPAR_DISPATCH(linear_forward, args, groups, x, w, b, y);
}

void grouped_linear_backward_input(int groups, ConstView dy, ConstView w, View dx, StreamRef s) {
  const auto args = ARGS(A(dy), A(w), A(dx));
  require_present("linear_backward_input", args);
  const Shape4 ys = linear_out_shape(dx.shape, w.shape, groups);
  require("linear_backward_input", dy.shape.n == ys.n && dy.numel() == ys.numel(), "dy must be [n, out]", args);
  PIPAR_DISPATCH(linear_backward_input, args, groups, dy, w, dx);
}

void grouped_linear_backward_weight(int groups, ConstView x, ConstView dy, View dw, StreamRef s) {
  const auto args = ARGS(A(x), A(dy), A(dw));
  require_present("linear_backward_weight", args);
  const Shape4 ys = linear_out_shape(x.shape, dw.shape, groups);
  require("linear_backward_weight", dy.shape.n == ys.n && dy.numel() == ys.numel(), "dy must be [n, out]", args);
  PIPAR_DISPATCH(linear_backward_weight, args, groups, x, dy, dw);
}

void linear_forward(ConstView x, ConstView w, ConstView b, View y, StreamRef s) { grouped_linear_forward(1, x, w, b, y, s); }
void linear_backward_input(ConstView dy, ConstView w, View dx, StreamRef s) { grouped_linear_backward_input(1, dy, w, dx, s); }
void linear_backward_weight(ConstView x, ConstView dy, View dw, StreamRef s) {
  grouped_linear_backward_weight(1, x, dy, dw, s);
}

void linear_backward_bias(ConstView dy, View db, StreamRef s) {
  const auto args = ARGS(A(dy), A(db));
  require_present("linear_backward_bias", args);
  require("linear_backward_bias", db.numel() == dy.shape.per_sample(), "db must have out elements", args);
  PIPAR_DISPATCH(linear_backward_bias, args, dy, db);
}

// --- activations ----------------------------------------------------------------------------------

#define PIPAR_UNARY(op)                                                            \
  void op(ConstView x, View y, StreamRef s) {                                      \
    const auto args = ARGS(A(x), A(y));                                            \
    require_present(#op, args);                                                    \
    require(#op, x.shape == y.shape, "x and y must have one shape", args);         \
    PIPAR_DISPATCH(op, args, x, y);                                                \
  }
#define PIPAR_UNARY_BACKWARD(op, in)                                                       \
  void op(ConstView in, ConstView dy, View dx, StreamRef s) {                              \
    const auto args = ARGS(A(in), A(dy), A(dx));                                           \
    require_present(#op, args);                                                            \
    require(#op, in.shape == dy.shape && dy.shape == dx.shape, "shapes must match", args); \
    PIPAR_DISPATCH(op, args, in, dy, dx);                                                  \
  }

PIPAR_UNARY(relu_forward)
PIPAR_UNARY_BACKWARD(relu_backward, y)
PIPAR_UNARY(hardswish_forward)
PIPAR_UNARY_BACKWARD(hardswish_backward, x)
PIPAR_UNARY(hardsigmoid_forward)
PIPAR_UNARY_BACKWARD(hardsigmoid_backward, x)
PIPAR_UNARY_BACKWARD(dropout_backward, mask)

// --- pooling --------------------------------------------------------------------------------------

void max_pool2d_forward(const Pool2dParams& p, ConstView x, View y, IndexView argmax, StreamRef s) {
  const auto args = ARGS(A(x), A(y), A(argmax));
  require_present("max_pool2d_forward", args);
  const Shape4 ys = pool2d_out_shape(x.shape, p);
  require("max_pool2d_forward", y.shape == ys && argmax.shape == ys, "y and argmax must be the pooled shape", args);
  PIPAR_DISPATCH(max_pool2d_forward, args, p, x, y, argmax);
}

void max_pool2d_backward(const Pool2dParams& p, ConstView dy, ConstIndexView argmax, View dx, StreamRef s) {
  const auto args = ARGS(A(dy), A(argmax), A(dx));
  require_present("max_pool2d_backward", args);
  const Shape4 ys = pool2d_out_shape(dx.shape, p);
  require("max_pool2d_backward", dy.shape == ys && argmax.shape == ys, "dy and argmax must be the pooled shape", args);
  PIPAR_DISPATCH(max_pool2d_backward, args, p, dy, argmax, dx);
}

void avg_pool2d_forward(const Pool2dParams& p, ConstView x, View y, StreamRef s) {
  const auto args = ARGS(A(x), A(y));
  require_present("avg_pool2d_forward", args);
  require("avg_pool2d_forward", y.shape == pool2d_out_shape(x.shape, p), "y must be the pooled shape", args);
  PIPAR_DISPATCH(avg_pool2d_forward, args, p, x, y);
}

void avg_pool2d_backward(const Pool2dParams& p, ConstView dy, View dx, StreamRef s) {
  const auto args = ARGS(A(dy), A(dx));
  require_present("avg_pool2d_backward", args);
  require("avg_pool2d_backward", dy.shape == pool2d_out_shape(dx.shape, p), "dy must be the pooled shape", args);
  PIPAR_DISPATCH(avg_pool2d_backward, args, p, dy, dx);
}

void global_avg_pool_forward(ConstView x, View y, StreamRef s) {
  const auto args = ARGS(A(x), A(y));
  require_present("global_avg_pool_forward", args);
  require("global_avg_pool_forward", y.shape == Shape4{x.shape.n, x.shape.c, 1, 1}, "y must be [n, c, 1, 1]", args);
  PIPAR_DISPATCH(global_avg_pool_forward, args, x, y);
}

void global_avg_pool_backward(ConstView dy, View dx, StreamRef s) {
  const auto args = ARGS(A(dy), A(dx));
  require_present("global_avg_pool_backward", args);
  require("global_avg_pool_backward", dy.shape == Shape4{dx.shape.n, dx.shape.c, 1, 1}, "dy must be [n, c, 1, 1]", args);
  PIPAR_DISPATCH(global_avg_pool_backward, args, dy, dx);
}

// --- batch norm -----------------------------------------------------------------------------------

void batch_norm_forward_train(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                              View running_mean, View running_var, View save_mean, View save_invstd, View y,
                              StreamRef s) {
  const auto args = ARGS(A(x), A(gamma), A(beta), A(running_mean), A(running_var), A(save_mean), A(save_invstd), A(y));
  require_present("batch_norm_forward_train", args);
  const int64_t c = x.shape.c;
  require("batch_norm_forward_train",
          gamma.numel() == c && beta.numel() == c && running_mean.numel() == c && running_var.numel() == c &&
              save_mean.numel() == c && save_invstd.numel() == c && y.shape == x.shape,
          "per-channel tensors need c elements and y the shape of x", args);
  require("batch_norm_forward_train", x.shape.n * x.shape.h * x.shape.w > 1,
          "training needs more than one value per channel", args);
  PIPAR_DISPATCH(batch_norm_forward_train, args, p, x, gamma, beta, running_mean, running_var, save_mean,
                 save_invstd, y);
}

void batch_norm_forward_inference(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                                  ConstView running_mean, ConstView running_var, View y, StreamRef s) {
  const auto args = ARGS(A(x), A(gamma), A(beta), A(running_mean), A(running_var), A(y));
  require_present("batch_norm_forward_inference", args);
  const int64_t c = x.shape.c;
  require("batch_norm_forward_inference",
          gamma.numel() == c && beta.numel() == c && running_mean.numel() == c && running_var.numel() == c &&
              y.shape == x.shape,
          "per-channel tensors need c elements and y the shape of x", args);
  PIPAR_DISPATCH(batch_norm_forward_inference, args, p, x, gamma, beta, running_mean, running_var, y);
}

void batch_norm_backward(ConstView x, ConstView dy, ConstView gamma, ConstView save_mean, ConstView save_invstd,
                         View dx, View dgamma, View dbeta, StreamRef s) {
  const auto args = ARGS(A(x), A(dy), A(gamma), A(save_mean), A(save_invstd), A(dx), A(dgamma), A(dbeta));
  require_present("batch_norm_backward", args);
  const int64_t c = x.shape.c;
  require("batch_norm_backward",
          dy.shape == x.shape && dx.shape == x.shape && gamma.numel() == c && save_mean.numel() == c &&
              save_invstd.numel() == c && dgamma.numel() == c && dbeta.numel() == c,
          "per-channel tensors need c elements and dy, dx the shape of x", args);
  PIPAR_DISPATCH(batch_norm_backward, args, x, dy, gamma, save_mean, save_invstd, dx, dgamma, dbeta);
}

// --- element-wise ---------------------------------------------------------------------------------

void add_forward(ConstView a, ConstView b, View y, StreamRef s) {
  const auto args = ARGS(A(a), A(b), A(y));
  require_present("add_forward", args);
  require("add_forward", a.shape == b.shape && b.shape == y.shape, "a, b and y must have one shape", args);
  PIPAR_DISPATCH(add_forward, args, a, b, y);
}

void channel_mul_forward(ConstView x, ConstView scale, View y, StreamRef s) {
  const auto args = ARGS(A(x), A(scale), A(y));
  require_present("channel_mul_forward", args);
  require("channel_mul_forward", y.shape == x.shape && scale.shape == Shape4{x.shape.n, x.shape.c, 1, 1},
          "scale must be [n, c, 1, 1] and y the shape of x", args);
  PIPAR_DISPATCH(channel_mul_forward, args, x, scale, y);
}

void channel_mul_backward(ConstView x, ConstView scale, ConstView dy, View dx, View dscale, StreamRef s) {
  const auto args = ARGS(A(x), A(scale), A(dy), A(dx), A(dscale));
  require_present("channel_mul_backward", args);
  require("channel_mul_backward",
          dy.shape == x.shape && dx.shape == x.shape && scale.shape == Shape4{x.shape.n, x.shape.c, 1, 1} &&
              dscale.shape == scale.shape,
          "scale and dscale must be [n, c, 1, 1], dy and dx the shape of x", args);
  PIPAR_DISPATCH(channel_mul_backward, args, x, scale, dy, dx, dscale);
}

void axpy(float alpha, ConstView x, View y, StreamRef s) {
  const auto args = ARGS(A(x), A(y));
  require_present("axpy", args);
  require("axpy", x.numel() == y.numel(), "x and y must have the same number of elements", args);
  PIPAR_DISPATCH(axpy, args, alpha, x, y);
}

void scale(float alpha, View x, StreamRef s) {
  const auto args = ARGS(A(x));
  require_present("scale", args);
  PIPAR_DISPATCH(scale, args, alpha, x);
}

void fill(float value, View x, StreamRef s) {
  const auto args = ARGS(A(x));
  require_present("fill", args);
  PIPAR_DISPATCH(fill, args, value, x);
}

void copy(ConstView x, View y, StreamRef s) {
  const auto args = ARGS(A(x), A(y));
  require_present("copy", args);
  require("copy", x.numel() == y.numel(), "x and y must have the same number of elements", args);
  PIPAR_DISPATCH(copy, args, x, y);
}

void dropout_forward(float p, uint64_t seed, ConstView x, View y, View mask, StreamRef s) {
  const auto args = ARGS(A(x), A(y), A(mask));
  require_present("dropout_forward", args);
  require("dropout_forward", x.shape == y.shape && y.shape == mask.shape, "x, y and mask must have one shape", args);
  if (!(p >= 0.0f && p < 1.0f)) throw Error(detail::concat("dropout_forward: p must be in [0, 1), got ", p));
  PIPAR_DISPATCH(dropout_forward, args, p, seed, x, y, mask);
}

// --- loss -----------------------------------------------------------------------------------------

void softmax_cross_entropy_forward(ConstView logits, ConstIndexView labels, View probs, View losses, StreamRef s) {
  const auto args = ARGS(A(logits), A(labels), A(probs), A(losses));
  require_present("softmax_cross_entropy_forward", args);
  const int64_t n = logits.shape.n;
  require("softmax_cross_entropy_forward",
          labels.numel() == n && probs.numel() == logits.numel() && probs.shape.n == n && losses.numel() == n,
          "labels and losses need n elements, probs the shape of logits", args);
  PIPAR_DISPATCH(softmax_cross_entropy_forward, args, logits, labels, probs, losses);
}

void softmax_cross_entropy_backward(ConstView probs, ConstIndexView labels, float scale, View dlogits, StreamRef s) {
  const auto args = ARGS(A(probs), A(labels), A(dlogits));
  require_present("softmax_cross_entropy_backward", args);
  require("softmax_cross_entropy_backward",
          labels.numel() == probs.shape.n && dlogits.numel() == probs.numel() && dlogits.shape.n == probs.shape.n,
          "labels need n elements, dlogits the shape of probs", args);
  PIPAR_DISPATCH(softmax_cross_entropy_backward, args, probs, labels, scale, dlogits);
}

// --- optimizer ------------------------------------------------------------------------------------

void sgd_step(const SgdParams& p, View param, ConstView grad, View momentum_buf, StreamRef s) {
  const auto args = ARGS(A(param), A(grad), A(momentum_buf));
  require_present("sgd_step", args);
  require("sgd_step", grad.numel() == param.numel() && momentum_buf.numel() == param.numel(),
          "param, grad and momentum buffer must have the same number of elements", args);
  PIPAR_DISPATCH(sgd_step, args, p, param, grad, momentum_buf);
}

// --- devices and memory ---------------------------------------------------------------------------

bool cuda_built() { return PIPAR_HAS_CUDA != 0; }
bool cuda_ops_built() { return PIPAR_HAS_CUDA != 0 && PIPAR_CUDA_OPS != 0; }

std::string cuda_unavailable_reason() {
#if PIPAR_HAS_CUDA
  return cuda::unavailable_reason();
#else
  return "built without CUDA (PIPAR_CUDA=OFF or no nvcc at configure time)";
#endif
}

int cuda_device_count() {
#if PIPAR_HAS_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

ScopedCudaDevice::ScopedCudaDevice(int gpu) {
  if (gpu < 0) return;
#if PIPAR_HAS_CUDA
  const int n = cuda_device_count();
  if (gpu >= n) throw Error(detail::concat("GPU ", gpu, " does not exist: this machine has ", n, " usable"));
  prev_ = cuda::current_device();
  if (prev_ != gpu) cuda::set_device(gpu);
#else
  (void)gpu;
  no_cuda("ScopedCudaDevice");
#endif
}

ScopedCudaDevice::~ScopedCudaDevice() {
#if PIPAR_HAS_CUDA
  if (prev_ < 0) return;
  try {
    cuda::set_device(prev_);
  } catch (const std::exception&) {  // errors ignored: destructors do not throw
  }
#endif
}

std::string nccl_unavailable_reason() {
#if PIPAR_HAS_NCCL
  return cuda_unavailable_reason();
#elif PIPAR_HAS_CUDA
  return "built without NCCL (no nccl.h and libnccl found at configure time; set PIPAR_NCCL_ROOT)";
#else
  return "built without CUDA";
#endif
}

GpuGroup::GpuGroup(std::vector<int> gpus) : gpus_(std::move(gpus)) {
  if (const std::string why = nccl_unavailable_reason(); !why.empty()) throw Error("NCCL: " + why);
  if (gpus_.empty()) throw Error("NCCL: a communicator needs at least one GPU");
#if PIPAR_HAS_NCCL
  for (int g : gpus_) ScopedCudaDevice check(g);  // each exists
  comms_ = cuda::nccl_init_all(gpus_);
#endif
}

GpuGroup::~GpuGroup() {
#if PIPAR_HAS_NCCL
  cuda::nccl_destroy(comms_);
#endif
}

void GpuGroup::all_reduce_sum(const std::vector<View>& bufs, const std::vector<StreamRef>& streams) {
  PIPAR_CHECK(bufs.size() == gpus_.size() && streams.size() == gpus_.size(), "all_reduce_sum: ", bufs.size(), " buffers, ",
              streams.size(), " streams for ", gpus_.size(), " GPUs");
  std::vector<float*> ptrs;
  for (const View& v : bufs) {
    PIPAR_CHECK(v.device == Device::kCuda && v.numel() == bufs[0].numel(), "all_reduce_sum: buffers must be CUDA and of one length");
    ptrs.push_back(v.data);
  }
#if PIPAR_HAS_NCCL
  cuda::nccl_all_reduce_sum(comms_, gpus_, ptrs, static_cast<size_t>(bufs[0].numel()), streams);
#else
  no_cuda("GpuGroup::all_reduce_sum");
#endif
}

std::vector<std::string> cuda_devices() {
#if PIPAR_HAS_CUDA
  if (cuda_available()) return cuda::describe_devices();
#endif
  return {};
}

std::string nccl_version() {
#if PIPAR_HAS_NCCL
  return cuda::nccl_version();
#else
  return "";
#endif
}

int64_t cuda_memory_free() {
#if PIPAR_HAS_CUDA
  return cuda_available() ? cuda::memory_free() : -1;
#else
  return -1;
#endif
}

namespace {
// Tensors and message buffers are freed and allocated again every batch. glibc serves blocks above
// 128 KiB with fresh mmaps by default, each page-faulted anew: the transport benchmark measured
// that cost; local VGG5 training showed no difference either way (3.0k samples/s both).
void tune_host_allocator() {
#if defined(__GLIBC__)
  static const bool done = [] {
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    return true;
  }();
  (void)done;
#endif
}
}  // namespace

void set_cuda_kernels(const std::string& choice) {
  if (choice != "handwritten" && choice != "vendor" && choice != "auto")
    throw Error("--kernels must be handwritten, vendor or auto, got '" + choice + "'");
#if PIPAR_HAS_CUDA
  cuda::KernelChoice c = cuda::KernelChoice::kAuto;
  cuda::parse_kernel_choice(choice, &c);
  cuda::set_kernel_choice(c);
#endif
}

std::string cuda_kernels() {
#if PIPAR_HAS_CUDA
  return cuda::kernel_choice_name(cuda::kernel_choice());
#else
  return "auto";
#endif
}

std::string cuda_kernel_cache_path() {
#if PIPAR_HAS_CUDA
  return cuda::cache_path();
#else
  return KernelCache::default_path();
#endif
}

std::vector<std::string> cuda_kernel_choices() {
#if PIPAR_HAS_CUDA
  if (cuda_available()) return cuda::cached_choices();
#endif
  return {};
}

namespace {
thread_local StreamRef t_current_stream{};
}  // namespace

StreamRef current_stream() { return t_current_stream; }
ScopedStream::ScopedStream(StreamRef s) : prev_(t_current_stream) { t_current_stream = s; }
ScopedStream::~ScopedStream() { t_current_stream = prev_; }

DeviceStream::DeviceStream(Device d) {
  if (d == Device::kCpu) return;
#if PIPAR_HAS_CUDA
  s_ = StreamRef{cuda::Stream().release()};
#else
  no_cuda("DeviceStream");
#endif
}

DeviceStream::~DeviceStream() {
#if PIPAR_HAS_CUDA
  if (!s_.is_null()) cuda::Stream::from_native(s_.native);  // destroyed here, with its workspace
#endif
}

void DeviceStream::synchronize() const {
#if PIPAR_HAS_CUDA
  if (!s_.is_null()) cuda::synchronize(s_);
#endif
}

DeviceGraph::~DeviceGraph() {
#if PIPAR_HAS_CUDA
  cuda::graph_destroy(exec_);
#endif
}

DeviceGraph& DeviceGraph::operator=(DeviceGraph&& o) noexcept {
  if (this != &o) {
#if PIPAR_HAS_CUDA
    cuda::graph_destroy(exec_);
#endif
    exec_ = o.exec_;
    o.exec_ = nullptr;
  }
  return *this;
}

void DeviceGraph::capture(StreamRef s, const std::function<void()>& fn) {
#if PIPAR_HAS_CUDA
  ScopedStream on(s);
  void* exec = cuda::graph_capture(s, fn);
  cuda::graph_destroy(exec_);
  exec_ = exec;
#else
  (void)s, (void)fn;
  no_cuda("DeviceGraph::capture");
#endif
}

void DeviceGraph::launch(StreamRef s) const {
  PIPAR_CHECK(exec_ != nullptr, "launch of a CUDA graph never captured");
#if PIPAR_HAS_CUDA
  cuda::graph_launch(exec_, s);
#else
  (void)s;
#endif
}

const void* stream_workspace_id(StreamRef s) {
#if PIPAR_HAS_CUDA
  if (!s.is_null()) return cuda::workspace_id(s);
#endif
  (void)s;
  return nullptr;
}

void* device_alloc(Device d, size_t bytes) {
  if (d == Device::kCpu) {
    tune_host_allocator();
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (!p) throw Error(detail::concat("out of host memory allocating ", bytes, " bytes"));
    return p;
  }
#if PIPAR_HAS_CUDA
  return cuda::malloc_device(bytes, t_current_stream);
#else
  no_cuda("device_alloc");
#endif
}

void device_free(Device d, void* p, StreamRef alloc_stream) noexcept {
  if (!p) return;
  if (d == Device::kCpu) {
    std::free(p);
    return;
  }
#if PIPAR_HAS_CUDA
  // Stream-ordered only on the stream it came from, and only while that stream is known to be alive
  // (it is this thread's current one); else cudaFree, which also frees pool memory.
  const bool ordered = !alloc_stream.is_null() && alloc_stream.native == t_current_stream.native;
  cuda::free_device(p, ordered ? alloc_stream : StreamRef{});
#else
  (void)alloc_stream;
#endif
}

void* pinned_alloc(size_t bytes, bool* pinned) {
  *pinned = false;
#if PIPAR_HAS_CUDA
  if (cuda_available()) {
    *pinned = true;
    return cuda::malloc_host_pinned(bytes);
  }
#endif
  return device_alloc(Device::kCpu, bytes);
}

void pinned_free(void* p, bool pinned) noexcept {
  if (!p) return;
#if PIPAR_HAS_CUDA
  if (pinned) {
    cuda::free_host_pinned(p);
    return;
  }
#else
  (void)pinned;
#endif
  device_free(Device::kCpu, p);
}

void device_copy(Device dst_dev, void* dst, Device src_dev, const void* src, size_t bytes, StreamRef s) {
  if (bytes == 0) return;
  if (dst_dev == Device::kCpu && src_dev == Device::kCpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if PIPAR_HAS_CUDA
  const int kind = src_dev == Device::kCpu ? 0 : dst_dev == Device::kCpu ? 1 : 2;
  if (s.is_null() && !t_current_stream.is_null()) {
    // Complete on return, and after everything already queued on the current stream.
    cuda::memcpy_async(dst, src, bytes, kind, t_current_stream);
    cuda::synchronize(t_current_stream);
    return;
  }
  cuda::memcpy_async(dst, src, bytes, kind, s);
#else
  (void)s;
  no_cuda("device_copy");
#endif
}

}  // namespace pipar::kernels
