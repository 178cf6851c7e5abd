// The cost model: an event simulation over devices, batches and micro-batches (see the header).
#include "planner/cost_model.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <queue>

#include "runtime/split.h"

namespace pipar::planner {

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::kPipar: return "pipar";
    case Mode::kSfl: return "sfl";
    case Mode::kSl: return "sl";
    case Mode::kFl: return "fl";
  }
  return "?";
}

Mode parse_mode(const std::string& name) {
  if (name == "pipar") return Mode::kPipar;
  if (name == "sfl") return Mode::kSfl;
  if (name == "sl") return Mode::kSl;
  if (name == "fl") return Mode::kFl;
  throw Error("unknown mode '" + name + "'; the planner knows pipar, sfl, sl and fl");
}

std::vector<int64_t> batch_lengths(int64_t n, int64_t bs) {
  PIPAR_CHECK(bs >= 1 && n >= 0, "batch_lengths(", n, ", ", bs, ")");
  if (n == 0) return {bs};
  std::vector<int64_t> lens(static_cast<size_t>(n / bs), bs);
  if (n % bs >= 2) lens.push_back(n % bs);
  return lens;
}

Cluster make_cluster(const Profile& device, size_t k, const LinkSpec& link, int64_t batch_size, int64_t samples_per_device) {
  Cluster c;
  c.device_profiles = {device};
  c.batch_size = batch_size;
  DeviceSpec s;
  s.link = link;
  s.samples = samples_per_device;
  c.devices.assign(k, s);
  return c;
}

double CostModel::transfer_s(double bytes, double rate_mbps, double per_message_s) {
  return per_message_s + (rate_mbps > 0 ? bytes * 8.0 / (rate_mbps * 1e6) : 0.0);
}

CostModel::CostModel(Cluster cluster) : c_(std::move(cluster)) {
  if (c_.device_profiles.empty()) throw Error("cost model: no device profile");
  if (c_.devices.empty()) throw Error("cost model: no devices");
  if (c_.batch_size < 1) throw Error("cost model: batch size must be at least 1");
  if (c_.server_lanes < 1) throw Error("cost model: server_lanes must be at least 1");
  if (!(c_.server_time_scale > 0) || !(c_.aggregation_s >= 0) || !(c_.server_per_micro_batch_s >= 0))
    throw Error("cost model: server_time_scale must be > 0, aggregation and per-micro-batch times >= 0");
  for (const Profile& p : c_.device_profiles) p.validate();
  if (c_.server_profile) c_.server_profile->validate();
  blocks_ = c_.device_profiles[0].num_blocks();
  if (c_.private_labels && blocks_ < 3)
    throw Error(detail::concat("cost model: private labels need at least 3 blocks (device front, server middle, device tail); ",
                               c_.device_profiles[0].model, " has ", blocks_));
  auto same_model = [&](const Profile& p) {
    if (p.num_blocks() != blocks_ || p.model != c_.device_profiles[0].model)
      throw Error(detail::concat("cost model: profiles of different models (", c_.device_profiles[0].model, ", ",
                                 blocks_, " blocks vs ", p.model, ", ", p.num_blocks(), " blocks)"));
  };
  for (const Profile& p : c_.device_profiles) {
    same_model(p);
    min_micro_ = std::max(min_micro_, p.min_micro_batch);
  }
  if (c_.server_profile) {
    same_model(*c_.server_profile);
    min_micro_ = std::max(min_micro_, c_.server_profile->min_micro_batch);
  }
  if (c_.host_cores < 0 || c_.host_device_threads < 1 || c_.host_server_threads < 0)
    throw Error(detail::concat("cost model: shared host of ", c_.host_cores, " cores, ", c_.host_device_threads,
                               " threads per device, ", c_.host_server_threads, " for the server"));
  if (c_.server_stack < 0) throw Error("cost model: server_stack must be 0 (no stacks) or more");
  if (c_.server_stack > 0) {
    if (c_.server_lanes != 1 || c_.private_labels || c_.shared_server_model)
      throw Error("cost model: stacks need a replica per device, shared labels and one server lane");
    if (c_.stack_split < 1 || static_cast<size_t>(c_.stack_split) >= blocks_)
      throw Error(detail::concat("cost model: stack profiles from split point ", c_.stack_split, " of ", blocks_, " blocks"));
    // Every stack is full but perhaps the last: at most two sizes, each needs its profile.
    const size_t per = static_cast<size_t>(c_.server_stack);
    stacks_ = (c_.devices.size() + per - 1) / per;
    auto profile_of = [&](int64_t want) {
      for (size_t i = 0; i < c_.stack_profiles.size(); ++i)
        if (c_.stack_profiles[i].first == want) {
          const Profile& p = c_.stack_profiles[i].second;
          p.validate();
          same_model(p);
          min_micro_ = std::max(min_micro_, p.min_micro_batch);
          return i;
        }
      throw Error(detail::concat("cost model: no profile of a stack of ", want, " replicas"));
    };
    full_stack_profile_ = profile_of(stack_size(0));
    last_stack_profile_ = profile_of(stack_size(stacks_ - 1));
  }
  for (size_t d = 0; d < c_.devices.size(); ++d) {
    const DeviceSpec& s = c_.devices[d];
    if (s.profile >= c_.device_profiles.size())
      throw Error(detail::concat("cost model: device ", d, " uses profile ", s.profile, " of ", c_.device_profiles.size()));
    if (!(s.time_scale > 0) || !(s.link.up_mbps >= 0) || !(s.link.down_mbps >= 0) || !(s.link.latency_s >= 0) ||
        !(s.link.per_message_s >= 0) || s.samples < 0)
      throw Error(detail::concat("cost model: device ", d, " has a negative rate, latency, scale or sample count"));
  }
}

