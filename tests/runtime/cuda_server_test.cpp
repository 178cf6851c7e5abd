// The server's side of split training on the CUDA backend (runtime/split.h): a ServerPart and a
// MiddlePart on a GPU, each on a stream of its own, against the same parts on the CPU; replicas
// driven side by side by server lanes (one stream each) against one at a time; and the profiler on
// the GPU. GPU suites (*Cuda) skip with the reason where no CUDA device is usable.
#include <gtest/gtest.h>

#include <cmath>
#include <ctime>
#include <memory>

#include "kernels/device.h"
#include "planner/profile.h"
#include "runtime/aggregation.h"
#include "runtime/lanes.h"
#include "tests/cpu_noise.h"
#include "tests/gpu.h"
#include "tests/random.h"

namespace pipar {
namespace {

struct Case {
  const char* model;
  Shape4 input;
  float width;
  size_t split;
};

const Case kCases[] = {{"vgg5", {1, 1, 28, 28}, 1.0f, 2},
                       {"resnet18", {1, 3, 32, 32}, 0.25f, 3},
                       {"mobilenetv3-small", {1, 3, 32, 32}, 0.5f, 4}};

std::unique_ptr<Model> make_model(const Case& c, uint64_t seed, Device d) {
  ModelOptions o;
  o.input = c.input;
  o.width = c.width;
  o.seed = seed;
  auto m = build_model(c.model, o);
  m->to(d);
  return m;
}

kernels::SgdParams sgd() {
  kernels::SgdParams p;
  p.lr = 0.05f, p.momentum = 0.9f, p.weight_decay = 1e-3f;
  return p;
}

Tensor random_cut(test::Rng& rng, const Model& m, size_t split, int64_t n) {
  Shape4 cut = m.block_out_shape(split - 1);
  cut.n = n;
  return Tensor::from_vector(rng.uniform_vec(static_cast<size_t>(cut.numel())), cut);
}

Tensor random_labels(test::Rng& rng, int64_t n) {
  std::vector<int32_t> ys(static_cast<size_t>(n));
  for (auto& y : ys) y = rng.integer(0, 9);
  return Tensor::from_vector(ys, {n, 1, 1, 1});
}

// Restores the CUDA kernel choice a test changed.
struct KernelChoice {
  std::string saved = kernels::cuda_kernels();
  explicit KernelChoice(const std::string& c) { kernels::set_cuda_kernels(c); }
  ~KernelChoice() { kernels::set_cuda_kernels(saved); }
};

// Two batches of three odd micro-batches (host tensors in, as the server receives them), a step after
// each: every micro-batch's cut gradient (returned on the host) and loss, and the weights after each
// step, agree with the CPU part's. Tolerances as TrainingCuda.StepMatchesCpuForEveryModelFamily: 2e-3
// relative (2-norm) for gradients and weights, or no more than 10 times the CPU's own gap between its
// default and generic ISA (tests/cpu_noise.h: ResNet18's cut gradient at random weights, MobileNetV3's
// zero-but-for-rounding shifts); 1e-4 for the loss; FP32 both sides, sums in another order.
TEST(ServerPartCuda, MicroBatchesAndStepsMatchCpu) {
  PIPAR_REQUIRE_CUDA();
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.model);
    test::Rng rng(static_cast<uint64_t>(time(nullptr)));
    SCOPED_TRACE(test::seed_trace());
    auto cpu_model = make_model(c, 21, Device::kCpu);
    auto generic_model = make_model(c, 21, Device::kCpu);
    auto gpu_model = make_model(c, 21, Device::kCuda);
    ServerPart cpu(*cpu_model, c.split, sgd());
    ServerPart generic(*generic_model, c.split, sgd());  // on the generic ISA: the CPU's own rounding
    ServerPart gpu(*gpu_model, c.split, sgd(), Device::kCuda);
    EXPECT_EQ(gpu.device(), Device::kCuda);
    const int64_t sizes[] = {7, 5, 6};
    for (int batch = 0; batch < 2; ++batch) {
      for (int64_t n : sizes) {
        const Tensor x = random_cut(rng, *cpu_model, c.split, n), y = random_labels(rng, n);
        const ServerPart::Result rc = cpu.train_micro(x, y, 18);
        const ServerPart::Result rg = gpu.train_micro(x, y, 18);
        ServerPart::Result rn;
        {
          test::OnIsa on(kernels::Isa::kGeneric);
          rn = generic.train_micro(x, y, 18);
        }
        EXPECT_EQ(rg.grad.device(), Device::kCpu);
        ASSERT_EQ(rg.grad.shape(), x.shape());
        const test::CpuGap g = test::gap_to_cpu(rg.grad.to_vector(), rc.grad.to_vector(), rn.grad.to_vector(), 2e-3);
        EXPECT_TRUE(g.ok) << "batch " << batch << " micro " << n << ": cut gradient's relative error " << g.relative
                          << ", the CPU's own (generic ISA) " << g.cpu_noise;
        EXPECT_NEAR(rg.stats.loss_sum, rc.stats.loss_sum, 1e-4 * std::max(1.0, std::fabs(rc.stats.loss_sum)));
        EXPECT_EQ(rg.stats.count, rc.stats.count);
      }
      cpu.step();
      gpu.step();
      {
        test::OnIsa on(kernels::Isa::kGeneric);
        generic.step();
      }
      const auto pc = cpu_model->params(c.split), pn = generic_model->params(c.split), pg = gpu_model->params(c.split);
      ASSERT_EQ(pc.size(), pg.size());
      for (size_t i = 0; i < pc.size(); ++i) {
        const test::CpuGap g = test::gap_to_cpu(pg[i]->value.to_vector(), pc[i]->value.to_vector(), pn[i]->value.to_vector(), 2e-3);
        EXPECT_TRUE(g.ok) << "batch " << batch << " parameter " << i << " (" << pc[i]->name << "): relative error "
                          << g.relative << ", the CPU's own (generic ISA) " << g.cpu_noise;
      }
    }
  }
}

