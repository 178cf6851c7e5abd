// Per-layer implementation choice (autotune.h). Host code only.
// Verified on an H200 (OpsCuda.VendorAndAutoKernelsMatchCpu; the benchmarks' cached choices in bench/RESULTS.md).
#include "kernels/cuda/autotune.h"

#include <cublas_v2.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cudnn_conv.h"
#include "kernels/cuda/stream.h"
#include "kernels/kernel_cache.h"

namespace pipar::kernels::cuda {
namespace {

KernelChoice choice_from_env() {
  KernelChoice c = KernelChoice::kAuto;
  if (const char* e = std::getenv("PIPAR_KERNELS"); e && *e && !parse_kernel_choice(e, &c))
    std::fprintf(stderr, "pipar: PIPAR_KERNELS='%s' is not handwritten, vendor or auto; using auto\n", e);
  return c;
}

std::atomic<KernelChoice>& choice_state() {
  static std::atomic<KernelChoice> c{choice_from_env()};
  return c;
}

struct Tuner {
  std::mutex mu;
  std::map<std::string, Impl> chosen;  // full key → implementation, this process
  std::shared_ptr<KernelCache> disk;  // replaced by reset_tuner; read under mu
  Tuner() : disk(std::make_shared<KernelCache>(KernelCache::default_path())) {}
};
Tuner& tuner() {
  static auto* t = new Tuner();  // leaked: no destruction order issues at exit
  return *t;
}

bool allowed(KernelChoice c, const Impl& i) {
  switch (c) {
    case KernelChoice::kHandwritten: return i.kind == Impl::kHandwritten;
    case KernelChoice::kVendor: return i.vendor();
    case KernelChoice::kAuto: return true;
  }
  return true;
}

// Median of 3 timed runs after one untimed (which may grow the stream's workspace), in ms.
double time_impl(const Impl& impl, const std::function<void(const Impl&)>& run, StreamRef s) {
  run(impl);
  Event e0(Event::Kind::kTiming), e1(Event::Kind::kTiming);
  double ms[3];
  for (double& m : ms) {
    e0.record(s);
    run(impl);
    e1.record(s);
    e1.synchronize();
    m = static_cast<double>(Event::elapsed_ms(e0, e1));
  }
  std::sort(ms, ms + 3);
  return ms[1];
}

}  // namespace

std::string Impl::str() const {
  switch (kind) {
    case kHandwritten: return "handwritten";
    case kCublas: return "cublas";
    case kCudnn: return "cudnn:" + std::to_string(algo);
  }
  return "?";
}

bool Impl::parse(const std::string& s, Impl* out) {
  if (s == "handwritten") return *out = Impl{kHandwritten, -1}, true;
  if (s == "cublas") return *out = Impl{kCublas, -1}, true;
  if (s.rfind("cudnn:", 0) == 0 && s.size() > 6 && s.find_first_not_of("0123456789", 6) == std::string::npos)
    return *out = Impl{kCudnn, std::atoi(s.c_str() + 6)}, true;
  return false;
}

void set_kernel_choice(KernelChoice c) { choice_state().store(c); }
KernelChoice kernel_choice() { return choice_state().load(); }
const char* kernel_choice_name(KernelChoice c) {
  return c == KernelChoice::kHandwritten ? "handwritten" : c == KernelChoice::kVendor ? "vendor" : "auto";
}
bool parse_kernel_choice(const std::string& s, KernelChoice* out) {
  if (s == "handwritten") return *out = KernelChoice::kHandwritten, true;
  if (s == "vendor") return *out = KernelChoice::kVendor, true;
  if (s == "auto") return *out = KernelChoice::kAuto, true;
  return false;
}

std::string device_key() {
  static const std::string key = [] {
    int dev = 0, rt = 0;
    PIPAR_CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    PIPAR_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    PIPAR_CUDA_CHECK(cudaRuntimeGetVersion(&rt));
    int major = 0, minor = 0, patch = 0;
    cublasGetProperty(MAJOR_VERSION, &major);
    cublasGetProperty(MINOR_VERSION, &minor);
    cublasGetProperty(PATCH_LEVEL, &patch);
    std::string name = prop.name;
    for (char& ch : name)
      if (ch == '|' || ch == '\t' || ch == '\n') ch = ' ';
    // kOurKernels names the revision of our own kernels: a choice timed against older ones is re-timed.
    constexpr const char* kOurKernels = "ours2";  // 2: the 128x128 GEMM tile, samples as columns
    return detail::concat(name, "|sm", prop.major, prop.minor, "|cuda", rt, "|cublas", major, ".", minor, ".", patch,
                          "|cudnn", cudnn_version(), "|", kOurKernels);
  }();
  return key;
}

Impl choose(const std::string& what, const std::function<std::vector<Impl>()>& candidates,
            const std::function<void(const Impl&)>& run, StreamRef s) {
  const KernelChoice c = kernel_choice();
  Tuner& t = tuner();
  // The key names the choice too: vendor and auto may keep different winners for one shape.
  const std::string key = device_key() + "|" + kernel_choice_name(c) + "|" + what;
  std::shared_ptr<KernelCache> disk;
  {
    std::lock_guard<std::mutex> lock(t.mu);
    if (auto it = t.chosen.find(key); it != t.chosen.end()) return it->second;
    disk = t.disk;
  }
  const std::vector<Impl> all = candidates();
  PIPAR_CHECK(!all.empty(), "no implementation of ", what);
  std::vector<Impl> allowed_impls;
  for (const Impl& i : all)
    if (allowed(c, i)) allowed_impls.push_back(i);
  // No vendor implementation (a depthwise convolution in a build without cuDNN): ours.
  if (allowed_impls.empty()) allowed_impls.push_back(all[0]);
  if (allowed_impls.size() == 1) {
    std::lock_guard<std::mutex> lock(t.mu);
    return t.chosen.emplace(key, allowed_impls[0]).first->second;
  }
  if (const auto cached = disk->get(key)) {
    Impl i;
    const std::string name = cached->substr(0, cached->find(' '));
    const bool known = Impl::parse(name, &i) &&
                       std::any_of(allowed_impls.begin(), allowed_impls.end(),
                                   [&](const Impl& a) { return a.kind == i.kind && a.algo == i.algo; });
    if (known) {
      std::lock_guard<std::mutex> lock(t.mu);
      return t.chosen.emplace(key, i).first->second;
    }
  }
  // Time every allowed implementation once; one that fails (an algorithm cuDNN turns down at run
  // time, a workspace that does not fit) is left out.
  Impl best = allowed_impls[0];
  double best_ms = -1;
  std::string last_error;
  for (const Impl& i : allowed_impls) {
    try {
      const double ms = time_impl(i, run, s);
      if (best_ms < 0 || ms < best_ms) best = i, best_ms = ms;
    } catch (const std::exception& e) {
      last_error = e.what();
      cudaGetLastError();  // a failed launch must not fail the next candidate's
    }
  }
  if (best_ms < 0) throw Error("every implementation of " + what + " failed; the last: " + last_error);
  char value[64];
  std::snprintf(value, sizeof value, "%s %.5f", best.str().c_str(), best_ms);
  disk->put(key, value);
  std::lock_guard<std::mutex> lock(t.mu);
  return t.chosen.emplace(key, best).first->second;  // another thread's winner, if it got there first
}

void reset_tuner(const std::string& path) {
  Tuner& t = tuner();
  std::lock_guard<std::mutex> lock(t.mu);
  t.chosen.clear();
  t.disk = std::make_shared<KernelCache>(path);
}

std::string cache_path() {
  Tuner& t = tuner();
  std::lock_guard<std::mutex> lock(t.mu);
  return t.disk->path();
}

std::vector<std::string> cached_choices() {
  std::vector<std::string> out;
  const std::string prefix = device_key() + "|";
  std::map<std::string, std::string> entries;
  {
    Tuner& t = tuner();
    std::lock_guard<std::mutex> lock(t.mu);
    entries = t.disk->entries();
  }
  for (const auto& [k, v] : entries)
    if (k.rfind(prefix, 0) == 0) out.push_back(k.substr(prefix.size()) + " -> " + v);
  return out;
}

}  // namespace pipar::kernels::cuda
