// CPU threading: one process-wide thread count (default: all cores), used by every CPU kernel.
#pragma once
#include <cstdint>

namespace pipar::kernels {

void set_num_threads(int n);  // n <= 0 means all cores
int num_threads();  // the calling thread's own count where one is set, else the process-wide one
int hardware_threads();

// A thread's own CPU thread count for the kernels it calls, over the process-wide one: replicas
// trained side by side on several threads each get a share of the cores. n <= 0 clears it.
void set_thread_local_threads(int n);
class ScopedThreads {
 public:
  explicit ScopedThreads(int n);
  ~ScopedThreads();
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int saved_;
};

// The widest vector instruction set the CPU kernels use on this machine (detected at run time).
enum class Isa { kGeneric, kAvx2, kAvx512 };
Isa cpu_isa();
const char* isa_name(Isa isa);
// Force a narrower ISA (tests and benchmarks compare paths); PIPAR_ISA=generic|avx2|avx512 does too.
void set_cpu_isa(Isa isa);

}  // namespace pipar::kernels
