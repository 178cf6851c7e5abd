// Cross-device batching on the CPU backend. With K devices each sending small micro-batches, a server
// that trains one replica's micro-batch at a time on all its cores spends much of each step waking
// and joining threads for tiny kernels. ServerLanes instead trains the micro-batches of several
// devices' server-side replicas side by side: up to `lanes` at once, each on its own share of the
// cores (`threads_per_lane`), on long-lived threads that keep their OpenMP teams.
//
// The same result as one replica at a time: a replica's arithmetic depends only on its own
// micro-batches and on the lane's thread count, never on which replicas share its group, on how many
// do, or on timing. So each item of a group equals its part's own train_micro run on
// threads_per_lane threads, bit for bit (tests/runtime/lanes_test.cpp).
#pragma once
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "runtime/split.h"

namespace pipar {

class ServerLanes {
 public:
  struct Item {
    ServerPart* part = nullptr;
    Tensor activation, labels;  // the micro-batch; labels [n,1,1,1] int
    int64_t batch_size = 0;     // its whole batch's sample count
    ServerPart::Result result;  // out: set by train
    std::exception_ptr error;   // out: what its step threw, if it did (the others still run)
    // Instead of a ServerPart's micro-batch: any step of one replica (a MiddlePart's forward or
    // backward, with private labels), run in place of train_micro; `owner` names its replica.
    std::function<void()> work;
    const void* owner = nullptr;
    const void* replica() const { return part ? static_cast<const void*>(part) : owner; }
  };

  // lanes >= 1; threads_per_lane >= 1. lanes - 1 threads are started here; the caller is lane 0.
  ServerLanes(int lanes, int threads_per_lane);
  ~ServerLanes();
  ServerLanes(const ServerLanes&) = delete;
  ServerLanes& operator=(const ServerLanes&) = delete;

  // Trains every item, in one group; returns when all are done. Items must name distinct replicas
  // (a replica's micro-batches are ordered; throws pipar::Error before training anything otherwise).
  void train(std::vector<Item>& items);

  int lanes() const { return lanes_; }
  int threads_per_lane() const { return threads_per_lane_; }

  // The lanes for `replicas` replicas trained side by side on `threads` cores: min(replicas,
  // threads), each with threads / lanes threads.
  static std::pair<int, int> split_cores(int replicas, int threads);
  // On CUDA a lane is a host thread driving its replicas' streams (each server part has its own): up
  // to 8 replicas' micro-batches queued on the GPU at once, or `forced` > 0 (--server-lanes); one
  // thread each (the GPU does the work).
  static std::pair<int, int> cuda_lanes(int replicas, int forced) { return {forced > 0 ? forced : std::min(replicas, 8), 1}; }
  // The lane configurations, as (lanes, threads per lane), a server of `threads` threads with
  // `replicas` replicas weighs: `forced` > 0 (--server-lanes): split_cores(forced, threads) alone;
  // else one at a time on all threads and, where it has more than one lane, split_cores(replicas,
  // threads), for the cost model to choose between.
  static std::vector<std::pair<int, int>> options(int replicas, int threads, int forced);

 private:
  void work_loop();
  void run_items();  // takes items until none is left

  int lanes_, threads_per_lane_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;  // bumped once per group
  bool stop_ = false;
  std::vector<Item>* items_ = nullptr;
  size_t next_ = 0;      // the next item to take (under mu_)
  size_t finished_ = 0;  // items done in this group (under mu_)
};

}  // namespace pipar
