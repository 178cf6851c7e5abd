// The profiler: MEASURED forward and backward time of every block of a model on the CPU backend at a
// thread count and a few micro-batch sizes (time(m) interpolated between them), plus the bytes that
// matter to a split (activation at every cut, weights and batch-norm state, stashed tape). A Profile
// is plain data with a JSON form, so devices can ship theirs in the hello message.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/model.h"

namespace pipar::planner {

// One block's measurements. Times are in seconds, one value per Profile::sizes entry (medians),
// made non-decreasing in the size after measurement so that noise cannot make a bigger micro-batch
// cheaper.
struct BlockProfile {
  std::string kind;                  // "conv", "residual", ...
  std::vector<double> forward_s;     // training-mode forward (with a tape) at each size
  std::vector<double> backward_s;    // backward at each size (block 0 without the input gradient)
  double step_s = 0;                 // SGD step + zero_grad of the block's parameters (size-free)
  int64_t params = 0;                // trainable floats
  int64_t buffers = 0;               // non-trainable state floats (batch-norm statistics)
  int64_t out_floats = 0;            // per-sample floats of the block's output (the cut activation)
  int64_t tape_bytes = 0;            // per-sample bytes the forward leaves on the tape
};

struct Profile {
  static constexpr int kVersion = 1;
  std::string model;                 // zoo name
  Shape4 input{1, 1, 28, 28};        // per-sample input shape (n = 1)
  int num_classes = 10;
  bool batch_norm = true;
  std::string backend = "cpu";       // where it was measured
  std::string isa;                   // "avx2", ... (the CPU's, informational)
  int threads = 1;                   // kernels::num_threads() while measuring
  std::string source = "measured";   // "measured" | "estimated" (estimate_profile) | "synthetic"
  double seconds = 0;                // how long profiling took
  // The CPU quota it was measured under (cores, as cpu_quota(); 0: none). Its times are then the speed
  // the quota sustains under a full load; a lightly loaded process runs faster, in bursts.
  double cpu_quota_cores = 0;
  // Its times are CPU time (ProfileOptions::cpu_time_cores; on one thread that thread's), not the
  // wall clock's: on one thread, the speed it runs at with a core to itself, whatever else shared the
  // cores meanwhile.
  bool cpu_time = false;
  std::vector<int64_t> sizes;        // micro-batch sizes measured, strictly increasing, >= 1
  int64_t min_micro_batch = 1;       // the smallest size training accepts (2 where batch-norm sees one value per channel at 1)
  std::vector<double> loss_s;        // softmax cross-entropy (forward + gradient) at each size
  std::vector<BlockProfile> blocks;

  size_t num_blocks() const { return blocks.size(); }
  // Time at micro-batch size m (any m >= 0) of blocks [begin, end): piecewise-linear between the
  // measured sizes, extended with the nearest segment's slope outside them, never below 0.
  double forward_s(size_t begin, size_t end, double m) const;
  double backward_s(size_t begin, size_t end, double m) const;
  double loss_time_s(double m) const;
  double step_s(size_t begin, size_t end) const;
  // Bytes: the activation sent up when cutting after block p-1 (p = split point, 1 <= p < B), per
  // sample, with the 4-byte label; the gradient sent down (same floats, no label).
  int64_t activation_bytes(size_t p) const { return blocks.at(p - 1).out_floats * 4 + 4; }
  int64_t gradient_bytes(size_t p) const { return blocks.at(p - 1).out_floats * 4; }
  int64_t param_bytes(size_t begin, size_t end) const;   // trainable weights, float32
  int64_t state_bytes(size_t begin, size_t end) const;   // weights + buffers (what a Weights message holds)
  int64_t tape_bytes(size_t begin, size_t end) const;    // per sample

