// Server throughput against the number of devices: K server-side replicas (each its own weights) of
// a model cut at P, one micro-batch of m samples each, trained one replica at a time on all the
// server's threads (what a server without cross-device batching does), against the same K
// micro-batches trained as one group by ServerLanes (replicas side by side on shares of the cores).
// Both in one process, alternating, median over repeats; prints micro-batches per second and the ratio.
// --backend cuda: the replicas on the GPU, each server part on its own stream (as the CUDA server runs
// them), one at a time against up to --lanes host threads driving their streams at once (default
// min(K, 8), the server's), micro-batches replayed as CUDA graphs unless --graphs off; where the
// concurrent rate stops growing with K, the GPU is busy.
// Third, the K replicas stacked (runtime/replica_stack.h: every layer runs all K in one call; at most
// --stack-max replicas a stack, default 64): ratios stacked/one-at-a-time and stacked/lanes.
// --stack-profile: then where a stacked group's time goes (ReplicaStack::Profile: host assembly,
// upload, each block's forward and backward, loss, download; the device waited for after each).
// --busy-seconds S (CUDA): then the GPU's busy fraction while each way runs for S seconds (NVML's
// utilization.gpu, bench/gpu_busy.h): where the rate stops growing, is the GPU busy or waiting on the host?
// Run: build/bench/pipar_bench_server [--models vgg5:2,resnet18:3] [--devices 1,4,16,64] [--micro 10]
//      [--threads T] [--repeats R] [--min-seconds S] [--backend cpu|cuda] [--lanes L] [--graphs on|off]
//      [--stack-max S] (0: no stacked column) [--stack-profile] [--busy-seconds S]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bench/gpu_busy.h"
#include "bench/harness.h"
#include "kernels/device.h"
#include "kernels/parallel.h"
#include "runtime/lanes.h"
#include "runtime/replica_stack.h"

using namespace pipar;
using namespace pipar::bench;

namespace {

// Every replica of a stack.
std::vector<int> all_of(const ReplicaStack& s) {
  std::vector<int> r(static_cast<size_t>(s.replicas()));
  for (size_t i = 0; i < r.size(); ++i) r[i] = static_cast<int>(i);
  return r;
}

// Three profiled passes of the stacks: milliseconds per group by phase, and the blocks that take the
// most (forward + backward).
template <class Pass>
void print_stack_profile(const std::string& model, int k, std::vector<std::unique_ptr<ReplicaStack>>& stacks, Pass pass) {
  for (auto& st : stacks) st->set_profiling(true);
  for (int i = 0; i < 3; ++i) pass();
  ReplicaStack::Profile sum = stacks[0]->profile();
  for (size_t i = 1; i < stacks.size(); ++i) {
    const ReplicaStack::Profile& p = stacks[i]->profile();
    sum.groups += p.groups, sum.assemble += p.assemble, sum.upload += p.upload, sum.loss += p.loss;
    sum.download += p.download;
    for (size_t b = 0; b < sum.forward.size(); ++b) sum.forward[b] += p.forward[b], sum.backward[b] += p.backward[b];
  }
  for (auto& st : stacks) st->set_profiling(false);
  const double per = 1e3 / static_cast<double>(std::max<int64_t>(sum.groups, 1));
  double fwd = 0, bwd = 0;
  for (size_t b = 0; b < sum.forward.size(); ++b) fwd += sum.forward[b], bwd += sum.backward[b];
  const double total = sum.assemble + sum.upload + fwd + sum.loss + bwd + sum.download;
  std::printf("#   stack profile %s K=%d, %lld groups of up to %d: ms per group: assemble %.3f, upload %.3f, forward %.3f, "
              "loss %.3f, backward %.3f, download %.3f; sum %.3f\n",
              model.c_str(), k, static_cast<long long>(sum.groups), stacks[0]->replicas(), sum.assemble * per,
              sum.upload * per, fwd * per, sum.loss * per, bwd * per, sum.download * per, total * per);
  std::vector<size_t> order(sum.forward.size());
  for (size_t b = 0; b < order.size(); ++b) order[b] = b;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return sum.forward[a] + sum.backward[a] > sum.forward[b] + sum.backward[b];
  });
  for (size_t i = 0; i < order.size() && i < 4; ++i) {
    const size_t b = order[i];
    std::string what = sum.blocks[b].substr(0, 70);
    std::printf("#     part block %zu: forward %.3f, backward %.3f ms per group: %s\n", b, sum.forward[b] * per,
                sum.backward[b] * per, what.c_str());
  }
}