bool CostModel::micro_batches_fit(int micro_batches) const {
  if (micro_batches < 1) return false;
  for (const DeviceSpec& d : c_.devices)
    for (int64_t len : batch_lengths(d.samples, c_.batch_size))
      if (micro_batch_sizes(len, micro_batches).back() < min_micro_) return false;
  return true;
}

void CostModel::check_split(const std::vector<int>& split, Mode mode) const {
  if (mode == Mode::kFl) return;
  if (split.size() != c_.devices.size())
    throw Error(detail::concat("cost model: ", split.size(), " split points for ", c_.devices.size(), " devices"));
  if (c_.server_stack > 0 && mode != Mode::kSl)
    for (int p : split)
      if (p != split.front() || p < c_.stack_split)
        throw Error(detail::concat("cost model: stacked replicas need one split point, at least ", c_.stack_split,
                                   " (where the stacks were profiled)"));
  for (int p : split)
    if (p < 1 || static_cast<size_t>(p) >= server_end())
      throw Error(detail::concat("cost model: split point ", p, " outside 1..", server_end() - 1,
                                 c_.private_labels ? detail::concat(" (private labels: the device keeps the last of the ", blocks_, " blocks)")
                                                   : std::string()));
}

int64_t CostModel::stack_size(size_t s) const {
  const size_t per = static_cast<size_t>(c_.server_stack), k = c_.devices.size();
  return static_cast<int64_t>(std::min(per, k - s * per));
}

const Profile& CostModel::stack_profile(size_t s) const {
  return c_.stack_profiles[s + 1 == stacks_ ? last_stack_profile_ : full_stack_profile_].second;
}

double CostModel::stack_call_s(size_t s, size_t split, int64_t m) const {
  const Profile& p = stack_profile(s);
  const double mm = static_cast<double>(m);
  return (p.forward_s(split, blocks_, mm) + p.loss_time_s(mm) + p.backward_s(split, blocks_, mm)) * c_.server_time_scale;
}

int64_t CostModel::device_state_bytes(size_t d, size_t split) const {
  const Profile& p = device_profile(d);
  return p.state_bytes(0, split) + (c_.private_labels ? p.state_bytes(blocks_ - 1, blocks_) : 0);
}

// --- stage times -----------------------------------------------------------------------------------

struct CostModel::Stage {
  double f = 0, b = 0, up = 0, down = 0, s = 0;  // device forward/backward, links, server micro-batch
  // Private labels (s is then the middle forward): middle backward, the middle output down, the
  // device's tail (forward, loss, backward), the output's gradient up.
  double s_back = 0, down_mid = 0, tail = 0, up_mid = 0;
};

