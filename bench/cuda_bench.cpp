// The conv and linear layers of real models' server parts through the CUDA kernels: our hand-written
// GEMM path against cuBLAS (kernels::cuda::set_gemm_backend under the "handwritten" kernel choice) and
// against the vendor choice (cuDNN's fastest deterministic algorithm for convolutions, cuBLAS for
// linear layers), forward, backward-input and backward-weight(+bias) timed separately on one stream
// with CUDA events, medians over repeats. "base" is the hand-written path under GemmPlanning::kBaseline
// (64x64 tiles, a GEMM per sample: the path before the 128x128 tile and the folding of samples).
// The layers are not typed in here: a CPU forward of the model's server part at each micro-batch
// size records the shapes of every conv2d_forward and linear_forward it calls (set_shape_recorder).
// Identical shapes are timed once and counted as often as the part has them.
// bench/cuda_vs_torch.py runs this with --json and times PyTorch (cuDNN and cuBLAS, TF32 off) on the
// same shapes on the same GPU, for the ratios of the CUDA backend issue.
// Then a whole server step of each model's part at each micro-batch size (ms, autotuned kernels), and
// the overlap figure: two replicas of a server part (each its own weights) training micro-batches
// one after the other on one stream, against both at once on two threads with a stream each; wall
// time, median over repeats (the issue: two streams under 0.7x of one after the other, on shapes where
// neither fills the GPU).
// Run: build/bench/pipar_bench_cuda [--models vgg5:2:fmnist,resnet18:3:cifar10] [--micro 10,25,100]
//      [--repeats 15] [--min-ms 0.5] [--json PATH] [--list] [--no-layers] [--no-steps]
//      [--overlap resnet18:3:cifar10,...] [--overlap-micro 10] [--overlap-steps 20]
// --list prints the recorded layers and exits (needs no GPU). Exits 77 (skipped) with the reason where no CUDA device is usable.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/harness.h"
#include "kernels/cuda/autotune.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/stream.h"
#include "kernels/device.h"
#include "kernels/ops.h"
#include "runtime/loss.h"
#include "runtime/model.h"

using namespace pipar;
using namespace pipar::bench;
namespace k = pipar::kernels;
namespace kc = pipar::kernels::cuda;

