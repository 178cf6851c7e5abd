// bench/gpu_busy.h: the GPU's busy fraction from NVML, as the server benchmark reports it.
#include "bench/gpu_busy.h"

#include <gtest/gtest.h>

#include <chrono>

#include "kernels/device.h"
#include "kernels/ops.h"
#include "runtime/tensor.h"
#include "tests/gpu.h"

namespace pipar {
namespace {

// Host work only: the calling thread spins for about a millisecond (no GPU work, no sleep).
void spin_host() {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1);
  while (std::chrono::steady_clock::now() < until) {
  }
}

TEST(GpuBusy, WithoutNvmlSaysWhyAndMeasuresNothing) {
  bench::GpuBusy nvml;
  if (nvml.ok()) GTEST_SKIP() << "NVML is usable here (GpuBusyCuda covers it)";
  EXPECT_FALSE(nvml.why_not().empty());
  int calls = 0;
  EXPECT_EQ(nvml.measure([&] { ++calls; }, 0.5), -1.0);
  EXPECT_EQ(calls, 0);
}

// An idle GPU reads low while the host spins; back-to-back 2048x2048x2048 products (17 GFLOP each) read
// high. Bounds: idle < 0.3, busy > 0.7 (NVML's own window blurs the edges; the first half is skipped).
TEST(GpuBusyCuda, IdleReadsLowAndBackToBackKernelsHigh) {
  PIPAR_REQUIRE_CUDA();
  bench::GpuBusy nvml;
  if (!nvml.ok()) GTEST_SKIP() << "NVML not usable: " << nvml.why_not();
  const int64_t n = 2048;
  kernels::DeviceStream st(Device::kCuda);
  kernels::ScopedStream on(st.ref());
  Tensor x = Tensor::empty({n, n, 1, 1}, Device::kCuda), w = Tensor::empty({n, n, 1, 1}, Device::kCuda);
  Tensor y = Tensor::empty({n, n, 1, 1}, Device::kCuda);
  kernels::fill(0.5f, x.view(), st.ref());
  kernels::fill(0.25f, w.view(), st.ref());
  st.synchronize();
  const double idle = nvml.measure(spin_host, 2.0);
  const double busy = nvml.measure(
      [&] {
        for (int i = 0; i < 8; ++i) kernels::linear_forward(x.view(), w.view(), {}, y.view(), st.ref());
        st.synchronize();
      },
      2.0);
  EXPECT_GE(idle, 0.0);
  EXPECT_LT(idle, 0.3) << "idle " << idle << ", busy " << busy;
  EXPECT_GT(busy, 0.7) << "idle " << idle << ", busy " << busy;
  EXPECT_EQ(y.to_vector()[0], 0.5f * 0.25f * static_cast<float>(n));  // the products ran (exact in FP32)
}

}  // namespace
}  // namespace pipar