// The middle of a U-shaped split on the GPU: its output and the cut gradient (both back on the host)
// agree with the CPU's, forwards in flight out of order; the step too. Tolerances as above.
TEST(ServerPartCuda, MiddlePartMatchesCpu) {
  PIPAR_REQUIRE_CUDA();
  const Case c = kCases[1];  // resnet18: residual blocks and batch-norm in the middle
  test::Rng rng(static_cast<uint64_t>(time(nullptr)) + 7);
  SCOPED_TRACE(test::seed_trace());
  auto cpu_model = make_model(c, 5, Device::kCpu);
  auto gpu_model = make_model(c, 5, Device::kCuda);
  const size_t end = cpu_model->num_blocks() - 1;
  MiddlePart cpu(*cpu_model, c.split, end, sgd());
  MiddlePart gpu(*gpu_model, c.split, end, sgd(), Device::kCuda);
  std::vector<Tensor> xs;
  for (int64_t n : {3, 8}) xs.push_back(random_cut(rng, *cpu_model, c.split, n));
  for (int64_t k = 0; k < 2; ++k) {
    const Tensor oc = cpu.forward(k, xs[static_cast<size_t>(k)]), og = gpu.forward(k, xs[static_cast<size_t>(k)]);
    EXPECT_EQ(og.device(), Device::kCpu);
    ASSERT_EQ(og.shape(), oc.shape());
    EXPECT_LT(relative_error(og.to_vector(), oc.to_vector()), 2e-3) << "forward " << k;
  }
  for (int64_t k = 1; k >= 0; --k) {  // gradients come back in another order than the forwards went
    Shape4 s = *cpu.pending(k);
    const Tensor g = Tensor::from_vector(rng.uniform_vec(static_cast<size_t>(s.numel())), s);
    const Tensor dc = cpu.backward(k, g), dg = gpu.backward(k, g);
    EXPECT_EQ(dg.device(), Device::kCpu);
    EXPECT_LT(relative_error(dg.to_vector(), dc.to_vector()), 2e-3) << "backward " << k;
  }
  EXPECT_EQ(gpu.pending(0), nullptr);
  cpu.step();
  gpu.step();
  const auto pc = cpu_model->params(c.split, end), pg = gpu_model->params(c.split, end);
  for (size_t i = 0; i < pc.size(); ++i)
    EXPECT_LT(relative_error(pg[i]->value.to_vector(), pc[i]->value.to_vector()), 2e-3) << "parameter " << i;
  // A forward still in flight when the part goes (a device dropped): its tape is released with it.
  gpu.forward(9, xs[0]);
}

