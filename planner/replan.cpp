// Re-planning policy: drift detection against the plan's basis, then a fresh search with hysteresis.
#include "planner/replan.h"

#include <algorithm>
#include <cmath>
#include <sstream>

namespace pipar::planner {

namespace {

bool measured(double v) { return std::isfinite(v) && v > 0; }

std::string percent(double from, double to) {
  std::ostringstream os;
  os.precision(3);
  os << from << " -> " << to;
  const double pct = std::round((to / from - 1) * 100);
  os << " (" << (pct >= 0 ? "+" : "") << pct << "%)";
  return os.str();
}

void check_size(const std::vector<double>& v, size_t k, const char* what) {
  if (!v.empty() && v.size() != k)
    throw Error(detail::concat("replan: ", v.size(), " ", what, " measurements for ", k, " devices"));
}

}  // namespace

ReplanDecision replan(const Cluster& used, const Plan& current, const Measurement& m, const ReplanOptions& options) {
  PIPAR_CHECK(options.drift >= 0 && options.min_gain >= 0, "drift ", options.drift, ", min_gain ", options.min_gain);
  const size_t k = used.devices.size();
  check_size(m.up_mbps, k, "uplink");
  check_size(m.down_mbps, k, "downlink");
  check_size(m.device_time_scale, k, "device speed");
  ReplanDecision out;
  out.cluster = used;
  out.plan = current;

  // A rate of 0 (unlimited) in the basis cannot drift relative to it; a measured rate then replaces it
  // only when a re-plan happens for another reason.
  auto consider = [&](double old_v, double new_v, double& slot, const std::string& what) {
    if (!measured(new_v)) return;
    slot = new_v;
    if (old_v > 0 && std::abs(new_v / old_v - 1) > options.drift) {
      out.drifted = true;
      out.reasons.push_back(what + " " + percent(old_v, new_v));
    }
  };
  for (size_t d = 0; d < k; ++d) {
    const std::string dn = "device " + std::to_string(d);
    DeviceSpec& ds = out.cluster.devices[d];
    if (!m.up_mbps.empty()) consider(used.devices[d].link.up_mbps, m.up_mbps[d], ds.link.up_mbps, dn + " uplink Mbit/s");
    if (!m.down_mbps.empty())
      consider(used.devices[d].link.down_mbps, m.down_mbps[d], ds.link.down_mbps, dn + " downlink Mbit/s");
    if (!m.device_time_scale.empty())
      consider(used.devices[d].time_scale, m.device_time_scale[d], ds.time_scale, dn + " time scale");
  }
  consider(used.server_time_scale, m.server_time_scale, out.cluster.server_time_scale, "server time scale");
  // Seconds of the round (the aggregation; the server's time per micro-batch, `times` a round) drift
  // only where the change moves the round by more than the drift's share of it: a few microseconds
  // either way would re-plan every round for nothing.
  const double round_s = CostModel(used).round(current.mode, current.split, current.micro_batches).span_s;
  auto consider_seconds = [&](double old_v, double new_v, double& slot, double times, const char* what, double unit,
                              const char* unit_name) {
    if (!measured(new_v)) return;
    slot = new_v;
    const double change_s = std::abs(new_v - old_v) * times;
    if (change_s <= options.drift * round_s) return;
    out.drifted = true;
    std::ostringstream os;
    os.precision(3);
    os << what << " " << old_v * unit << " -> " << new_v * unit << " " << unit_name << " (" << change_s << " s a round)";
    out.reasons.push_back(os.str());
  };
  consider_seconds(used.aggregation_s, m.aggregation_s, out.cluster.aggregation_s, 1.0, "aggregation", 1.0, "s");
  consider_seconds(used.server_per_micro_batch_s, m.server_per_micro_batch_s, out.cluster.server_per_micro_batch_s,
                   static_cast<double>(server_micro_batches(used, current)), "server time per micro-batch", 1e3, "ms");

  if (!out.drifted) {
    out.cluster = used;
    out.current_round_s = round_s;
    return out;
  }
  const CostModel model(out.cluster);
  const Plan again = evaluate_plan(model, current.mode, current.split, current.micro_batches);
  out.current_round_s = again.round_s;
  if (!options.search_plans) {
    out.plan = again;
    return out;
  }
  SearchOptions so = options.search;
  so.mode = current.mode;
  const SearchResult found = search(model, so);
  const bool fits = static_cast<double>(again.device_memory_bytes) <= so.device_memory_limit &&
                    static_cast<double>(again.server_memory_bytes) <= so.server_memory_limit;
  const bool same = found.best.split == current.split && found.best.micro_batches == current.micro_batches;
  if (!same && (!fits || found.best.round_s < again.round_s * (1 - options.min_gain))) {
    out.plan = found.best;
    out.changed = true;
  } else {
    out.plan = again;  // the current plan, re-scored under the measurements
  }
  return out;
}

Measurement measurement_from_round(const Cluster& used, const Plan& plan, const std::vector<double>& device_busy_s,
                                   double server_busy_s, const std::vector<double>& up_mbps,
                                   const std::vector<double>& down_mbps, double min_share, double server_per_micro_batch_s) {
  const size_t k = used.devices.size();
  check_size(device_busy_s, k, "device busy");
  const Timing predicted = CostModel(used).round(plan.mode, plan.split, plan.micro_batches);
  Measurement m;
  m.up_mbps = up_mbps;
  m.down_mbps = down_mbps;
  // Compute that is a small share of the round says little about the blocks the next plan may move:
  // tiny ops are mostly fixed costs (and, under a CPU quota, run in bursts at full speed).
  const double least = min_share * predicted.span_s;
  if (!device_busy_s.empty()) {
    m.device_time_scale.assign(k, 0.0);
    for (size_t d = 0; d < k; ++d) {
      // A device under a CPU quota shows the speed its quota sustains (what its profile measured, under
      // a full load) only while its compute fills its quota: lightly loaded it runs in bursts on the
      // quota's slack (faster), or shares the quota with its own transport threads (slower, with the
      // bytes the plan sends, not with the blocks it computes). So it is measured only where its
      // compute is at least half the round, and never taken for faster than its profile.
      const bool quota = used.device_profiles[used.devices[d].profile].cpu_quota_cores > 0;
      if (predicted.busy[1 + 3 * d].busy_s < (quota ? std::max(least, kQuotaMinShare * predicted.span_s) : least)) continue;
      double r = measured_time_scale(device_busy_s[d], predicted.busy[1 + 3 * d].busy_s);
      if (quota && r > 0) r = std::max(r, 1.0);
      m.device_time_scale[d] = r > 0 ? r * used.devices[d].time_scale : 0.0;
    }
  }
  // The server's measured busy time is its kernels' and steps': the prediction's per-micro-batch part
  // is taken out, so that the scale is the kernels' alone.
  const double server_pred = predicted.busy[0].busy_s - used.aggregation_s -
                             used.server_per_micro_batch_s * static_cast<double>(server_micro_batches(used, plan));
  if (measured(server_per_micro_batch_s)) m.server_per_micro_batch_s = server_per_micro_batch_s;
  const double r = plan.mode == Mode::kFl || server_pred < least ? 0.0 : measured_time_scale(server_busy_s, server_pred);
  m.server_time_scale = r > 0 ? r * used.server_time_scale : 0.0;
  return m;
}

int64_t server_micro_batches(const Cluster& c, const Plan& plan) {
  if (plan.mode == Mode::kFl) return 0;
  const int64_t n = plan.mode == Mode::kPipar ? std::max(1, plan.micro_batches) : 1;
  int64_t visits = 0;
  for (const DeviceSpec& d : c.devices)
    for (int64_t len : batch_lengths(d.samples, c.batch_size)) visits += std::min(len, n);
  return c.private_labels ? 2 * visits : visits;
}

ReplanVerdict judge_replan(double before_per_sample_s, double after_per_sample_s, bool same_links, double margin) {
  ReplanVerdict v;
  if (!same_links || !measured(before_per_sample_s) || !measured(after_per_sample_s)) return v;
  v.undo = after_per_sample_s > before_per_sample_s * (1 + margin);
  v.stop_speed_replans = after_per_sample_s > before_per_sample_s;
  return v;
}

double measured_mbps(const std::vector<std::pair<double, double>>& transfers) {
  double bytes = 0, seconds = 0;
  for (const auto& [b, s] : transfers) {
    if (!(b >= 0) || !(s >= 0)) continue;
    bytes += b;
    seconds += s;
  }
  return seconds > 0 ? bytes * 8.0 / seconds / 1e6 : 0.0;
}

LinkSpec link_from_probes(double rtt0_s, double down_bytes, double rtt_down_s, double up_bytes, double rtt_up_s) {
  auto rate = [&](double bytes, double rtt) {
    const double t = rtt - rtt0_s;
    return measured(t) && measured(bytes) ? bytes * 8.0 / t / 1e6 : 0.0;
  };
  LinkSpec l;
  l.up_mbps = rate(up_bytes, rtt_up_s);
  l.down_mbps = rate(down_bytes, rtt_down_s);
  l.latency_s = measured(rtt0_s) ? rtt0_s / 2 : 0.0;
  return l;
}

double measured_time_scale(double measured_s, double predicted_s) {
  return measured(measured_s) && measured(predicted_s) ? measured_s / predicted_s : 0.0;
}

}  // namespace pipar::planner