CostModel::Stage CostModel::stage(size_t d, int split, int64_t m, Mode mode) const {
  const DeviceSpec& ds = c_.devices[d];
  const Profile& dp = device_profile(d);
  const double mm = static_cast<double>(m);
  Stage st;
  if (mode == Mode::kFl) {
    st.f = (dp.forward_s(0, blocks_, mm) + dp.loss_time_s(mm) + dp.backward_s(0, blocks_, mm)) * ds.time_scale;
    return st;
  }
  const size_t p = static_cast<size_t>(split);
  const Profile& sp = server_profile();
  st.f = dp.forward_s(0, p, mm) * ds.time_scale;
  st.b = dp.backward_s(0, p, mm) * ds.time_scale;
  // Private labels: the cut activation goes up without its labels.
  const int64_t up_bytes = c_.private_labels ? dp.gradient_bytes(p) : dp.activation_bytes(p);
  st.up = transfer_s(static_cast<double>(up_bytes) * mm, ds.link.up_mbps, ds.link.per_message_s);
  st.down = transfer_s(static_cast<double>(dp.gradient_bytes(p)) * mm, ds.link.down_mbps, ds.link.per_message_s);
  if (c_.private_labels) {
    const size_t e = blocks_ - 1;  // the tail's first block; the middle output is block e-1's
    st.s = sp.forward_s(p, e, mm) * c_.server_time_scale + c_.server_per_micro_batch_s;
    st.s_back = sp.backward_s(p, e, mm) * c_.server_time_scale + c_.server_per_micro_batch_s;
    st.down_mid = transfer_s(static_cast<double>(dp.gradient_bytes(e)) * mm, ds.link.down_mbps, ds.link.per_message_s);
    st.up_mid = transfer_s(static_cast<double>(dp.gradient_bytes(e)) * mm, ds.link.up_mbps, ds.link.per_message_s);
    st.tail = (dp.forward_s(e, blocks_, mm) + dp.loss_time_s(mm) + dp.backward_s(e, blocks_, mm)) * ds.time_scale;
    return st;
  }
  st.s = (sp.forward_s(p, blocks_, mm) + sp.loss_time_s(mm) + sp.backward_s(p, blocks_, mm)) * c_.server_time_scale +
         c_.server_per_micro_batch_s;
  return st;
}

// --- the simulation --------------------------------------------------------------------------------

namespace {

struct Arrival {
  double t;
  size_t d;
  size_t i;
  bool back = false;  // private labels: the gradient of micro-batch i's middle output (else its activation)
  bool operator>(const Arrival& o) const {
    if (t != o.t) return t > o.t;
    if (d != o.d) return d > o.d;
    if (i != o.i) return i > o.i;
    return back > o.back;
  }
};

// A device's compute, one task at a time in the order its inputs arrive: a batch's forwards first,
// then backwards (and private labels' tails) as their gradients (middle outputs) come down the FIFO
// downlink, so in time order, then the optimizer step.
struct Task {
  enum Kind { kForward, kBackward, kTail, kStep } kind;
  size_t i = 0;
  double work = 0;   // seconds at the pace the profile was measured at
  double ready = 0;  // when its input is there
};

// Compute on cores that the devices and the server may share (Cluster::host_cores > 0): every
// running thread gets an equal share of the cores (processor sharing, as the OS's scheduler), so a
// task runs at its profile's pace only in the company its profile was measured in: a device's
// alongside all K devices (min(threads, cores / K) cores) or alone (Cluster::host_device_profiles_alone),
// the server's alone (min(threads, cores)).
// Each side keeps a virtual clock that advances at its current pace; a task ends when its side's
// clock has advanced by its work. Devices all run at one pace (their threads are the same), so their
// running tasks sit in one heap keyed by the virtual time they end at. A server of 0 threads (a GPU's)
// takes no core and keeps its pace. Not shared: both clocks are the real time, and a task ends exactly
// at its start plus its work.
class Cores {
 public:
  Cores(int cores, int device_threads, int server_threads, size_t k, bool devices_alone)
      : cores_(cores), dev_threads_(device_threads), srv_threads_(server_threads),
        dev_profiled_(std::min<double>(device_threads, static_cast<double>(cores) / static_cast<double>(devices_alone ? 1 : k))) {}
  bool shared() const { return cores_ > 0; }
  double device_clock() const { return vd_; }
  double server_clock() const { return vs_; }
  // The paces for `devices` running device tasks and the server's running on `server_threads` (0:
  // none, idle or on a GPU).
  void set_load(size_t devices, int server_threads) {
    if (!shared()) return;
    const double threads = static_cast<double>(devices) * dev_threads_ + server_threads;
    const double share = threads > cores_ ? cores_ / threads : 1.0;
    dev_pace_ = dev_threads_ * share / dev_profiled_;
    srv_pace_ = server_threads > 0 ? server_threads * share / std::min<double>(server_threads, cores_) : 1.0;
  }
  // Real time at which a side's clock reaches v (not before now).
  double device_end(double now, double v) const { return shared() ? now + std::max(0.0, v - vd_) / dev_pace_ : v; }
  double server_end(double now, double v) const { return shared() ? now + std::max(0.0, v - vs_) / srv_pace_ : v; }
  void advance(double now, double to) {
    if (!shared()) {
      vd_ = vs_ = to;
      return;
    }
    vd_ += dev_pace_ * (to - now);
    vs_ += srv_pace_ * (to - now);
  }
  // Whether a task ending at virtual time v has ended (rounding of the paces allowed for).
  bool device_done(double v) const { return reached(v, vd_); }
  bool server_done(double v) const { return reached(v, vs_); }
  int server_threads() const { return srv_threads_; }
  // Cores a task uses at its profile's pace: the core-seconds of its work per second of it.
  double device_cores() const { return dev_profiled_; }
  double server_cores(int threads) const { return std::min<double>(threads, cores_); }

