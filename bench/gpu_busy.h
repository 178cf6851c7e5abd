// The GPU's busy fraction, read from NVML while a piece of work runs: NVML's "utilization.gpu", the
// share of its sample period (1/6 s to 1 s, by product) in which one or more kernels ran on the GPU.
// NVML is the driver's library (libnvidia-ml.so.1): it is opened at run time, so nothing links against
// it and a machine without it (or with no GPU) reports why instead of a figure. Only the few calls used
// here are declared, with NVML's stable C ABI (nvml.h: nvmlReturn_t is an int-sized enum, 0 = success).
#pragma once
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

namespace pipar::bench {

class GpuBusy {
 public:
  GpuBusy() {
    lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib_) {
      why_ = "NVML (libnvidia-ml.so.1) not found";
      return;
    }
    init_ = sym<Init>("nvmlInit_v2");
    shutdown_ = sym<Shutdown>("nvmlShutdown");
    count_ = sym<Count>("nvmlDeviceGetCount_v2");
    handle_ = sym<Handle>("nvmlDeviceGetHandleByIndex_v2");
    util_ = sym<Util>("nvmlDeviceGetUtilizationRates");
    if (!init_ || !shutdown_ || !count_ || !handle_ || !util_) {
      why_ = "NVML lacks one of nvmlInit_v2, nvmlDeviceGetCount_v2, nvmlDeviceGetHandleByIndex_v2, "
             "nvmlDeviceGetUtilizationRates";
      return;
    }
    if (const int rc = init_(); rc != 0) {
      why_ = "nvmlInit_v2 failed (" + std::to_string(rc) + ")";
      return;
    }
    initialized_ = true;
    unsigned n = 0;
    if (const int rc = count_(&n); rc != 0 || n != 1) {
      // With several GPUs, NVML's order need not be CUDA's (CUDA_VISIBLE_DEVICES): not guessed.
      why_ = rc != 0 ? "nvmlDeviceGetCount_v2 failed (" + std::to_string(rc) + ")"
                     : "NVML lists " + std::to_string(n) + " GPUs; measured only where there is one";
      return;
    }
    if (const int rc = handle_(0, &device_); rc != 0) {
      why_ = "nvmlDeviceGetHandleByIndex_v2 failed (" + std::to_string(rc) + ")";
      return;
    }
    Utilization u{};
    if (const int rc = util_(device_, &u); rc != 0) {
      why_ = "nvmlDeviceGetUtilizationRates failed (" + std::to_string(rc) + ")";
      return;
    }
    ok_ = true;
  }
  ~GpuBusy() {
    if (initialized_) shutdown_();
    if (lib_) dlclose(lib_);
  }
  GpuBusy(const GpuBusy&) = delete;
  GpuBusy& operator=(const GpuBusy&) = delete;

  bool ok() const { return ok_; }
  const std::string& why_not() const { return why_; }

  // Runs work() back to back for `seconds` while another thread reads utilization.gpu every 50 ms,
  // skipping the first half (NVML's window still holds what ran before); returns the mean reading as a
  // fraction (0..1), or -1 when not measured (ok() false, or no reading taken).
  template <class Work>
  double measure(Work&& work, double seconds) {
    if (!ok_) return -1;
    using Clock = std::chrono::steady_clock;
    std::atomic<bool> done{false};
    std::vector<unsigned> readings;
    const auto t0 = Clock::now();
    std::thread reader([&] {
      while (!done.load()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the reader's pace, not the work's
        if (std::chrono::duration<double>(Clock::now() - t0).count() < seconds / 2) continue;
        Utilization u{};
        if (util_(device_, &u) == 0) readings.push_back(u.gpu);
      }
    });
    try {
      do {
        work();
      } while (std::chrono::duration<double>(Clock::now() - t0).count() < seconds);
    } catch (...) {
      done = true;
      reader.join();
      throw;
    }
    done = true;
    reader.join();
    if (readings.empty()) return -1;
    double sum = 0;
    for (unsigned r : readings) sum += r;
    return std::min(1.0, sum / static_cast<double>(readings.size()) / 100.0);
  }

 private:
  struct DeviceSt;
  using Device = DeviceSt*;  // nvmlDevice_t
  struct Utilization {       // nvmlUtilization_t
    unsigned gpu, memory;
  };
  using Init = int (*)();
  using Shutdown = int (*)();
  using Count = int (*)(unsigned*);
  using Handle = int (*)(unsigned, Device*);
  using Util = int (*)(Device, Utilization*);
  template <class F>
  F sym(const char* name) {
    return reinterpret_cast<F>(dlsym(lib_, name));
  }

  void* lib_ = nullptr;
  Init init_ = nullptr;
  Shutdown shutdown_ = nullptr;
  Count count_ = nullptr;
  Handle handle_ = nullptr;
  Util util_ = nullptr;
  Device device_ = nullptr;
  bool initialized_ = false, ok_ = false;
  std::string why_;
};

}  // namespace pipar::bench