// Five replicas with their own weights on the GPU: groups trained side by side by four lanes (each
// part on its own stream) give bit for bit what training each alone gives. The hand-written kernels
// (fixed launch shapes, no atomics), so no timing-dependent choice enters either run.
TEST(ServerPartCuda, LanesOnStreamsEqualOneAtATime) {
  PIPAR_REQUIRE_CUDA();
  KernelChoice hand("handwritten");
  const Case c = kCases[1];
  test::Rng rng(static_cast<uint64_t>(time(nullptr)) + 3);
  SCOPED_TRACE(test::seed_trace());
  const int k = 5;
  std::vector<std::unique_ptr<Model>> ma, mb;
  std::vector<std::unique_ptr<ServerPart>> grouped, alone;
  for (int i = 0; i < k; ++i) {
    const uint64_t seed = 100 + static_cast<uint64_t>(rng.integer(0, 1 << 20));
    ma.push_back(make_model(c, seed, Device::kCuda));
    mb.push_back(make_model(c, seed, Device::kCuda));
    grouped.push_back(std::make_unique<ServerPart>(*ma.back(), c.split, sgd(), Device::kCuda));
    alone.push_back(std::make_unique<ServerPart>(*mb.back(), c.split, sgd(), Device::kCuda));
  }
  ServerLanes lanes(4, 1);
  const int64_t sizes[2][5] = {{3, 7, 2, 5, 9}, {6, 2, 11, 4, 3}};
  for (int round = 0; round < 2; ++round) {
    std::vector<ServerLanes::Item> items(k);
    for (int i = 0; i < k; ++i) {
      const int64_t n = sizes[round][i];
      items[static_cast<size_t>(i)].part = grouped[static_cast<size_t>(i)].get();
      items[static_cast<size_t>(i)].activation = random_cut(rng, *ma[0], c.split, n);
      items[static_cast<size_t>(i)].labels = random_labels(rng, n);
      items[static_cast<size_t>(i)].batch_size = 2 * n + 1;
    }
    lanes.train(items);
    for (int i = 0; i < k; ++i) {
      const ServerLanes::Item& it = items[static_cast<size_t>(i)];
      ASSERT_FALSE(it.error) << "replica " << i;
      const ServerPart::Result r = alone[static_cast<size_t>(i)]->train_micro(it.activation, it.labels, it.batch_size);
      EXPECT_EQ(it.result.grad.to_vector(), r.grad.to_vector()) << "round " << round << " replica " << i;
      EXPECT_EQ(it.result.stats.loss_sum, r.stats.loss_sum) << "round " << round << " replica " << i;
      grouped[static_cast<size_t>(i)]->step();
      alone[static_cast<size_t>(i)]->step();
    }
  }
  for (int i = 0; i < k; ++i) {
    const auto pa = ma[static_cast<size_t>(i)]->params(), pb = mb[static_cast<size_t>(i)]->params();
    for (size_t j = 0; j < pa.size(); ++j)
      EXPECT_EQ(pa[j]->value.to_vector(), pb[j]->value.to_vector()) << "replica " << i << " parameter " << j;
  }
}

