// Comparing a result computed another way (on the GPU) with the CPU backend's. FP32 sums in another
// order differ by rounding, and how far that moves a result depends on its conditioning: most
// gradients agree to about 1e-5, but some are zero but for rounding (the shift of a batch norm whose
// output reaches another batch norm through a convolution: its gradient is the sum of that norm's
// zero-mean input gradient, 1e-8 against 1e-2 for its neighbours), and at random weights a deep
// part amplifies rounding (ReLU masks flip on values near zero, batch norm over a few samples).
// Seen on the first GPU run (H200, 2026-11-30): MobileNetV3-Small's zero shifts differed from the
// CPU's by 0.8 to 2.5 relative, as much as the CPU's own AVX2 and generic runs differ (1.2 to 2.0).
//
// So the CPU runs twice, on its default ISA and on the generic one (other summation orders), and a
// result passes when it is within `tol` (relative, 2-norm) of the default run, or strays from it by at
// most `factor` times as far as the generic run does: no further from the CPU than rounding moves
// the CPU itself. A wrong index, mask or layout is an error of order one on a well-conditioned value.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/parallel.h"

namespace pipar::test {

// Runs the enclosed CPU work on another ISA (kernels::set_cpu_isa) and restores the old one.
struct OnIsa {
  kernels::Isa saved = kernels::cpu_isa();
  explicit OnIsa(kernels::Isa isa) { kernels::set_cpu_isa(isa); }
  ~OnIsa() { kernels::set_cpu_isa(saved); }
  OnIsa(const OnIsa&) = delete;
  OnIsa& operator=(const OnIsa&) = delete;
};

struct CpuGap {
  double relative;   // |got - cpu| / |cpu|
  double cpu_noise;  // |cpu_generic - cpu| / |cpu|: how far the CPU moves under another order
  bool ok;
};

inline CpuGap gap_to_cpu(const std::vector<float>& got, const std::vector<float>& cpu,
                         const std::vector<float>& cpu_generic, double tol, double factor = 10.0) {
  if (got.size() != cpu.size() || cpu_generic.size() != cpu.size()) return {INFINITY, INFINITY, false};
  double diff = 0, noise = 0, norm = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    diff += double(got[i] - cpu[i]) * (got[i] - cpu[i]);
    noise += double(cpu_generic[i] - cpu[i]) * (cpu_generic[i] - cpu[i]);
    norm += double(cpu[i]) * cpu[i];
  }
  diff = std::sqrt(diff), noise = std::sqrt(noise), norm = std::sqrt(norm);
  const double scale = std::max(norm, 1e-30);
  return {diff / scale, noise / scale, diff <= tol * norm || diff <= factor * noise};
}

}  // namespace pipar::test