struct Replica {
  std::unique_ptr<Model> model;
  std::unique_ptr<ServerPart> part;
  Tensor x, y;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> models = {"vgg5:2", "resnet18:3"};
  std::vector<int> devices = {1, 4, 16, 64};
  int micro = 10, repeats = 5, threads = 0, cuda_lanes = 0, stack_max = 64;
  double min_seconds = 0.3, busy_seconds = 0;
  std::string backend = "cpu";
  bool graphs = true, stack_profile = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return option_value(argc, argv, i); };
    if (a == "--models") models = split_list(next());
    else if (a == "--devices") {
      devices.clear();
      for (const auto& d : split_list(next())) devices.push_back(std::atoi(d.c_str()));
    } else if (a == "--micro") micro = std::atoi(next().c_str());
    else if (a == "--threads") threads = std::atoi(next().c_str());
    else if (a == "--repeats") repeats = std::atoi(next().c_str());
    else if (a == "--min-seconds") min_seconds = std::atof(next().c_str());
    else if (a == "--backend") backend = next();
    else if (a == "--lanes") cuda_lanes = std::atoi(next().c_str());
    else if (a == "--graphs") graphs = next() != "off";
    else if (a == "--stack-max") stack_max = std::atoi(next().c_str());
    else if (a == "--stack-profile") stack_profile = true;
    else if (a == "--busy-seconds") busy_seconds = std::atof(next().c_str());
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  kernels::set_num_threads(threads);
  const int t = kernels::num_threads();
  if (backend != "cpu" && backend != "cuda") {
    std::fprintf(stderr, "--backend must be cpu or cuda\n");
    return 2;
  }
  const Device device = backend == "cuda" ? Device::kCuda : Device::kCpu;
  if (device == Device::kCuda && !kernels::cuda_available()) {
    std::fprintf(stderr, "pipar_bench_server: --backend cuda: %s\n", kernels::cuda_unavailable_reason().c_str());
    return 77;  // skipped: no GPU
  }
  if (device == Device::kCuda)
    std::printf("# server throughput, CUDA backend (a stream per replica, CUDA graphs %s, kernels %s), host %s, commit %s\n",
                graphs ? "on" : "off", kernels::cuda_kernels().c_str(), cpu_model().c_str(), git_commit().c_str());
  else
    std::printf("# server throughput, CPU backend: %s, %d threads, %s, commit %s\n", cpu_model().c_str(), t,
                kernels::isa_name(kernels::cpu_isa()), git_commit().c_str());
  std::printf("# one micro-batch of %d per replica per group; median of %d repeats (min..max)\n", micro, repeats);
  std::unique_ptr<GpuBusy> nvml;
  if (busy_seconds > 0) {
    if (device != Device::kCuda) {
      std::printf("# GPU busy fraction: not measured (CPU backend)\n");
    } else {
      nvml = std::make_unique<GpuBusy>();
      if (!nvml->ok()) std::printf("# GPU busy fraction: not measured: %s\n", nvml->why_not().c_str());
    }
  }
  std::printf("%-10s %5s %7s %22s %22s %7s %22s %10s %11s\n", "model", "K", "lanes", "one-at-a-time mb/s", "grouped mb/s",
              "ratio", "stacked mb/s", "stack/one", "stack/lanes");
  for (const std::string& spec : models) {
    const auto colon = spec.find(':');
    const std::string name = spec.substr(0, colon);
    const size_t split = colon == std::string::npos ? 2 : std::strtoul(spec.c_str() + colon + 1, nullptr, 10);
    for (int k : devices) {
      std::vector<Replica> reps(static_cast<size_t>(k));
      for (int d = 0; d < k; ++d) {
        ModelOptions o;
        o.seed = 100 + static_cast<uint64_t>(d);
        Replica& r = reps[static_cast<size_t>(d)];
        r.model = build_model(name, o);
        r.model->to(device);
        r.part = std::make_unique<ServerPart>(*r.model, split, kernels::SgdParams{}, device);
        r.part->set_graphs(graphs && device == Device::kCuda);
        Shape4 cut = r.model->block_out_shape(split - 1);
        cut.n = micro;
        std::vector<float> xs(static_cast<size_t>(cut.numel()));
        for (size_t i = 0; i < xs.size(); ++i) xs[i] = static_cast<float>((i * 2654435761u + d) % 1000) / 500.0f - 1.0f;
        std::vector<int32_t> ys(static_cast<size_t>(micro));
        for (int i = 0; i < micro; ++i) ys[static_cast<size_t>(i)] = (i + d) % 10;
        r.x = Tensor::from_vector(xs, cut);
        r.y = Tensor::from_vector(ys, {micro, 1, 1, 1});
      }
      const auto [lanes, per_lane] =
          device == Device::kCuda ? ServerLanes::cuda_lanes(k, cuda_lanes) : ServerLanes::split_cores(k, t);
      ServerLanes pool(lanes, per_lane);
      std::vector<std::unique_ptr<ReplicaStack>> stacks;  // replicas [i*stack_max, ...) in stack i
      for (int s0 = 0; stack_max > 0 && s0 < k; s0 += stack_max) {
        const int ks = std::min(stack_max, k - s0);
        stacks.push_back(std::make_unique<ReplicaStack>(*reps[0].model, split, ks, kernels::SgdParams{}, device));
        for (int r = 0; r < ks; ++r) stacks.back()->load(r, *reps[static_cast<size_t>(s0 + r)].model);
      }
      // One pass over the K replicas each way; each repeat runs passes for at least min_seconds.
      auto sequential = [&] {
        for (Replica& r : reps) r.part->train_micro(r.x, r.y, 100);
      };
      auto grouped = [&] {
        std::vector<ServerLanes::Item> items(reps.size());
        for (size_t d = 0; d < reps.size(); ++d)
          items[d].part = reps[d].part.get(), items[d].activation = reps[d].x, items[d].labels = reps[d].y, items[d].batch_size = 100;
        pool.train(items);
        for (const auto& it : items)
          if (it.error) std::rethrow_exception(it.error);
      };
      auto stacked = [&] {
        for (size_t i = 0; i < stacks.size(); ++i) {
          std::vector<ReplicaStack::Item> items;
          for (int r = 0; r < stacks[i]->replicas(); ++r) {
            const Replica& rp = reps[i * static_cast<size_t>(stack_max) + static_cast<size_t>(r)];
            items.push_back({r, rp.x, rp.y});
          }
          stacks[i]->train_micro(items, 100);
        }
      };
      auto rate = [&](auto&& pass) {
        int passes = 0;
        const auto t0 = std::chrono::steady_clock::now();
        do {
          pass();
          ++passes;
        } while (seconds_since(t0) < min_seconds);
        return passes * k / seconds_since(t0);
      };
      sequential(), grouped(), stacked();  // warm-up: first-touch of every replica's buffers, thread teams
      std::vector<double> seq, grp, ratio, stk, stk_one, stk_lanes;
      for (int i = 0; i < repeats; ++i) {
        const double a = rate(sequential), b = rate(grouped), c = stacks.empty() ? 0.0 : rate(stacked);
        seq.push_back(a), grp.push_back(b), ratio.push_back(b / a);
        stk.push_back(c), stk_one.push_back(c / a), stk_lanes.push_back(c / b);
        for (Replica& r : reps) r.part->step();  // the accumulated gradients applied and zeroed, as a batch's end does
        for (auto& st : stacks) st->step(all_of(*st));
      }
      const Stats s = summarize(seq), g = summarize(grp), q = summarize(ratio);
      const Stats sk = summarize(stk), so = summarize(stk_one), sl = summarize(stk_lanes);
      char lane_text[32];
      std::snprintf(lane_text, sizeof lane_text, "%dx%d", lanes, per_lane);
      std::printf("%-10s %5d %7s %9.1f (%.1f..%.1f) %9.1f (%.1f..%.1f) %6.2fx %9.1f (%.1f..%.1f) %9.2fx %10.2fx\n",
                  name.c_str(), k, lane_text, s.median, s.min, s.max, g.median, g.min, g.max, q.median, sk.median, sk.min,
                  sk.max, so.median, sl.median);
      if (stack_profile && !stacks.empty()) print_stack_profile(name, k, stacks, [&] { stacked(); });
      if (nvml && nvml->ok()) {
        const double b1 = nvml->measure(sequential, busy_seconds), b2 = nvml->measure(grouped, busy_seconds),
                     b3 = stacks.empty() ? -1 : nvml->measure(stacked, busy_seconds);
        for (Replica& r : reps) r.part->step();
        for (auto& st : stacks) st->step(all_of(*st));
        auto pct = [](double f) { return f < 0 ? std::string("-") : std::to_string(static_cast<int>(f * 100 + 0.5)) + "%"; };
        std::printf("#   %s K=%d GPU busy (NVML utilization.gpu, %.1f s each way): one at a time %s, lanes %s, stacked %s\n",
                    name.c_str(), k, busy_seconds, pct(b1).c_str(), pct(b2).c_str(), pct(b3).c_str());
      }
      std::fflush(stdout);
    }
  }
  return 0;
}
