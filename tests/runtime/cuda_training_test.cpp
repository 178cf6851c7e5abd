// Whole models on the CUDA backend against the CPU backend: one training step (forward, loss,
// backward, SGD step) of VGG5, ResNet18 and MobileNetV3-Small on the same weights and batch; two
// replicas trained on two streams from two threads against the same done one after the other; and a
// local training run on CUDA that must learn. GPU suites (TrainingCuda*) skip with the reason where
// no CUDA device is usable; the no-GPU suite checks the error a user gets then.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <thread>

#include "kernels/device.h"
#include "runtime/loss.h"
#include "runtime/model.h"
#include "runtime/trainer.h"
#include "tests/cpu_noise.h"
#include "tests/gpu.h"
#include "tests/random.h"

namespace pipar {
namespace {

Tensor random_batch(Shape4 s, test::Rng& rng) { return Tensor::from_vector(rng.uniform_vec(s.numel(), -1, 1), s); }

Tensor random_labels(int64_t n, test::Rng& rng) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& y : v) y = rng.integer(0, 9);
  return Tensor::from_vector(v, {n, 1, 1, 1});
}

// One SGD step (trainer.h) with the default SGD parameters. Gradients are left in the parameters.
LossStats train_step(Model& m, const Tensor& x, const Tensor& y, const Context& ctx) {
  return pipar::train_step(m, x, y, ctx, kernels::SgdParams{});
}

struct Case {
  const char* model;
  Shape4 input;
  float width;
};

// Every parameter's gradient and value after one step, and the loss, agree with the CPU backend's.
// Tolerance: relative error (2-norm) 2e-3 for gradients and the updated weights (a batch-norm shift
// starts at zero, so after one step it is -lr * its gradient, with the gradient's relative error),
// or no more than 10 times the CPU's own gap between its default and generic ISA (tests/cpu_noise.h:
// MobileNetV3's zero-but-for-rounding shift gradients); 1e-4 for the loss: FP32 on both sides, only
// the order of the sums differs (GEMM tiles, reductions).
TEST(TrainingCuda, StepMatchesCpuForEveryModelFamily) {
  PIPAR_REQUIRE_CUDA();
  const Case cases[] = {{"vgg5", {1, 1, 28, 28}, 1.0f},
                        {"resnet18", {1, 3, 32, 32}, 0.25f},
                        {"mobilenetv3-small", {1, 3, 32, 32}, 0.5f}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.model);
    ModelOptions o;
    o.input = c.input;
    o.width = c.width;
    o.seed = 11;
    auto cpu = build_model(c.model, o);
    auto cpu_generic = build_model(c.model, o);
    auto gpu = build_model(c.model, o);
    test::Rng rng(static_cast<uint64_t>(time(nullptr)));
    Shape4 xs = c.input;
    xs.n = 7;  // odd, not a multiple of any tile
    const Tensor x = random_batch(xs, rng), y = random_labels(xs.n, rng);

    Context cctx;
    const LossStats lc = train_step(*cpu, x, y, cctx);
    {
      test::OnIsa generic(kernels::Isa::kGeneric);
      train_step(*cpu_generic, x, y, cctx);
    }

    kernels::DeviceStream stream(Device::kCuda);
    kernels::ScopedStream on(stream.ref());
    gpu->to(Device::kCuda);
    Context gctx;
    gctx.device = Device::kCuda;
    gctx.stream = stream.ref();
    const LossStats lg = train_step(*gpu, x, y, gctx);

    EXPECT_NEAR(lg.loss_sum, lc.loss_sum, 1e-4 * std::max(1.0, std::fabs(lc.loss_sum)));
    EXPECT_EQ(lg.count, lc.count);
    const auto pc = cpu->params(), pn = cpu_generic->params(), pg = gpu->params();
    ASSERT_EQ(pc.size(), pg.size());
    for (size_t i = 0; i < pc.size(); ++i) {
      ASSERT_EQ(pg[i]->value.device(), Device::kCuda);
      const test::CpuGap grad = test::gap_to_cpu(pg[i]->grad.to_vector(), pc[i]->grad.to_vector(), pn[i]->grad.to_vector(), 2e-3);
      EXPECT_TRUE(grad.ok) << "gradient of parameter " << i << " (" << pc[i]->name << "): relative error " << grad.relative
                           << ", the CPU's own (generic ISA) " << grad.cpu_noise;
      const test::CpuGap value = test::gap_to_cpu(pg[i]->value.to_vector(), pc[i]->value.to_vector(), pn[i]->value.to_vector(), 2e-3);
      EXPECT_TRUE(value.ok) << "parameter " << i << " (" << pc[i]->name << "): relative error " << value.relative
                            << ", the CPU's own (generic ISA) " << value.cpu_noise;
    }
  }
}

// Two replicas on two streams from two threads at once give bit for bit what each gives alone (the
// CUDA kernels have no atomics; nothing of one replica's may leak into the other's).
TEST(TrainingCuda, TwoStreamsMatchOneAfterTheOther) {
  PIPAR_REQUIRE_CUDA();
  ModelOptions o;
  o.input = {1, 3, 32, 32};
  o.width = 0.25f;
  test::Rng rng(static_cast<uint64_t>(time(nullptr)) + 1);
  const Tensor x0 = random_batch({5, 3, 32, 32}, rng), y0 = random_labels(5, rng);
  const Tensor x1 = random_batch({9, 3, 32, 32}, rng), y1 = random_labels(9, rng);
  auto run = [&](Model& m, const Tensor& x, const Tensor& y) {
    kernels::DeviceStream stream(Device::kCuda);
    kernels::ScopedStream on(stream.ref());
    m.to(Device::kCuda);
    Context ctx;
    ctx.device = Device::kCuda;
    ctx.stream = stream.ref();
    for (int step = 0; step < 3; ++step) train_step(m, x, y, ctx);
    std::vector<std::vector<float>> out;
    for (Param* p : m.params()) out.push_back(p->value.to_vector());
    return out;
  };
  o.seed = 21;
  auto a_alone = build_model("resnet18", o), a_pair = build_model("resnet18", o);
  o.seed = 22;
  auto b_alone = build_model("resnet18", o), b_pair = build_model("resnet18", o);
  const auto ra = run(*a_alone, x0, y0), rb = run(*b_alone, x1, y1);
  std::vector<std::vector<float>> pa, pb;
  std::thread ta([&] { pa = run(*a_pair, x0, y0); });
  std::thread tb([&] { pb = run(*b_pair, x1, y1); });
  ta.join(), tb.join();
  EXPECT_EQ(pa, ra);
  EXPECT_EQ(pb, rb);
}

