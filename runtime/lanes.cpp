// Replicas' micro-batches trained side by side on shares of the server's cores.
#include "runtime/lanes.h"

#include <omp.h>

#include <algorithm>
#include <set>

#include "kernels/parallel.h"

namespace pipar {

std::pair<int, int> ServerLanes::split_cores(int replicas, int threads) {
  const int lanes = std::max(1, std::min(replicas, threads));
  return {lanes, std::max(1, threads / lanes)};
}

std::vector<std::pair<int, int>> ServerLanes::options(int replicas, int threads, int forced) {
  if (forced > 0) return {split_cores(forced, threads)};
  std::vector<std::pair<int, int>> out = {{1, std::max(1, threads)}};
  if (const auto many = split_cores(replicas, threads); many.first > 1) out.push_back(many);
  return out;
}

ServerLanes::ServerLanes(int lanes, int threads_per_lane) : lanes_(lanes), threads_per_lane_(threads_per_lane) {
  if (lanes < 1 || threads_per_lane < 1)
    throw Error(detail::concat("server lanes: ", lanes, " lanes of ", threads_per_lane, " threads"));
  workers_.reserve(static_cast<size_t>(lanes - 1));
  for (int i = 1; i < lanes; ++i) workers_.emplace_back([this] { work_loop(); });
}

ServerLanes::~ServerLanes() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ServerLanes::run_items() {
  while (true) {
    Item* it = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!items_ || next_ >= items_->size()) return;
      it = &(*items_)[next_++];
    }
    try {
      if (it->work) it->work();
      else it->result = it->part->train_micro(it->activation, it->labels, it->batch_size);
    } catch (...) {
      it->error = std::current_exception();
    }
    bool last = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last = ++finished_ == items_->size();
    }
    if (last) done_.notify_all();
  }
}

void ServerLanes::work_loop() {
  // This lane's kernels use its share of the cores; its OpenMP team (if any) lives with the thread.
  kernels::set_thread_local_threads(threads_per_lane_);
  omp_set_num_threads(threads_per_lane_);
  uint64_t seen = 0;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    run_items();
  }
}

void ServerLanes::train(std::vector<Item>& items) {
  std::set<const void*> replicas;
  for (const Item& it : items)
    if ((!it.part && !(it.work && it.owner)) || !replicas.insert(it.replica()).second)
      throw Error("server lanes: a group must name distinct replicas (one micro-batch per replica)");
  if (items.empty()) return;
  kernels::ScopedThreads share(threads_per_lane_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    items_ = &items;
    next_ = finished_ = 0;
    ++generation_;
  }
  if (lanes_ > 1 && items.size() > 1) wake_.notify_all();
  run_items();
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return finished_ == items.size(); });
  items_ = nullptr;
}

}  // namespace pipar
