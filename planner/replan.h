// Re-planning policy at round boundaries: compare the link rates and compute speeds measured during
// training with those the plan in force was made for; when any drifted by more than a fraction
// (default 20%), update the cluster with the measurements and search again. Pure logic, no clock.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "planner/search.h"

namespace pipar::planner {

// Measured in the last round(s). Per-device vectors are either empty (nothing measured) or hold one
// value per device; a value <= 0 or NaN means "not measured" for that device.
struct Measurement {
  std::vector<double> up_mbps;
  std::vector<double> down_mbps;
  std::vector<double> device_time_scale;  // measured compute time / profile time (as DeviceSpec::time_scale)
  double server_time_scale = 0;           // measured server time / server profile time
  // The server's time per micro-batch beyond its kernels and steps (as Cluster::server_per_micro_batch_s):
  // its loop's busy time around them, over the micro-batches it served.
  double server_per_micro_batch_s = 0;
  // The server's time averaging the round's weights (as Cluster::aggregation_s).
  double aggregation_s = 0;
};

struct ReplanOptions {
  double drift = 0.2;      // relative change |new/old - 1| that triggers a re-plan
  double min_gain = 0.02;  // switch plans only when the new one is predicted this fraction faster
  SearchOptions search;    // its mode is overridden by the current plan's
  bool search_plans = true;  // false: never change the plan, only re-score it under the measurements
};

struct ReplanDecision {
  bool drifted = false;              // some measurement moved by more than options.drift
  bool changed = false;              // plan differs from the current one (split or N)
  std::vector<std::string> reasons;  // "device 2 uplink 10 -> 5 Mbit/s (-50%)", one per drift
  Cluster cluster;                   // the basis of `plan`: the measurements applied when drifted, else unchanged
  Plan plan;                         // the plan for the next round (the current one when !changed)
  double current_round_s = 0;        // the current plan's predicted round under `cluster`
};

// Decides whether to re-plan. `used` is the cluster the current plan was made for; pass the returned
// cluster as `used` next time.
ReplanDecision replan(const Cluster& used, const Plan& current, const Measurement& measured,
                      const ReplanOptions& options = {});

// A device under a CPU quota (its profile's cpu_quota_cores) is measured only where its predicted
// compute is at least this share of the round, and never faster than its profile.
constexpr double kQuotaMinShare = 0.5;

// A Measurement from one round's measured busy seconds (metrics.jsonl's device_busy_seconds and the
// server's busy time on its kernels and steps, aggregation excluded) and link rates: the time
// scales are the basis's scaled by measured / predicted busy time of `plan` under `used` (so they stay
// relative to the profiles). Empty or non-positive entries mean "not measured". A compute resource
// whose predicted busy time is under min_share of the predicted round is left unmeasured: its few
// small ops, mostly fixed costs, would be extrapolated to the blocks another plan gives it.
// The server's busy time is compared with the prediction less its per-micro-batch part
// (used.server_per_micro_batch_s for each micro-batch it serves). server_per_micro_batch_s > 0: the
// server's measured time per micro-batch beyond its kernels and steps, passed on.
Measurement measurement_from_round(const Cluster& used, const Plan& plan, const std::vector<double>& device_busy_s,
                                   double server_busy_s, const std::vector<double>& up_mbps = {},
                                   const std::vector<double>& down_mbps = {}, double min_share = 0.1,
                                   double server_per_micro_batch_s = 0);

// How many micro-batches the server serves in a round of `plan` on cluster c, as the runtime cuts
// batches (min(batch, N) micro-batches each; two visits each with private labels; 0 for fl).
int64_t server_micro_batches(const Cluster& c, const Plan& plan);

// The verdict on a re-plan once the first round under it has been timed, per sample, against the last
// round under the plan before it, on the same links. Slower by more than `margin`: undo it (the cost
// model misjudged the new plan). Slower by less (noise, or a small misjudgement): keep it, but let only
// drifting links re-plan from then on, or re-plans on measured speeds could walk the run slower in
// steps each under the margin (seen: N 42 -> 64 over four rounds, each 2-3% slower).
struct ReplanVerdict {
  bool undo = false;
  bool stop_speed_replans = false;
};
ReplanVerdict judge_replan(double before_per_sample_s, double after_per_sample_s, bool same_links, double margin = 0.10);

// Link rate from real transfers: total bytes * 8 / total transmission seconds, in Mbit/s (0 when no
// transfer took time). Each pair is (bytes, seconds from first to last bit, latency excluded).
double measured_mbps(const std::vector<std::pair<double, double>>& transfers);
// A link from a probe's round trips (seconds, the best of a few each): rtt0 with (nearly) empty messages
// both ways, rtt_down with down_bytes more sent down, rtt_up with up_bytes more sent back up. Latency
// (one way, with the per-message work of both ends) = rtt0 / 2; each rate = its bytes * 8 over its
// round trip's excess over rtt0, in Mbit/s, 0 (unlimited) where that excess is not positive.
LinkSpec link_from_probes(double rtt0_s, double down_bytes, double rtt_down_s, double up_bytes, double rtt_up_s);
// A compute speed factor: measured seconds over the seconds the profile predicts (0 when unknown).
double measured_time_scale(double measured_s, double predicted_s);

}  // namespace pipar::planner