 private:
  double cores_;
  double dev_threads_;
  int srv_threads_;
  double dev_profiled_;
  double vd_ = 0, vs_ = 0, dev_pace_ = 1, srv_pace_ = 1;

  bool reached(double v, double clock) const { return v <= clock + (shared() ? 1e-12 * std::max(1.0, std::abs(clock)) : 0.0); }
};

std::string device_name(size_t d) { return "device " + std::to_string(d); }

// Resource order in Timing::busy: server, then per device: compute, uplink, downlink.
Timing make_timing(size_t k) {
  Timing t;
  t.busy.push_back({"server", 0});
  for (size_t d = 0; d < k; ++d) {
    t.busy.push_back({device_name(d), 0});
    t.busy.push_back({device_name(d) + " uplink", 0});
    t.busy.push_back({device_name(d) + " downlink", 0});
  }
  return t;
}

void finish_timing(Timing& t) {
  t.bottleneck.clear();
  t.bottleneck_busy_s = -1;
  for (const ResourceBusy& r : t.busy)
    if (r.busy_s > t.bottleneck_busy_s) t.bottleneck = r.name, t.bottleneck_busy_s = r.busy_s;
}

}  // namespace

double CostModel::simulate(Mode mode, const std::vector<int>& split, int micro_batches, bool whole_round,
                           const std::vector<size_t>& devices, std::vector<double>& busy, double* cores_bound_s) const {
  const size_t k = c_.devices.size();
  busy.assign(1 + 3 * k, 0.0);
  double& server_busy = busy[0];
  auto compute_busy = [&](size_t d) -> double& { return busy[1 + 3 * d]; };
  auto up_busy = [&](size_t d) -> double& { return busy[2 + 3 * d]; };
  auto down_busy = [&](size_t d) -> double& { return busy[3 + 3 * d]; };
  const int n = (mode == Mode::kPipar) ? micro_batches : 1;
  PIPAR_CHECK(n >= 1, "micro-batches ", micro_batches);

  struct Dev {
    std::vector<int64_t> lens;   // batch lengths still to run (front: current)
    size_t batch = 0;
    std::vector<int64_t> sizes;  // the current batch's micro-batch sizes
    std::vector<Stage> st;       // their stage times
    double up_free = 0, down_free = 0;
    double step_dev = 0, step_srv = 0, w_up = 0, w_down = 0, latency = 0;
    std::vector<std::pair<int64_t, Stage>> cache;  // stage times by micro-batch size (few distinct)
    std::deque<Task> tasks;                        // compute to do, in the order its inputs arrive
    bool running = false, woken = false;           // woken: a wake-up is set for its next task's input
    Task task;
    double started = 0;  // cores shared: when `task` started
    double free = 0;     // cores not shared: when its compute comes free
  };
  std::vector<Dev> dev(k);
  using Timed = std::pair<double, size_t>;  // (time, device)
  // Shared cores: when an idle device's next input arrives (a round's first forwards': its part's weights).
  std::priority_queue<Timed, std::vector<Timed>, std::greater<>> wakes;
  std::priority_queue<Timed, std::vector<Timed>, std::greater<>> running;  // (end on the devices' clock, device)
  // Sent to the server, in arrival order: served once arrived (t <= now).
  std::priority_queue<Arrival, std::vector<Arrival>, std::greater<Arrival>> arrivals;
  std::vector<size_t> wake;  // devices that may start a task now
  const bool stacked = c_.server_stack > 0 && mode != Mode::kSl;  // sl's one server part is never stacked
  const bool grouped = (c_.server_lanes > 1 || stacked) && !c_.private_labels;
  const size_t lanes = stacked ? k : static_cast<size_t>(c_.server_lanes);
  const int lane_threads = std::max(1, c_.host_server_threads / c_.server_lanes);
  Cores cores(c_.host_cores, c_.host_device_threads, c_.host_server_threads, k, c_.host_device_profiles_alone);
  double now = 0, span = 0, core_s = 0;

  auto stage_of = [&](size_t d, int64_t m) -> const Stage& {
    for (const auto& [size, s] : dev[d].cache)
      if (size == m) return s;
    dev[d].cache.emplace_back(m, stage(d, split[d], m, mode));
    return dev[d].cache.back().second;
  };
  auto queue = [&](size_t d, Task t) {
    core_s += t.work * cores.device_cores();
    dev[d].tasks.push_back(t);
    wake.push_back(d);
  };
  auto start_batch = [&](size_t d, double at) {
    Dev& v = dev[d];
    v.sizes = micro_batch_sizes(v.lens[v.batch], n);
    v.st.clear();
    for (size_t i = 0; i < v.sizes.size(); ++i) {
      v.st.push_back(stage_of(d, v.sizes[i]));
      queue(d, {Task::kForward, i, v.st.back().f, at});
    }
  };
  auto end_device = [&](size_t d, double t_end) {
    Dev& v = dev[d];
    if (whole_round) {
      const double u = std::max(t_end, v.up_free) + v.w_up;
      up_busy(d) += v.w_up;
      v.up_free = u;
      t_end = u + v.latency;
    }
    span = std::max(span, t_end);
  };
  // A message of `seconds` on a FIFO link direction from `at`; it reaches the other end after the latency.
  auto send = [&](double& link_free, double& link_busy, double seconds, double latency, double at) {
    link_free = std::max(at, link_free) + seconds;
    link_busy += seconds;
    return link_free + latency;
  };

  for (size_t d : devices) {
    Dev& v = dev[d];
    const DeviceSpec& ds = c_.devices[d];
    const size_t p = static_cast<size_t>(split[d]);
    v.lens = whole_round ? batch_lengths(ds.samples, c_.batch_size) : std::vector<int64_t>{c_.batch_size};
    v.latency = ds.link.latency_s;
    v.step_dev = (device_profile(d).step_s(0, p) + (c_.private_labels ? device_profile(d).step_s(blocks_ - 1, blocks_) : 0.0)) *
                 ds.time_scale;
    v.step_srv = server_profile().step_s(p, server_end()) * c_.server_time_scale;
    const double w = static_cast<double>(device_state_bytes(d, p));
    v.w_down = transfer_s(w, ds.link.down_mbps, ds.link.per_message_s);
    v.w_up = transfer_s(w, ds.link.up_mbps, ds.link.per_message_s);
    start_batch(d, whole_round ? send(v.down_free, down_busy(d), v.w_down, v.latency, 0) : 0);  // once the weights are there
  }

  // Device d's task t ended at `at`.
  auto device_done = [&](size_t d, const Task& t, double at) {
    Dev& v = dev[d];
    if (t.kind == Task::kForward) {
      arrivals.push({send(v.up_free, up_busy(d), v.st[t.i].up, v.latency, at), d, t.i});
    } else if (t.kind == Task::kTail) {  // the output's gradient up, arriving as a second visit
      arrivals.push({send(v.up_free, up_busy(d), v.st[t.i].up_mid, v.latency, at), d, t.i, true});
    } else if (t.kind == Task::kBackward) {
      if (t.i + 1 == v.sizes.size()) queue(d, {Task::kStep, t.i, v.step_dev, at});  // gradients of one device arrive in order
    } else if (++v.batch < v.lens.size()) {
      start_batch(d, at);
    } else {
      end_device(d, at);
    }
  };
  // Device d starts what it can. Cores not shared: a task ends at its start plus its work whatever
  // else runs, so every task queued runs at once, each at its own time (the arrivals it sends wait in
  // the server's queue until their time). Shared: its next task, if its input is there, else a
  // wake-up when it arrives.
  auto dispatch = [&](size_t d) {
    Dev& v = dev[d];
    if (!cores.shared()) {
      while (!v.tasks.empty()) {
        const Task t = v.tasks.front();
        v.tasks.pop_front();
        v.free = std::max(v.free, t.ready) + t.work;
        compute_busy(d) += t.work;
        device_done(d, t, v.free);
      }
      return;
    }
    if (v.running || v.woken || v.tasks.empty()) return;
    if (v.tasks.front().ready > now) {
      v.woken = true;
      wakes.push({v.tasks.front().ready, d});
      return;
    }
    v.task = v.tasks.front();
    v.tasks.pop_front();
    v.running = true;
    v.started = now;
    running.push({cores.device_clock() + v.task.work, d});
  };

  // The server: one micro-batch at a time in arrival order, or (lanes, stacks) a group of what has
  // arrived, at most one per device and `lanes` in all, earliest first. Kernels on the lanes, one
  // each (the longest sets the group's time), or one stacked call per stack and size; per-message
  // work and steps on the server's loop, one after another; all its gradients leave at its end.
  std::vector<Arrival> serving, skipped;
  bool serving_now = false;
  double server_started = 0, server_work = 0;
  double server_end_v = 0;  // on the server's virtual clock
  int server_threads = 0;   // of what it serves (0 where it takes no host core)
  std::vector<std::pair<size_t, int64_t>> calls;
  std::vector<char> in_group(k, 0);
  auto start_server = [&] {
    serving.clear();
    double work = 0;
    if (!grouped) {
      const Arrival a = arrivals.top();
      arrivals.pop();
      serving.push_back(a);
      const Dev& v = dev[a.d];
      const Stage& s = v.st[a.i];
      const bool last = a.i + 1 == v.sizes.size();
      // The middle forward (private labels); else the whole server part, stepping before the last gradient goes.
      work = c_.private_labels && !a.back ? s.s : (c_.private_labels ? s.s_back : s.s) + (last ? v.step_srv : 0.0);
      server_threads = cores.server_threads();
    } else {
      skipped.clear();  // of devices already in the group: the next groups'
      while (!arrivals.empty() && arrivals.top().t <= now && serving.size() < lanes) {
        const Arrival a = arrivals.top();
        arrivals.pop();
        if (in_group[a.d]) {
          skipped.push_back(a);
        } else {
          serving.push_back(a);
          in_group[a.d] = 1;
        }
      }
      for (const Arrival& a : skipped) arrivals.push(a);
      double longest = 0, serial = 0;
      calls.clear();
      for (const Arrival& a : serving) {
        const Dev& v = dev[a.d];
        in_group[a.d] = 0;
        serial += c_.server_per_micro_batch_s + (a.i + 1 == v.sizes.size() ? v.step_srv : 0.0);
        if (!stacked) {
          longest = std::max(longest, v.st[a.i].s - c_.server_per_micro_batch_s);
          continue;
        }
        const std::pair<size_t, int64_t> call{stack_of(a.d), v.sizes[a.i]};
        if (std::find(calls.begin(), calls.end(), call) != calls.end()) continue;
        calls.push_back(call);
        longest += stack_call_s(call.first, static_cast<size_t>(split[a.d]), call.second);
      }
      work = longest + serial;
      server_threads = stacked ? cores.server_threads()
                               : std::min(cores.server_threads(), lane_threads * static_cast<int>(serving.size()));
    }
    server_started = now;
    server_work = work;
    server_end_v = cores.server_clock() + work;
    serving_now = true;
  };
  auto server_done = [&] {
    serving_now = false;
    server_busy += cores.shared() ? now - server_started : server_work;
    core_s += server_work * cores.server_cores(server_threads);
    server_threads = 0;
    for (const Arrival& a : serving) {
      Dev& v = dev[a.d];
      const Stage& s = v.st[a.i];
      if (c_.private_labels && !a.back)  // the middle output down to the device's tail
        queue(a.d, {Task::kTail, a.i, s.tail, send(v.down_free, down_busy(a.d), s.down_mid, v.latency, now)});
      else  // the gradient down to the device's backward
        queue(a.d, {Task::kBackward, a.i, s.b, send(v.down_free, down_busy(a.d), s.down, v.latency, now)});
    }
  };

  for (;;) {
    // Whatever can start now does (a device whose next input is still on its way wakes when it
    // arrives), then the paces follow the new load.
    for (size_t w = 0; w < wake.size(); ++w) dispatch(wake[w]);  // (may wake more)
    wake.clear();
    if (!serving_now && !arrivals.empty() && arrivals.top().t <= now) start_server();
    cores.set_load(running.size(), server_threads);
    // The next moment anything happens.
    double next = std::numeric_limits<double>::infinity();
    if (!running.empty()) next = cores.device_end(now, running.top().first);
    if (serving_now) next = std::min(next, cores.server_end(now, server_end_v));
    else if (!arrivals.empty()) next = std::min(next, arrivals.top().t);
    if (!wakes.empty()) next = std::min(next, wakes.top().first);
    if (next == std::numeric_limits<double>::infinity()) break;
    next = std::max(now, next);
    cores.advance(now, next);
    now = next;
    if (serving_now && cores.server_done(server_end_v)) server_done();
    while (!running.empty() && cores.device_done(running.top().first)) {
      const size_t d = running.top().second;
      running.pop();
      dev[d].running = false;
      compute_busy(d) += now - dev[d].started;
      wake.push_back(d);
      device_done(d, dev[d].task, now);
    }
    while (!wakes.empty() && wakes.top().first <= now) {
      const size_t d = wakes.top().second;
      wakes.pop();
      dev[d].woken = false;
      wake.push_back(d);
    }
  }
  if (cores_bound_s) *cores_bound_s = cores.shared() ? core_s / c_.host_cores : 0.0;
  return span;
}

