// The cost model: predicted time of a batch and of a round of the distributed modes for given split
// points (one per device) and micro-batch count, as the critical path of the pipeline. K devices, each
// with its own profile, speed and link (up/down rate, latency, FIFO as transport/shaping.h); one
// server shared by all of them, serving micro-batches in arrival order (as runtime/modes/distributed.cpp).
//
// Per device d and micro-batch i of a batch (sizes as runtime/split.h's micro_batch_sizes):
//   F[i] = F[i-1] + f_d(m_i)                                 device forward, back to back
//   U[i] = max(F[i], U[i-1]) + up_d(m_i);  A[i] = U[i] + lat  uplink FIFO, arrival at the server
//   S    = max(A[i], S_prev) + s(m_i) (+ server step after a device's last micro-batch)
//   D[i] = max(S, D[i-1]) + down_d(m_i);   G[i] = D[i] + lat  downlink FIFO, gradient arrival
//   B[i] = max(G[i], B[i-1], F[N-1]) + b_d(m_i)               all forwards first, then backwards
//   batch end = B[N-1] + device step; the next batch of that device starts there.
// The server takes arrivals of all devices in time order. It runs as an event simulation (heaps:
// O(K N log K) per batch); with K = 1 and N = 1 a batch is exactly the sum of its stages.
//
// Shared host (Cluster::host_cores > 0, `pipar train`): the compute stages of the devices and the
// server run on the same cores, each running thread on an equal share of them (processor sharing),
// so a stage's time is its profile's only in the company its profile was measured in: the server's
// alone, a device's alongside all K devices (or alone too, where the devices measured their CPU time:
// Cluster::host_device_profiles_alone). A server stage that overlaps the devices' compute runs
// slower than its profile, a device's that runs while the others wait, faster.
//
// With server lanes L > 1 (cross-device batching), when the server comes free it takes the arrivals
// so far, at most one per device and L in all (earliest first), as a group: its kernels run side by
// side on the lanes, its per-message overheads and steps in turn, and all its gradients leave at the
// group's end. With stacks
// (Cluster::server_stack) a group takes every arrival so far, one per device, and its kernels are one
// stacked call per stack and size among them, timed by the stacks' own profiles.
//
// Private labels (Cluster::private_labels, a U-shaped split): the device keeps the last block and the
// loss, the server runs blocks [P, B-1). Each micro-batch makes an extra round trip: at its arrival the
// server runs the middle forward, the middle output goes down (downlink FIFO), the device runs the tail
// (forward, loss, backward) when its compute is free, the output's gradient goes up (uplink FIFO), and
// at that arrival the server runs the middle backward (+ step after the last) and sends the cut
// gradient down as before. The server's heap holds both kinds of arrival. With K = 1 and N = 1 a batch
// is f + up + s_fwd + down_mid + tail + up_mid + s_bwd + step_srv + down + b + step_dev (+ 4 latencies).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "planner/profile.h"

