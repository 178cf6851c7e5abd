// CPU configurations the GEMM, conv2d and linear tests run under: every vector ISA this machine
// supports × thread counts 1, 2, 3, with a guard that restores the process-wide settings.
#pragma once
#include <string>
#include <vector>

#include "kernels/error.h"
#include "kernels/parallel.h"

namespace pipar::test {

struct CpuConfig {
  kernels::Isa isa;
  int threads;
  std::string str() const { return std::string("isa=") + kernels::isa_name(isa) + " threads=" + std::to_string(threads); }
};

// Sets an ISA and thread count for one scope, then restores what was there.
class ScopedCpuConfig {
 public:
  explicit ScopedCpuConfig(const CpuConfig& c) : isa_(kernels::cpu_isa()), threads_(kernels::num_threads()) {
    kernels::set_cpu_isa(c.isa);
    kernels::set_num_threads(c.threads);
  }
  ~ScopedCpuConfig() {
    kernels::set_cpu_isa(isa_);
    kernels::set_num_threads(threads_);
  }
  ScopedCpuConfig(const ScopedCpuConfig&) = delete;
  ScopedCpuConfig& operator=(const ScopedCpuConfig&) = delete;

 private:
  kernels::Isa isa_;
  int threads_;
};

inline std::vector<kernels::Isa> supported_isas() {
  std::vector<kernels::Isa> out;
  const kernels::Isa keep = kernels::cpu_isa();
  for (kernels::Isa isa : {kernels::Isa::kGeneric, kernels::Isa::kAvx2, kernels::Isa::kAvx512}) {
    try {
      kernels::set_cpu_isa(isa);
      out.push_back(isa);
    } catch (const Unsupported&) {
    }
  }
  kernels::set_cpu_isa(keep);
  return out;
}

inline std::vector<CpuConfig> cpu_configs() {
  std::vector<CpuConfig> out;
  for (kernels::Isa isa : supported_isas())
    for (int t : {1, 2, 3}) out.push_back({isa, t});
  return out;
}

}  // namespace pipar::test