// CUDA graphs: a part replaying captured micro-batches gives bit for bit what the same part run
// uncaptured gives (the same kernels, queued by a replay instead of one launch each), over batches of
// uneven micro-batches with steps in between, and again after its weights were loaded anew (the
// graphs, which hold the old addresses, must be captured again, not replayed).
TEST(ServerPartCuda, GraphsReplayTheUncapturedArithmetic) {
  PIPAR_REQUIRE_CUDA();
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.model);
    test::Rng rng(static_cast<uint64_t>(time(nullptr)) + 11);
    SCOPED_TRACE(test::seed_trace());
    auto ma = make_model(c, 8, Device::kCuda), mb = make_model(c, 8, Device::kCuda);
    ServerPart graphed(*ma, c.split, sgd(), Device::kCuda), eager(*mb, c.split, sgd(), Device::kCuda);
    graphed.set_graphs(true);
    EXPECT_EQ(graphed.graph_stats().off_reason, "");
    const int64_t sizes[] = {7, 6, 6};
    for (int batch = 0; batch < 4; ++batch) {
      if (batch == 2) {  // as FedAvg does at a round's end: new tensors for every weight
        auto fresh = make_model(c, 99, Device::kCpu);
        load_state(*ma, copy_state(*fresh));
        load_state(*mb, copy_state(*fresh));
      }
      for (int64_t n : sizes) {
        const Tensor x = random_cut(rng, *ma, c.split, n), y = random_labels(rng, n);
        const ServerPart::Result rg = graphed.train_micro(x, y, 19), re = eager.train_micro(x, y, 19);
        EXPECT_EQ(rg.grad.to_vector(), re.grad.to_vector()) << "batch " << batch << " micro " << n;
        EXPECT_EQ(rg.stats.loss_sum, re.stats.loss_sum) << "batch " << batch << " micro " << n;
        EXPECT_EQ(rg.stats.correct, re.stats.correct);
      }
      graphed.step();
      eager.step();
    }
    const auto pa = ma->params(), pb = mb->params();
    for (size_t j = 0; j < pa.size(); ++j) EXPECT_EQ(pa[j]->value.to_vector(), pb[j]->value.to_vector()) << "parameter " << j;
    for (size_t j = 0; j < ma->buffers().size(); ++j)
      EXPECT_EQ(ma->buffers()[j].value->to_vector(), mb->buffers()[j].value->to_vector()) << "buffer " << j;
    // Size 6 captured at its second micro-batch (batch 0), 7 in batch 1, both again after the load in
    // batch 2; every micro-batch from the captures on is a replay (1 + 3 + 3 + 3).
    EXPECT_EQ(graphed.graph_stats().off_reason, "");
    EXPECT_EQ(graphed.graph_stats().captures, 4);
    EXPECT_EQ(graphed.graph_stats().replays, 10);
  }
}

// The planner's server profile measured on the GPU: every block's times positive and not falling
// with the micro-batch size, the tape bytes counted, the backend named.
TEST(ServerPartCuda, ProfilerMeasuresTheGpu) {
  PIPAR_REQUIRE_CUDA();
  ModelOptions o;
  planner::ProfileOptions po;
  po.sizes = {1, 4, 16};
  po.device = Device::kCuda;
  const planner::Profile p = planner::profile_model("vgg5", o, po);
  EXPECT_EQ(p.isa, device_name(Device::kCuda));
  ASSERT_EQ(p.sizes.size(), 3u);
  for (const planner::BlockProfile& b : p.blocks) {
    for (size_t i = 0; i < b.forward_s.size(); ++i) {
      EXPECT_GT(b.forward_s[i], 0);
      EXPECT_GT(b.backward_s[i], 0);
      if (i > 0) {
        EXPECT_GE(b.forward_s[i], b.forward_s[i - 1]);
      }
    }
    EXPECT_GT(b.tape_bytes, 0);
  }
}