Timing CostModel::simulate_timing(Mode mode, const std::vector<int>& split, int micro_batches, bool whole_round,
                                  const std::vector<size_t>& devices) const {
  Timing t = make_timing(c_.devices.size());
  std::vector<double> busy;
  double host = 0;
  t.span_s = simulate(mode, split, micro_batches, whole_round, devices, busy, &host);
  for (size_t r = 0; r < busy.size(); ++r) t.busy[r].busy_s = busy[r];
  // Last, after the resources that callers index: names the bottleneck when the shared cores bind.
  if (c_.host_cores > 0) t.busy.push_back({"host cores", host});
  return t;
}

std::vector<size_t> CostModel::all_devices() const {
  std::vector<size_t> all(c_.devices.size());
  for (size_t d = 0; d < all.size(); ++d) all[d] = d;
  return all;
}

Timing CostModel::batch(Mode mode, const std::vector<int>& split, int micro_batches) const {
  check_split(split, mode);
  PIPAR_CHECK(micro_batches >= 1, "micro-batches ", micro_batches);
  const size_t k = c_.devices.size();
  Timing t = make_timing(k);
  if (mode == Mode::kFl) {
    for (size_t d = 0; d < k; ++d) {
      const double c = stage(d, 0, c_.batch_size, mode).f + device_profile(d).step_s(0, blocks_) * c_.devices[d].time_scale;
      t.busy[1 + 3 * d].busy_s = c;
      t.span_s = std::max(t.span_s, c);
    }
  } else if (mode == Mode::kSl) {
    for (size_t d = 0; d < k; ++d) {
      const Timing one = simulate_timing(mode, split, 1, false, {d});
      t.span_s += one.span_s;
      for (size_t r = 0; r < t.busy.size(); ++r) t.busy[r].busy_s += one.busy[r].busy_s;
    }
  } else {
    t = simulate_timing(mode, split, micro_batches, false, all_devices());
  }
  finish_timing(t);
  return t;
}

