// Process-wide CPU thread count (OpenMP underneath) and run-time detection of the vector ISA.
#include "kernels/parallel.h"

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "kernels/error.h"

namespace pipar::kernels {
namespace {
std::atomic<int> g_threads{0};  // 0: not set yet → all cores
thread_local int t_threads = 0;  // this thread's own count (0: none)

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  Isa best = Isa::kGeneric;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#else
  Isa best = Isa::kGeneric;
#endif
  if (const char* env = std::getenv("PIPAR_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "generic")) want = Isa::kGeneric;
    else if (!std::strcmp(env, "avx2")) want = Isa::kAvx2;
    else if (!std::strcmp(env, "avx512")) want = Isa::kAvx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}
std::atomic<int> g_isa{-1};
}  // namespace

int hardware_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

void set_num_threads(int n) {
  if (n <= 0) n = hardware_threads();
  g_threads = n;
  omp_set_num_threads(n);
}

void set_thread_local_threads(int n) { t_threads = n > 0 ? n : 0; }

ScopedThreads::ScopedThreads(int n) : saved_(t_threads) { set_thread_local_threads(n); }
ScopedThreads::~ScopedThreads() { t_threads = saved_; }

int num_threads() {
  if (t_threads > 0) return t_threads;
  int n = g_threads.load();
  if (n == 0) {
    set_num_threads(0);
    n = g_threads.load();
  }
  return n;
}

Isa cpu_isa() {
  int v = g_isa.load();
  if (v < 0) {
    v = static_cast<int>(detect_isa());
    g_isa = v;
  }
  return static_cast<Isa>(v);
}

void set_cpu_isa(Isa isa) {
  const Isa best = detect_isa();
  if (static_cast<int>(isa) > static_cast<int>(best))
    throw Unsupported(std::string("this CPU does not support ") + isa_name(isa));
  g_isa = static_cast<int>(isa);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kGeneric: return "generic";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

}  // namespace pipar::kernels