// FedAvg on the GPUs through NCCL (issue 8): replicas with their own weights on every GPU of the
// machine (one rank on a machine with one GPU), weighted by sample counts, one of weight 0 (a device
// that missed the round: it receives the average, adds nothing). Every replica ends equal to the host
// FedAvg (double precision) of the others, within 1e-5 relative per value: single-precision sums of
// nine terms of magnitude <= 1 (FedAvg's own error is below 1e-15).
TEST(NcclCuda, FedAvgOnGpusEqualsTheHostAverage) {
  PIPAR_REQUIRE_CUDA();
  if (const std::string why = kernels::nccl_unavailable_reason(); !why.empty()) GTEST_SKIP() << "no NCCL: " << why;
  const int gpus = kernels::cuda_device_count();
  std::vector<int> ranks;
  for (int g = 0; g < gpus; ++g) ranks.push_back(g);
  kernels::GpuGroup group(ranks);
  ASSERT_EQ(group.size(), gpus);
  test::Rng rng(static_cast<uint64_t>(time(nullptr)) + 17);
  SCOPED_TRACE(test::seed_trace());
  const Case c = kCases[1];  // resnet18: parameters and batch-norm buffers
  std::vector<std::unique_ptr<Model>> models;
  std::vector<std::vector<std::vector<Tensor*>>> replicas(static_cast<size_t>(gpus));
  std::vector<std::vector<double>> weights(static_cast<size_t>(gpus));
  std::vector<std::vector<Tensor>> host_states;
  std::vector<double> host_weights;
  for (int g = 0; g < gpus; ++g)
    for (int k = 0; k < 3; ++k) {
      kernels::ScopedCudaDevice on_gpu(g);
      models.push_back(make_model(c, 1000 + static_cast<uint64_t>(rng.integer(0, 1 << 20)), Device::kCuda));
      for (Buffer& b : models.back()->buffers())  // running statistics away from their initial values
        *b.value = Tensor::from_vector(rng.uniform_vec(static_cast<size_t>(b.value->numel()), 0.5, 1.5), b.value->shape()).to(Device::kCuda);
      const double w = (g == 0 && k == 1) ? 0.0 : static_cast<double>(rng.integer(1, 600));
      replicas[static_cast<size_t>(g)].push_back(state_tensors(*models.back()));
      weights[static_cast<size_t>(g)].push_back(w);
      if (w > 0) host_states.push_back(copy_state(*models.back())), host_weights.push_back(w);
    }
  const std::vector<Tensor> want = fedavg(host_states, host_weights);
  fedavg_on_gpus(group, replicas, weights);
  for (size_t m = 0; m < models.size(); ++m) {
    const std::vector<Tensor> got = copy_state(*models[m]);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      const std::vector<float> a = got[i].to_vector(), b = want[i].to_vector();
      size_t off = 0;
      for (size_t j = 0; j < a.size(); ++j) off += std::fabs(a[j] - b[j]) > 1e-5 * std::max(1.0f, std::fabs(b[j]));
      EXPECT_EQ(off, 0u) << "replica " << m << " tensor " << i << ": " << off << " of " << a.size() << " values off";
    }
  }
}

// Where no GPU is usable: a model left on the CPU cannot be given to a part on CUDA (a clear error,
// not a crash), and the profiler says which backend it was asked for.
TEST(ServerPart, RefusesAModelOnAnotherDevice) {
  ModelOptions o;
  auto m = build_model("vgg5", o);
  try {
    ServerPart part(*m, 2, sgd(), Device::kCuda);
    FAIL() << "a CPU model in a CUDA part must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Model::to"), std::string::npos) << e.what();
  }
  planner::ProfileOptions po;
  po.device = Device::kCuda;
  EXPECT_THROW(planner::profile_model(*m, po), Error);
  // CUDA graphs asked of a CPU part: off, saying why, and it trains as before.
  ServerPart cpu(*m, 2, sgd());
  cpu.set_graphs(true);
  EXPECT_NE(cpu.graph_stats().off_reason, "");
  test::Rng rng(3);
  const ServerPart::Result r = cpu.train_micro(random_cut(rng, *m, 2, 3), random_labels(rng, 3), 3);
  EXPECT_EQ(r.stats.count, 3);
  EXPECT_EQ(cpu.graph_stats().replays, 0);
  // NCCL where it cannot run: a clear error, not a crash.
  if (!kernels::nccl_unavailable_reason().empty()) {
    try {
      kernels::GpuGroup g({0});
      FAIL() << "a GPU group without NCCL or a GPU must be refused";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("NCCL"), std::string::npos) << e.what();
    }
  }
  kernels::ScopedCudaDevice none(-1);  // -1: no change, on any build
}

}  // namespace
}  // namespace pipar