Timing CostModel::round(Mode mode, const std::vector<int>& split, int micro_batches) const {
  check_split(split, mode);
  PIPAR_CHECK(micro_batches >= 1, "micro-batches ", micro_batches);
  const size_t k = c_.devices.size();
  Timing t = make_timing(k);
  if (mode == Mode::kFl) {
    for (size_t d = 0; d < k; ++d) {
      const DeviceSpec& ds = c_.devices[d];
      const double w = static_cast<double>(device_profile(d).state_bytes(0, blocks_));
      const double down = transfer_s(w, ds.link.down_mbps, ds.link.per_message_s);
      const double up = transfer_s(w, ds.link.up_mbps, ds.link.per_message_s);
      double c = 0;
      for (int64_t len : batch_lengths(ds.samples, c_.batch_size))
        c += stage(d, 0, len, mode).f + device_profile(d).step_s(0, blocks_) * ds.time_scale;
      t.busy[1 + 3 * d].busy_s = c;
      t.busy[2 + 3 * d].busy_s = up;
      t.busy[3 + 3 * d].busy_s = down;
      t.span_s = std::max(t.span_s, down + up + 2 * ds.link.latency_s + c);
    }
  } else if (mode == Mode::kSl) {
    for (size_t d = 0; d < k; ++d) {
      const Timing one = simulate_timing(mode, split, 1, true, {d});
      t.span_s += one.span_s;
      for (size_t r = 0; r < t.busy.size(); ++r) t.busy[r].busy_s += one.busy[r].busy_s;
    }
  } else {
    t = simulate_timing(mode, split, micro_batches, true, all_devices());
  }
  t.span_s += c_.aggregation_s;
  t.busy[0].busy_s += c_.aggregation_s;
  finish_timing(t);
  return t;
}