namespace pipar::planner {

enum class Mode { kPipar, kSfl, kSl, kFl };
const char* mode_name(Mode m);               // "pipar", "sfl", "sl", "fl"
Mode parse_mode(const std::string& name);    // throws pipar::Error naming the modes

// One device's link, both directions. A rate of 0 means unlimited (as LinkShape).
struct LinkSpec {
  double up_mbps = 10;
  double down_mbps = 25;
  double latency_s = 0;      // one way, added to every message in each direction
  double per_message_s = 0;  // (optional) fixed link occupancy per message: framing, syscalls
};

struct DeviceSpec {
  LinkSpec link;
  double time_scale = 1;  // compute time = profile time * time_scale (2: twice as slow)
  size_t profile = 0;     // index into Cluster::device_profiles
  int64_t samples = 0;    // partition size (batches per round as the runtime counts them); 0: one batch
};

struct Cluster {
  std::vector<Profile> device_profiles;   // at least one; all of the same model
  std::optional<Profile> server_profile;  // (optional) the server's; absent: device_profiles[0]
  double server_time_scale = 1;           // server compute = server profile time * this
  std::vector<DeviceSpec> devices;        // K >= 1
  int64_t batch_size = 100;
  double aggregation_s = 0;               // (optional) server time to average weights after a round
  // Server time per micro-batch beyond its kernels: receiving, decoding and checking the activation,
  // encoding and queuing the gradient, the loop around them. What makes very many tiny micro-batches
  // slower than the kernels' profile says; 0 in hand-made clusters, kServerPerMicroBatchS in the runtime.
  double server_per_micro_batch_s = 0;
  // Labels stay on the devices (--labels private): split points 1..B-2, the extra hop above; the
  // per-micro-batch server overhead is charged to each of the two server visits.
  bool private_labels = false;
  // The devices and the server share one machine's cores (`pipar train` launches its device processes
  // on the server's machine): 0 = separate machines. Then compute shares the cores (processor sharing,
  // above), and no round is shorter than its compute spread over them, however well it overlaps.
  int host_cores = 0;
  int host_server_threads = 1;  // threads of the server's kernels (its profile was measured alone with them); 0: a GPU's
  int host_device_threads = 1;  // threads of each device; their profiles were measured all at once
  // Their profiles are each device's speed alone (min(threads, cores)), not all K at once (min(threads,
  // cores / K)): profiled in CPU time on one thread (Profile::cpu_time), as `pipar train`'s devices do.
  bool host_device_profiles_alone = false;
  // sfl and pipar with one server-side model for all devices (--server-model shared): its weights,
  // gradients and momentum count once in the server's memory, not once per device.
  bool shared_server_model = false;
  // Cross-device batching (runtime/lanes.h; shared labels, a replica per device): the server trains up
  // to this many micro-batches that have arrived, at most one per device, as one group side by side,
  // and sends the group's gradients when all of it is done. The server profile is then one lane's
  // (measured on its share of the threads). 1: one micro-batch at a time.
  int server_lanes = 1;
  // Cross-device batching by stacking (--server-batching stack, runtime/replica_stack.h; shared labels,
  // a replica per device, one split point): the devices, in order, form stacks of at most server_stack
  // replicas. When the server comes free it takes every arrival so far, one per device, as a group, and
  // makes one call per stack and micro-batch size among them. A call computes every replica of its
  // stack, in the group or not, so its time depends on the stack's size, not the group's; per-message
  // work and each replica's own step follow in turn. sl (one server part) is never stacked. 0: no
  // stacks (else server_lanes must be 1).
  int server_stack = 0;
  // One profile per stack size in use (server_stack, and K mod server_stack where not 0), as
  // profile_stack measures it: a block's times are one call's for the whole stack, loss_s the rest of a
  // call; blocks below stack_split are not measured, so split points run stack_split..B-1.
  std::vector<std::pair<int, Profile>> stack_profiles;
  int stack_split = 1;
};

// The prior, until a round has measured it: on the development machine (bench/planner_grid.py, VGG5, 4
// device processes and the server on 2 Zen 3 cores, 50 Mbit/s, where the server is the bottleneck),
// rounds with N = 8, 16 and 51 micro-batches per batch ran 1.1-2.0 ms per server micro-batch longer
// than the profile-only model. The server measures its own from the first round on (its loop's time
// beyond kernels and steps: 0.06-0.12 ms with separate device processes on a 2-core Xeon) and
// re-plans with it, except where the devices share its cores (runtime/modes/distributed.cpp).
constexpr double kServerPerMicroBatchS = 1.5e-3;

// K identical devices on identical links (pipar plan --devices K --uplink-mbps X ...); the server
// uses the device profile times server_time_scale unless a server profile is set afterwards.
Cluster make_cluster(const Profile& device, size_t k, const LinkSpec& link, int64_t batch_size, int64_t samples_per_device = 0);

// A busy resource: "server", "device 2", "device 2 uplink", "device 2 downlink" (the names
// distributed.cpp writes into metrics.jsonl).
struct ResourceBusy {
  std::string name;
  double busy_s = 0;
};

struct Timing {
  double span_s = 0;                 // batch() : the batch's critical path; round(): the round's
  std::string bottleneck;            // the busiest resource over the span
  double bottleneck_busy_s = 0;
  std::vector<ResourceBusy> busy;    // every resource: server, then per device compute, uplink, downlink
                                     // (then "host cores" where the devices share the server's machine:
                                     // the compute's core-seconds over the cores); how long each was
                                     // occupied, compute stretched where it shared the cores
};

// Batches of a partition of n samples at batch size bs, as the runtime cuts them (a last batch of a
// single sample is dropped: batch-norm needs two). n = 0 means one full batch.
std::vector<int64_t> batch_lengths(int64_t n, int64_t bs);

class CostModel {
 public:
  explicit CostModel(Cluster cluster);  // validates; throws pipar::Error
  const Cluster& cluster() const { return c_; }
  size_t num_blocks() const { return blocks_; }
  // The server part's end block: B, or B-1 with private labels (the device keeps the last). Split
  // points run 1..server_end()-1.
  size_t server_end() const { return c_.private_labels ? blocks_ - 1 : blocks_; }
  size_t num_devices() const { return c_.devices.size(); }
  int64_t batch_size() const { return c_.batch_size; }
  // The largest min_micro_batch of the profiles; micro_batches_fit(N): every micro-batch of every
  // batch of every device (micro_batch_sizes as the runtime cuts them) has at least that many samples.
  int64_t min_micro_batch() const { return min_micro_; }
  bool micro_batches_fit(int micro_batches) const;