namespace {

struct Spec {
  std::string model, dataset;
  size_t split;
};

Spec parse_spec(const std::string& s) {
  const auto parts = split_list(s, ':');
  if (parts.size() != 3) throw Error("--models: MODEL:SPLIT:DATASET, e.g. vgg5:2:fmnist (got '" + s + "')");
  return {parts[0], parts[2], std::strtoul(parts[1].c_str(), nullptr, 10)};
}

Shape4 input_of(const std::string& dataset) {
  if (dataset == "fmnist" || dataset == "mnist") return {1, 1, 28, 28};
  if (dataset == "cifar10") return {1, 3, 32, 32};
  throw Error("unknown dataset '" + dataset + "' (fmnist, mnist, cifar10)");
}

// A layer's shape as a map key: conv?, kernel, stride, pad, groups, x, w, bias.
using Key = std::tuple<bool, int, int, int, int, int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, bool>;
Key key_of(const k::LayerShape& l) {
  return {l.conv, l.p.kh, l.p.kw, l.p.sh, l.p.sw, l.p.ph, l.p.pw, l.p.groups, l.x.n, l.x.c, l.x.h, l.x.w,
          l.w.n, l.w.c, l.w.h, l.w.w, l.bias};
}

struct Recorded {
  k::LayerShape shape;
  int count = 0;
};

// The server part's layers at micro-batch m, in order of first call, identical shapes merged.
std::vector<Recorded> record_layers(const Spec& spec, int micro) {
  ModelOptions o;
  o.input = input_of(spec.dataset);
  auto model = build_model(spec.model, o);
  check_split(*model, spec.split);
  Shape4 cut = model->block_out_shape(spec.split - 1);
  cut.n = micro;
  Tensor x = Tensor::zeros(cut);
  std::vector<k::LayerShape> seen;
  k::set_shape_recorder([](const k::LayerShape& l, void* u) { static_cast<std::vector<k::LayerShape>*>(u)->push_back(l); },
                        &seen);
  Context ctx;
  ctx.training = false;
  try {
    model->forward(x, nullptr, ctx, spec.split);
  } catch (...) {
    k::set_shape_recorder(nullptr, nullptr);
    throw;
  }
  k::set_shape_recorder(nullptr, nullptr);
  std::vector<Recorded> out;
  std::map<Key, size_t> index;
  for (const auto& l : seen) {
    auto [it, fresh] = index.try_emplace(key_of(l), out.size());
    if (fresh) out.push_back({l, 0});
    ++out[it->second].count;
  }
  return out;
}

// --- device buffers ---------------------------------------------------------------------------------

struct DeviceBuffer {
  float* p = nullptr;
  Shape4 shape;
  DeviceBuffer(Shape4 s, std::mt19937& rng, StreamRef st) : shape(s) {
    p = static_cast<float*>(k::device_alloc(Device::kCuda, sizeof(float) * static_cast<size_t>(s.numel())));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> h(static_cast<size_t>(s.numel()));
    for (auto& v : h) v = u(rng);
    k::device_copy(Device::kCuda, p, Device::kCpu, h.data(), sizeof(float) * h.size(), st);
  }
  ~DeviceBuffer() { k::device_free(Device::kCuda, p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  View view() { return {p, shape, Device::kCuda}; }
  ConstView cview() const { return {p, shape, Device::kCuda}; }
  std::vector<float> host(const kc::Stream& st) const {
    std::vector<float> h(static_cast<size_t>(shape.numel()));
    k::device_copy(Device::kCpu, h.data(), Device::kCuda, p, sizeof(float) * h.size(), st.ref());
    st.synchronize();
    return h;
  }
};

// Median milliseconds of one call of f: each sample times `inner` back-to-back calls between two
// events, inner chosen so that a sample lasts at least min_ms (short kernels are launch-bound).
template <class F>
Stats time_ms(F&& f, const kc::Stream& st, int repeats, double min_ms) {
  kc::Event e0(kc::Event::Kind::kTiming), e1(kc::Event::Kind::kTiming);
  for (int i = 0; i < 3; ++i) f();  // warm-up: workspace growth, cuBLAS handle, caches
  e0.record(st), f(), e1.record(st), e1.synchronize();
  const double one = std::max(1e-3, static_cast<double>(kc::Event::elapsed_ms(e0, e1)));
  const int inner = std::max(1, static_cast<int>(std::ceil(min_ms / one)));
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    e0.record(st);
    for (int i = 0; i < inner; ++i) f();
    e1.record(st);
    e1.synchronize();
    ms.push_back(static_cast<double>(kc::Event::elapsed_ms(e0, e1)) / inner);
  }
  return summarize(ms);
}

const char* kPasses[] = {"forward", "backward_input", "backward_weight"};

std::string describe(const k::LayerShape& l) {
  char buf[160];
  if (l.conv)
    std::snprintf(buf, sizeof buf, "conv %dx%d s%d p%d g%d %lld->%lld @%lldx%lld", l.p.kh, l.p.kw, l.p.sh, l.p.ph,
                  l.p.groups, static_cast<long long>(l.x.c), static_cast<long long>(l.w.n),
                  static_cast<long long>(l.x.h), static_cast<long long>(l.x.w));
  else
    std::snprintf(buf, sizeof buf, "linear %lld->%lld", static_cast<long long>(l.w.c * l.w.h * l.w.w),
                  static_cast<long long>(l.w.n));
  return buf;
}

// --- overlap of two replicas on two streams ----------------------------------------------------------

struct Replica {
  std::unique_ptr<Model> model;
  Tensor x, y;  // one micro-batch at the cut, on the GPU
};

Replica make_replica(const Spec& spec, int micro, uint64_t seed) {
  ModelOptions o;
  o.input = input_of(spec.dataset);
  o.seed = seed;
  Replica r;
  r.model = build_model(spec.model, o);
  check_split(*r.model, spec.split);
  r.model->to(Device::kCuda);
  Shape4 cut = r.model->block_out_shape(spec.split - 1);
  cut.n = micro;
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> xs(static_cast<size_t>(cut.numel()));
  for (auto& v : xs) v = u(rng);
  std::vector<int32_t> ys(static_cast<size_t>(micro));
  for (auto& v : ys) v = static_cast<int32_t>(rng() % 10);
  r.x = Tensor::from_vector(xs, cut).to(Device::kCuda);
  r.y = Tensor::from_vector(ys, {micro, 1, 1, 1}).to(Device::kCuda);
  return r;
}

// One server step of one replica on the current stream (forward, loss, backward to the cut, SGD
// step), with no host read (the loss statistics stay on the GPU).
void server_step(Replica& r, size_t split, StreamRef s) {
  Context ctx;
  ctx.device = Device::kCuda;
  ctx.stream = s;
  const std::vector<Param*> params = r.model->params(split);
  Sgd opt(kernels::SgdParams{});
  {
    Tape tape;
    Tensor logits = r.model->forward(r.x, &tape, ctx, split);
    Tensor losses, probs, dlogits;
    softmax_cross_entropy_queued(logits, r.y, 1.0f / static_cast<float>(logits.shape().n), losses, probs, &dlogits, ctx.stream);
    r.model->backward(dlogits, tape, ctx, split);
    opt.step(params, ctx.stream);
    Sgd::zero_grad(params);
  }
}

// `steps` server steps of one replica on stream st; returns once st is idle. With a graph (captured
// by capture_step), each step is one replay of it.
void server_steps(Replica& r, size_t split, int steps, const kernels::DeviceStream& st,
                  const kernels::DeviceGraph* graph = nullptr) {
  kernels::ScopedStream on(st.ref());
  for (int i = 0; i < steps; ++i) graph ? graph->launch(st.ref()) : server_step(r, split, st.ref());
  st.synchronize();
}

// One server step captured as a CUDA graph (after warm-up steps: kernel choices timed, workspace
// grown); what the runtime's CUDA server replays per micro-batch (ServerPart::set_graphs), here with
// the SGD step in it too.
kernels::DeviceGraph capture_step(Replica& r, size_t split, const kernels::DeviceStream& st) {
  kernels::DeviceGraph g;
  g.capture(st.ref(), [&] { server_step(r, split, st.ref()); });
  return g;
}

// Milliseconds per server step of one replica (median over repeats of `steps` steps each, wall clock
// to an idle stream), launched kernel by kernel and replayed as a CUDA graph, alternating: what
// bench/cuda_vs_torch.py puts beside PyTorch eager on the same server part. The graph's time is
// negative where the step could not be captured (the reason on stderr).
std::pair<Stats, Stats> step_ms(const Spec& spec, int micro, int steps, int repeats) {
  Replica r = make_replica(spec, micro, 41);
  kernels::DeviceStream st(Device::kCuda);
  server_steps(r, spec.split, 2, st);  // warm-up: autotuning, pools
  std::optional<kernels::DeviceGraph> graph;
  try {
    graph = capture_step(r, spec.split, st);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "step %s:%zu micro %d: no CUDA graph: %s\n", spec.model.c_str(), spec.split, micro, e.what());
  }
  std::vector<double> eager, graphed;
  for (int i = 0; i < repeats; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    server_steps(r, spec.split, steps, st);
    eager.push_back(seconds_since(t0) * 1e3 / steps);
    if (!graph) continue;
    t0 = std::chrono::steady_clock::now();
    server_steps(r, spec.split, steps, st, &*graph);
    graphed.push_back(seconds_since(t0) * 1e3 / steps);
  }
  return {summarize(eager), graph ? summarize(graphed) : Stats{-1, -1, -1}};
}

// Two replicas' steps one after the other (both on stream sa) against side by side (a on sa, b on sb,
// each driven by a host thread of its own), launched kernel by kernel, and again with each step
// replayed as the replica's CUDA graph (as the runtime's CUDA server trains, ServerPart::set_graphs):
// there the host's per-step work (dispatch, pool, launches) is one graph launch, so what is left to
// overlap is the GPU's.
void overlap(const Spec& spec, int micro, int steps, int repeats) {
  Replica a = make_replica(spec, micro, 31), b = make_replica(spec, micro, 32);
  kernels::DeviceStream sa(Device::kCuda), sb(Device::kCuda);
  server_steps(a, spec.split, 2, sa), server_steps(b, spec.split, 2, sb);  // warm-up: autotuning, pools
  std::optional<kernels::DeviceGraph> ga, gb;
  try {
    ga = capture_step(a, spec.split, sa);
    gb = capture_step(b, spec.split, sb);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "overlap %s:%zu micro %d: no CUDA graph: %s\n", spec.model.c_str(), spec.split, micro, e.what());
    ga.reset(), gb.reset();
  }
  const std::string name = spec.model + ":" + std::to_string(spec.split) + ":" + spec.dataset;
  for (const bool graphs : {false, true}) {
    if (graphs && !ga) continue;
    const kernels::DeviceGraph* pa = graphs ? &*ga : nullptr;
    const kernels::DeviceGraph* pb = graphs ? &*gb : nullptr;
    std::vector<double> one, two, ratio;
    for (int r = 0; r < repeats; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      server_steps(a, spec.split, steps, sa, pa);
      server_steps(b, spec.split, steps, sa, pb);
      const double seq = seconds_since(t0) * 1e3;
      t0 = std::chrono::steady_clock::now();
      std::thread ta([&] { server_steps(a, spec.split, steps, sa, pa); });
      std::thread tb([&] { server_steps(b, spec.split, steps, sb, pb); });
      ta.join(), tb.join();
      const double par = seconds_since(t0) * 1e3;
      one.push_back(seq), two.push_back(par), ratio.push_back(par / seq);
    }
    const Stats o = summarize(one), t = summarize(two), q = summarize(ratio);
    std::printf("overlap %-28s micro %3d, %d steps each%s: one after the other %8.2f ms, two streams %8.2f ms, "
                "ratio %.2f (%.2f..%.2f; goal < 0.7)\n",
                name.c_str(), micro, steps, graphs ? " as CUDA graphs" : "", o.median, t.median, q.median, q.min, q.max);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> models = {"vgg5:2:fmnist", "vgg16:4:cifar10", "resnet18:3:cifar10",
                                     "mobilenetv3-small:4:cifar10"};
  std::vector<int> micros = {10, 25, 100};
  int repeats = 15;
  double min_ms = 0.5;
  std::string json_path;
  bool list = false, layers = true, steps = true;
  std::vector<std::string> overlap_models = {"resnet18:3:cifar10", "mobilenetv3-small:4:cifar10", "vgg5:2:fmnist"};
  int overlap_micro = 10, overlap_steps = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return option_value(argc, argv, i); };
    if (a == "--models") models = split_list(next());
    else if (a == "--micro") {
      micros.clear();
      for (const auto& m : split_list(next())) micros.push_back(std::atoi(m.c_str()));
    } else if (a == "--repeats") repeats = std::max(1, std::atoi(next().c_str()));
    else if (a == "--min-ms") min_ms = std::atof(next().c_str());
    else if (a == "--json") json_path = next();
    else if (a == "--list") list = true;
    else if (a == "--no-layers") layers = false;
    else if (a == "--no-steps") steps = false;
    else if (a == "--overlap") overlap_models = split_list(next());
    else if (a == "--overlap-micro") overlap_micro = std::max(1, std::atoi(next().c_str()));
    else if (a == "--overlap-steps") overlap_steps = std::max(1, std::atoi(next().c_str()));
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (list) {
    try {
      for (const std::string& s : models)
        for (int micro : micros)
          for (const Recorded& r : record_layers(parse_spec(s), micro))
            std::printf("%-28s %5d %-44s x%d  in [%lld, %lld, %lld, %lld]\n", s.c_str(), micro, describe(r.shape).c_str(),
                        r.count, static_cast<long long>(r.shape.x.n), static_cast<long long>(r.shape.x.c),
                        static_cast<long long>(r.shape.x.h), static_cast<long long>(r.shape.x.w));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "pipar_bench_cuda: %s\n", e.what());
      return 1;
    }
    return 0;
  }
  if (const std::string why = k::cuda_unavailable_reason(); !why.empty()) {
    std::printf("# pipar_bench_cuda: skipped: %s\n", why.c_str());
    return 77;
  }
  try {
    kc::Stream st;
    kc::reset_tuner("");  // vendor choices timed afresh in this run, not read from an earlier one
    std::printf("# CUDA layers: commit %s; hand-written GEMM path vs cuBLAS vs vendor (cuDNN conv / cuBLAS linear; FP32, "
                "no TF32), one stream, CUDA events, "
                "median of %d samples of >= %.2f ms\n",
                git_commit().c_str(), repeats, min_ms);
    std::printf("%-22s %5s %-40s %4s %-16s %10s %10s %10s %10s %8s %9s\n", "model:split", "micro", "layer", "x", "pass",
                "base ms", "hand ms", "cublas ms", "vendor ms", "vend/hand", "max|diff|");
    nlohmann::json out = {{"commit", git_commit()}, {"layers", nlohmann::json::array()}, {"steps", nlohmann::json::array()}};
    std::mt19937 rng(20261130);
    for (const std::string& s : layers ? models : std::vector<std::string>{}) {
      const Spec spec = parse_spec(s);
      for (int micro : micros) {
        double total[4] = {0, 0, 0, 0};  // hand, cublas, vendor, hand with the baseline planning
        for (const Recorded& r : record_layers(spec, micro)) {
          const k::LayerShape& l = r.shape;
          const Shape4 ys = l.conv ? k::conv2d_out_shape(l.x, l.w, l.p) : k::linear_out_shape(l.x, l.w);
          DeviceBuffer x(l.x, rng, st), w(l.w, rng, st), y(ys, rng, st), dy(ys, rng, st), dx(l.x, rng, st), dw(l.w, rng, st),
              b({l.w.n, 1, 1, 1}, rng, st), db({l.w.n, 1, 1, 1}, rng, st);
          const ConstView bias = l.bias ? b.cview() : ConstView{};
          auto pass = [&](int which) {
            if (l.conv) {
              if (which == 0) kc::conv2d_forward(l.p, x.cview(), w.cview(), bias, y.view(), st);
              else if (which == 1) kc::conv2d_backward_input(l.p, dy.cview(), w.cview(), dx.view(), st);
              else {
                kc::conv2d_backward_weight(l.p, x.cview(), dy.cview(), dw.view(), st);
                if (l.bias) kc::conv2d_backward_bias(dy.cview(), db.view(), st);
              }
            } else {
              if (which == 0) kc::linear_forward(1, x.cview(), w.cview(), bias, y.view(), st);
              else if (which == 1) kc::linear_backward_input(1, dy.cview(), w.cview(), dx.view(), st);
              else {
                kc::linear_backward_weight(1, x.cview(), dy.cview(), dw.view(), st);
                if (l.bias) kc::linear_backward_bias(dy.cview(), db.view(), st);
              }
            }
          };
          // Agreement on this shape (forward output), as a sanity check: the hand-written path (and its
          // baseline planning) against cuBLAS.
          kc::set_kernel_choice(kc::KernelChoice::kHandwritten);
          kc::set_gemm_backend(kc::GemmBackend::kHandwritten);
          pass(0);
          const auto hand_y = y.host(st);
          kc::set_gemm_planning(kc::GemmPlanning::kBaseline);
          pass(0);
          const auto base_y = y.host(st);
          kc::set_gemm_planning(kc::GemmPlanning::kAuto);
          kc::set_gemm_backend(kc::GemmBackend::kCublas);
          pass(0);
          const auto cb_y = y.host(st);
          auto rel_diff = [&](const std::vector<float>& got) {
            double diff = 0, scale = 0;
            for (size_t i = 0; i < got.size(); ++i) {
              diff = std::max(diff, static_cast<double>(std::fabs(got[i] - cb_y[i])));
              scale = std::max(scale, static_cast<double>(std::fabs(cb_y[i])));
            }
            return scale > 0 ? diff / scale : diff;
          };
          const double rel = std::max(rel_diff(hand_y), rel_diff(base_y));
          nlohmann::json times;
          for (int ps = 0; ps < 3; ++ps) {
            kc::set_kernel_choice(kc::KernelChoice::kHandwritten);
            kc::set_gemm_backend(kc::GemmBackend::kHandwritten);
            kc::set_gemm_planning(kc::GemmPlanning::kBaseline);
            const Stats hb = time_ms([&] { pass(ps); }, st, repeats, min_ms);
            kc::set_gemm_planning(kc::GemmPlanning::kAuto);
            const Stats h = time_ms([&] { pass(ps); }, st, repeats, min_ms);
            kc::set_gemm_backend(kc::GemmBackend::kCublas);
            const Stats c = time_ms([&] { pass(ps); }, st, repeats, min_ms);
            kc::set_gemm_backend(kc::GemmBackend::kHandwritten);
            kc::set_kernel_choice(kc::KernelChoice::kVendor);  // the first call (in time_ms's warm-up) autotunes
            const Stats v = time_ms([&] { pass(ps); }, st, repeats, min_ms);
            total[0] += h.median * r.count, total[1] += c.median * r.count, total[2] += v.median * r.count;
            total[3] += hb.median * r.count;
            std::printf("%-22s %5d %-40s %4d %-16s %10.4f %10.4f %10.4f %10.4f %8.2f %9.1e\n", s.c_str(), micro,
                        describe(l).c_str(), r.count, kPasses[ps], hb.median, h.median, c.median, v.median,
                        std::min(c.median, v.median) / h.median, rel);
            times[kPasses[ps]] = {{"handwritten_ms", h.median}, {"baseline_ms", hb.median}, {"cublas_ms", c.median},
                                  {"vendor_ms", v.median}};
          }
          out["layers"].push_back({{"model", spec.model}, {"split", spec.split}, {"dataset", spec.dataset},
                                   {"micro", micro}, {"count", r.count}, {"conv", l.conv},
                                   {"x", {l.x.n, l.x.c, l.x.h, l.x.w}}, {"w", {l.w.n, l.w.c, l.w.h, l.w.w}},
                                   {"kernel", {l.p.kh, l.p.kw}}, {"stride", {l.p.sh, l.p.sw}}, {"pad", {l.p.ph, l.p.pw}},
                                   {"groups", l.p.groups}, {"bias", l.bias}, {"forward_max_rel_diff", rel},
                                   {"times", times}});
          std::fflush(stdout);
        }
        std::printf("%-22s %5d %-40s %4s %-16s %10.4f %10.4f %10.4f %10.4f %8.2f\n", s.c_str(), micro,
                    "all conv+linear passes", "", "total", total[3], total[0], total[1], total[2],
                    std::min(total[1], total[2]) / total[0]);
      }
    }
    // A whole server step (forward, loss, backward to the cut, SGD) as training runs it: autotuned.
    kc::set_kernel_choice(kc::KernelChoice::kAuto);
    kc::reset_tuner("");
    for (const std::string& s : steps ? models : std::vector<std::string>{}) {
      const Spec spec = parse_spec(s);
      for (int micro : micros) {
        const auto [t, g] = step_ms(spec, micro, overlap_steps, repeats);
        std::printf("step %-28s micro %3d: %.3f ms per server step (%.3f..%.3f), autotuned kernels; as a CUDA graph "
                    "%.3f ms (%.3f..%.3f)\n",
                    s.c_str(), micro, t.median, t.min, t.max, g.median, g.min, g.max);
        std::fflush(stdout);
        out["steps"].push_back({{"model", spec.model}, {"split", spec.split}, {"dataset", spec.dataset},
                                {"micro", micro}, {"ms", t.median}, {"graph_ms", g.median}});
      }
    }
    if (!json_path.empty()) {
      std::ofstream f(json_path);
      if (!(f << out.dump() << '\n')) throw Error("cannot write " + json_path);
    }
    for (const std::string& s : overlap_models) overlap(parse_spec(s), overlap_micro, overlap_steps, repeats);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipar_bench_cuda: %s\n", e.what());
    return 1;
  }
  return 0;
}