TEST(TrainingCuda, LocalTrainingOnCudaLearns) {
  PIPAR_REQUIRE_CUDA();
  const auto dir = std::filesystem::temp_directory_path() / ("pipar_cuda_train_" + std::to_string(getpid()));
  TrainConfig c;
  c.model = "vgg5";
  c.dataset = "synthetic";
  c.backend = "cuda";
  c.limit_train = 2000;
  c.limit_test = 500;
  c.epochs = 2;
  c.batch_size = 50;
  c.seed = 3;
  c.out_dir = dir.string();
  const TrainResult r = train_local(c);
  EXPECT_GE(r.test_accuracy, 0.90);  // the CPU backend's bar for the same run (trainer_test)
  std::filesystem::remove_all(dir);
}

// The thread's current stream: nested scopes restore the outer one, other threads never see it, and
// host tensors ignore it (only CUDA memory and copies are ordered on it). No CUDA call is made here:
// the stream values are tags, never used as streams.
TEST(CurrentStream, ScopesNestAndStayOnTheirThread) {
  int a_tag = 0, b_tag = 0;
  const StreamRef a{reinterpret_cast<CUstream_st*>(&a_tag)}, b{reinterpret_cast<CUstream_st*>(&b_tag)};
  EXPECT_TRUE(kernels::current_stream().is_null());
  {
    kernels::ScopedStream outer(a);
    EXPECT_EQ(kernels::current_stream().native, a.native);
    {
      kernels::ScopedStream inner(b);
      EXPECT_EQ(kernels::current_stream().native, b.native);
      StreamRef seen{};
      std::thread([&] { seen = kernels::current_stream(); }).join();
      EXPECT_TRUE(seen.is_null()) << "another thread saw this thread's stream";
      Tensor t = Tensor::zeros({2, 3, 1, 1});  // host memory: unaffected
      EXPECT_EQ(t.to_vector(), std::vector<float>(6, 0.0f));
    }
    EXPECT_EQ(kernels::current_stream().native, a.native);
  }
  EXPECT_TRUE(kernels::current_stream().is_null());
  kernels::DeviceStream cpu(Device::kCpu);  // nothing to create on the CPU
  EXPECT_TRUE(cpu.ref().is_null());
  cpu.synchronize();
}

// Page-locked staging tensors: ordinary host tensors everywhere (aligned memory without a GPU); with
// one, a round trip through the GPU gives the values back.
TEST(PinnedTensor, IsAHostTensorOnEveryMachine) {
  Tensor f = Tensor::empty_host({3, 2, 5, 7}, DType::kF32, true);
  Tensor i = Tensor::empty_host({11, 1, 1, 1}, DType::kI32, true);
  EXPECT_EQ(f.device(), Device::kCpu);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(f.raw()) % 64, 0u);
  for (int64_t k = 0; k < f.numel(); ++k) f.data()[k] = static_cast<float>(k) * 0.5f;
  for (int64_t k = 0; k < i.numel(); ++k) i.idata()[k] = static_cast<int32_t>(k) - 5;
  EXPECT_EQ(f.clone().to_vector(), f.to_vector());
  EXPECT_EQ(i.to_ivector()[10], 5);
  EXPECT_THROW(Tensor::empty_host({-1, 1, 1, 1}, DType::kF32, true), ShapeError);
  if (!kernels::cuda_available() || !kernels::cuda_ops_built()) return;
  kernels::DeviceStream stream(Device::kCuda);
  kernels::ScopedStream on(stream.ref());
  EXPECT_EQ(f.to(Device::kCuda).to(Device::kCpu).to_vector(), f.to_vector());
  EXPECT_EQ(i.to(Device::kCuda).to(Device::kCpu).to_ivector(), i.to_ivector());
}

TEST(TrainingCudaNoDevice, BackendCudaSaysWhyItCannotRun) {
  if (kernels::cuda_available() && kernels::cuda_ops_built()) GTEST_SKIP() << "a CUDA device is usable";
  try {
    resolve_backend("cuda");
    FAIL() << "--backend cuda without a usable GPU must be refused";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("--backend cuda"), std::string::npos) << what;
    EXPECT_GT(what.size(), std::string("--backend cuda: ").size() + 10) << "the reason is missing: " << what;
  }
  EXPECT_EQ(resolve_backend("auto"), Device::kCpu);
  EXPECT_NE(auto_backend_reason(), "");  // why auto means the CPU here
}

// --backend auto on a GPU machine: the GPU passes the start-up check (one step of a small VGG5 against
// the CPU backend) and auto means CUDA.
TEST(TrainingCuda, AutoPicksAGpuThatPassesTheStartUpCheck) {
  PIPAR_REQUIRE_CUDA();
  EXPECT_EQ(auto_backend_reason(), "");
  EXPECT_EQ(resolve_backend("auto"), Device::kCuda);
}

}  // namespace
}  // namespace pipar