double CostModel::round_estimate_s(Mode mode, const std::vector<int>& split, int micro_batches) const {
  if (mode == Mode::kFl || mode == Mode::kSl) return round(mode, split, micro_batches).span_s;
  check_split(split, mode);
  PIPAR_CHECK(micro_batches >= 1, "micro-batches ", micro_batches);
  std::vector<double> busy;
  const double batch_span = simulate(mode, split, micro_batches, false, all_devices(), busy);
  size_t most = 0;
  double exchange = 0;
  for (size_t d = 0; d < c_.devices.size(); ++d) {
    const DeviceSpec& ds = c_.devices[d];
    most = std::max(most, batch_lengths(ds.samples, c_.batch_size).size());
    const double w = static_cast<double>(device_state_bytes(d, static_cast<size_t>(split[d])));
    exchange = std::max(exchange, transfer_s(w, ds.link.down_mbps, ds.link.per_message_s) +
                                      transfer_s(w, ds.link.up_mbps, ds.link.per_message_s) + 2 * ds.link.latency_s);
  }
  return batch_span * static_cast<double>(most) + exchange + c_.aggregation_s;
}

// --- memory ----------------------------------------------------------------------------------------

int64_t CostModel::device_memory_bytes(size_t d, int split, int micro_batches) const {
  PIPAR_CHECK(d < c_.devices.size(), "device ", d);
  const Profile& p = device_profile(d);
  const int64_t bs = c_.batch_size;
  if (split <= 0 || static_cast<size_t>(split) >= blocks_) {  // fl: the whole model
    return 3 * p.param_bytes(0, blocks_) + (p.state_bytes(0, blocks_) - p.param_bytes(0, blocks_)) + bs * p.tape_bytes(0, blocks_);
  }
  const size_t s = static_cast<size_t>(split);
  const int64_t m_max = micro_batch_sizes(bs, std::max(1, micro_batches)).front();
  // Private labels: the tail's weights, and one micro-batch's tail tape and middle output at a time.
  const int64_t tail = c_.private_labels ? 3 * p.param_bytes(blocks_ - 1, blocks_) +
                                               (p.state_bytes(blocks_ - 1, blocks_) - p.param_bytes(blocks_ - 1, blocks_)) +
                                               m_max * (p.tape_bytes(blocks_ - 1, blocks_) + 2 * p.gradient_bytes(blocks_ - 1))
                                         : 0;
  return 3 * p.param_bytes(0, s) + (p.state_bytes(0, s) - p.param_bytes(0, s)) +
         bs * (p.tape_bytes(0, s) + p.activation_bytes(s)) + m_max * p.gradient_bytes(s) + tail;
}