  // One full batch of every device, all starting together at t = 0. split[d] = device d's split
  // point (1 <= P < B, P <= B-2 with private labels; ignored for fl, may be empty then). sfl and sl use one micro-batch; sl runs
  // the devices one after another (span = sum of the devices' batch times).
  Timing batch(Mode mode, const std::vector<int>& split, int micro_batches) const;
  // A whole round: device-part weights down, every batch of every device (its partition), weights
  // up, aggregation. fl exchanges the whole model and trains it on the devices.
  Timing round(Mode mode, const std::vector<int>& split, int micro_batches) const;
  // A cheap stand-in for round(): the batch() span times the most batches any device has, plus the
  // slowest device's weight exchange and the aggregation (exact when every device has one batch).
  double round_estimate_s(Mode mode, const std::vector<int>& split, int micro_batches) const;

  // Estimated peak memory. Device: weights, gradients and momentum of its part, batch-norm state,
  // and the tapes and queued activations of all N micro-batches of a batch (every forward precedes
  // every backward). Server: one replica of the whole model per device (sl, shared server model: one)
  // with gradients and momentum, the tape of one micro-batch (per server lane), every device's
  // activations of a batch queued in and their gradients out, its device part's weights message, and
  // FedAvg's accumulators. With stacks, each replica's server blocks a second time (its stack slice:
  // weights, gradients, momentum, statistics) and the largest stack's call: tapes, stacked input and
  // gradient of one micro-batch of every replica.
  int64_t device_memory_bytes(size_t d, int split, int micro_batches) const;
  int64_t server_memory_bytes(Mode mode, const std::vector<int>& split, int micro_batches) const;

  // Seconds to send `bytes` in one message over a link direction at rate_mbps (0: unlimited).
  static double transfer_s(double bytes, double rate_mbps, double per_message_s);

 private:
  struct Stage;  // per-micro-batch-size stage times of one device at one split
  Stage stage(size_t d, int split, int64_t m, Mode mode) const;
  // The event simulation over `devices`; returns the span, busy[] as Timing::busy's order: how long
  // each resource was occupied (a compute stage at its profile's time, or as long as shared cores
  // stretch it), and *cores_bound_s (if given) the compute's core-seconds spread over the shared
  // cores (0 when not shared): a device's work at min(threads, cores / K) cores, the server's at
  // min(its threads, cores).
  double simulate(Mode mode, const std::vector<int>& split, int micro_batches, bool whole_round,
                  const std::vector<size_t>& devices, std::vector<double>& busy, double* cores_bound_s = nullptr) const;
  Timing simulate_timing(Mode mode, const std::vector<int>& split, int micro_batches, bool whole_round,
                         const std::vector<size_t>& devices) const;
  std::vector<size_t> all_devices() const;
  const Profile& device_profile(size_t d) const { return c_.device_profiles[c_.devices[d].profile]; }
  const Profile& server_profile() const { return c_.server_profile ? *c_.server_profile : c_.device_profiles[0]; }
  void check_split(const std::vector<int>& split, Mode mode) const;
  // The device part's weight bytes (with private labels: and the tail's).
  int64_t device_state_bytes(size_t d, size_t split) const;
  // Stacks (Cluster::server_stack > 0): the stack of device d, its size, and one call's time for
  // micro-batches of m samples at split point p (server_time_scale applied).
  size_t stack_of(size_t d) const { return d / static_cast<size_t>(c_.server_stack); }
  int64_t stack_size(size_t s) const;
  double stack_call_s(size_t s, size_t split, int64_t m) const;
  const Profile& stack_profile(size_t s) const;

  Cluster c_;
  size_t blocks_ = 0;
  // Stacks: how many, and the index in c_.stack_profiles of a full stack's profile and the last's.
  size_t stacks_ = 0, full_stack_profile_ = 0, last_stack_profile_ = 0;
  int64_t min_micro_ = 1;
};

}  // namespace pipar::planner