  // Throws pipar::Error naming the problem (sizes not increasing, array lengths, no blocks).
  void validate() const;
  std::string to_json() const;                            // one line
  static Profile from_json(const std::string& text);     // validates; throws pipar::Error
  static Profile load(const std::string& path);          // from a file (IoError when unreadable)
  void save(const std::string& path) const;
};

struct ProfileOptions {
  std::vector<int64_t> sizes = {1, 4, 16, 64};  // micro-batch sizes to measure (sorted, deduplicated); a size 1
                                                // the model cannot train on becomes 2 (min_micro_batch = 2)
  int threads = 0;      // kernels::set_num_threads for the measurement (restored after); 0: as is
  int warmup = 1;       // untimed passes at the smallest size first
  int repeats = 3;      // timed passes per size (at most); the median is kept
  double max_seconds_per_size = 1.0;  // no further repeat of a size once its passes took this long (>= 1 pass)
  // > 0: passes at each size go on until they took this long (past `repeats` and max_seconds_per_size),
  // and each time is the mean over them, not the median. For a process under a CPU quota (a container's
  // --cpus): it runs at full speed until its quota for the period is spent, then not at all, so only a
  // measurement over several periods sees its true speed (cpu_quota below).
  double min_seconds_per_size = 0;
  // > 0 (CPU only): each time is the process's CPU time over the interval divided by this many cores,
  // not the wall clock's. For a process whose CPU quota is below its threads: the quota's throttling
  // lands in whichever op is running when the period's budget runs out, so wall times of single ops
  // scatter (seen: 0.3 cores, 1 thread, 5 periods a size: the first two blocks of VGG5 1.5-2.8 ms a
  // sample over four profiles, while training ran them at 1.1-1.3) and their CPU time over the quota
  // is the speed the quota sustains.
  double cpu_time_cores = 0;
  uint64_t seed = 1;
  // The backend measured. kCuda: the model must be there (Model::to); every op runs on a stream of
  // the profiler's own and each timed op ends with the host waiting for it, so a time is what a
  // server that runs one op after another sees, launches and waits included.
  Device device = Device::kCpu;
};

// Measures a model (on options.device; its weights change, as a few SGD steps are taken): per size, passes of
// forward (with a tape) block by block, loss, backward block by block, SGD step per block, each timed.
Profile profile_model(Model& model, const ProfileOptions& options = {});
// Builds the zoo model `name` with `model_options` (on options.device) and measures it.
Profile profile_model(const std::string& name, const ModelOptions& model_options, const ProfileOptions& options = {});

// The stacked server (--server-batching stack): a stack of `replicas` server-side replicas of blocks
// [split, B) of the zoo model `name` (runtime/replica_stack.h), each call one micro-batch of m samples
// for every replica, on options.device with options.threads. Block b's times are one call's, for the
// whole stack; loss_s holds the rest of a call (the group assembled on the host, its copies up and
// down, the loss, the gradients split per replica); blocks below `split` and every step_s are 0 (the
// server steps each replica's slice apart: the plain profile's steps stand for them). Sizes whose call
// would hold more than max_samples samples (replicas x m) are not measured (the smallest always is):
// time(m) then extends the largest measured segment's slope. Bytes as profile_model's describe them,
// but tape_bytes 0 (the plain profile's serve).
Profile profile_stack(const std::string& name, const ModelOptions& model_options, size_t split, int replicas,
                      const ProfileOptions& options, int64_t max_samples);

// Stacks for cluster c (cost_model.h): its devices' replicas in stacks of at most stack_max, from
// split point `split` on. Measures the profile of each distinct stack size (stack_max, and the devices
// mod stack_max where not 0) on c's server profile's thread count and sets c.stack_profiles,
// c.server_stack = stack_max and c.stack_split = split. A call holds at most 4096 samples and 1 GiB of
// tape and stacked activations (by c's server profile, at `split`).
struct Cluster;
void profile_stacks(Cluster& c, const std::string& name, const ModelOptions& model_options, size_t split, int stack_max,
                    ProfileOptions options);

// This process's CPU quota, from its cgroup (v1 cpu.cfs_quota_us / cfs_period_us, or v2 cpu.max),
// the tightest of its group and the groups above it: cores (e.g. 0.5) and the period in seconds over
// which it is enforced. {0, 0} where none is set or none can be read.
struct CpuQuota {
  double cores = 0;
  double period_s = 0;
};
CpuQuota cpu_quota();

// A device's profile of this process as it runs (`pipar device`, `pipar plan`): profile_model, but under
// a CPU quota (cpu_quota) below the threads measured with, times are CPU time over the quota
// (cpu_time_cores), each size over several of the quota's periods (min_seconds_per_size), and the
// profile records the quota (cpu_quota_cores). *note (if given) says what the quota made it do.
// Without a binding quota, options.cpu_time_cores (if set) stands: a device that shares its machine's
// cores with others measured at the same time asks for its CPU time on one thread (cpu_time_cores 1).
Profile profile_this_process(Model& model, ProfileOptions options, std::string* note = nullptr);

// A FLOP-based estimate (no measurement): forward = fixed_s + flops/flops_per_s per block, backward
// twice the forward; bytes as measured would report, except tape_bytes (the block's output floats * 4
// * 3, a rough stand-in). For tests and for a server whose profile is unknown. source = "estimated".
Profile estimate_profile(Model& model, double flops_per_s, double fixed_s = 0,
                         const std::vector<int64_t>& sizes = {1, 100});

// The same profile with every time multiplied by `factor` (a slower or faster machine).
Profile scaled(const Profile& p, double factor);

}  // namespace pipar::planner