int64_t CostModel::server_memory_bytes(Mode mode, const std::vector<int>& split, int micro_batches) const {
  const Profile& sp = server_profile();
  const int64_t bs = c_.batch_size;
  const int n = mode == Mode::kPipar ? std::max(1, micro_batches) : 1;
  if (mode == Mode::kFl) return static_cast<int64_t>(c_.devices.size() + 1) * sp.state_bytes(0, blocks_);
  check_split(split, mode);
  const int64_t m_max = micro_batch_sizes(bs, n).front();
  // A server-side part is a whole model (the runtime builds replicas of the whole model): values,
  // gradients and momentum of every parameter, and the buffers.
  const int64_t whole = sp.state_bytes(0, blocks_);
  const int64_t replica = 3 * sp.param_bytes(0, blocks_) + (whole - sp.param_bytes(0, blocks_));
  // FedAvg after the round: double accumulators (2x), one device's state and the average; then the
  // checkpoint's bytes: the model's values and momentum, and each server-side part's momentum.
  int64_t total = 4 * whole + 2 * sp.param_bytes(0, blocks_), tape = 0;
  for (size_t d = 0; d < split.size(); ++d) {
    const size_t s = static_cast<size_t>(split[d]);
    const size_t e = server_end();
    if ((mode != Mode::kSl && !c_.shared_server_model) || d == 0) total += replica + sp.param_bytes(s, e);
    // Private labels: every micro-batch's middle tape is kept until its output's gradient returns.
    tape = std::max(tape, (c_.private_labels ? bs : m_max) * sp.tape_bytes(s, e));
    // A batch of its activations queued on the way in and of their gradients on the way out (a slow
    // downlink), and its device part's weights message, kept until the round's FedAvg.
    if (mode != Mode::kSl || d == 0) total += 2 * bs * sp.activation_bytes(s) + sp.state_bytes(0, s);
  }
  if (c_.server_stack > 0 && mode != Mode::kSl) {
    // Each replica's slice of its stack, and one call of the largest stack at a time: its tape and its
    // stacked input and input gradient.
    const size_t s = static_cast<size_t>(split.front()), e = server_end();
    const int64_t slice = 3 * sp.param_bytes(s, e) + (sp.state_bytes(s, e) - sp.param_bytes(s, e));
    const int64_t largest = stack_size(0);
    return total + static_cast<int64_t>(split.size()) * slice +
           largest * m_max * (sp.tape_bytes(s, e) + 2 * sp.gradient_bytes(s));
  }
  // Cross-device batching: one tape per lane at once.
  const int64_t lanes = c_.private_labels ? 1 : std::min<int64_t>(c_.server_lanes, static_cast<int64_t>(split.size()));
  return total + tape * std::max<int64_t>(1, lanes);
}

}  // namespace pipar::planner
