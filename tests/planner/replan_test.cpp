// Re-planning policy: no drift keeps the plan and its basis; a halved uplink re-plans to a cut with a
// smaller activation; drift without a better plan keeps the plan (hysteresis); unmeasured values
// are ignored; the measurement helpers.
#include <gtest/gtest.h>

#include <cmath>

#include "planner/replan.h"
#include "tests/planner/planner_test_util.h"

namespace pipar::planner {
namespace {

using test::synthetic_profile;

// Block 1's output is 2000 floats, block 2's 1000, block 3's 10; device compute is cheap for
// block 1 and dear for blocks 2-3, the server is fast: a fast uplink favours P=1, a slow one P=3.
Cluster cluster(double up_mbps) {
  Cluster c;
  c.device_profiles = {synthetic_profile({{1e-4, 2e-4, 2000}, {2e-3, 4e-3, 1000}, {2e-3, 4e-3, 10}, {1e-4, 1e-4, 10}})};
  c.server_time_scale = 0.05;
  c.batch_size = 100;
  for (int d = 0; d < 4; ++d) {
    DeviceSpec s;
    s.link = {up_mbps, 100, 0.001, 0};
    s.samples = 500;
    c.devices.push_back(s);
  }
  return c;
}

Plan best_plan(const Cluster& c) { return search(CostModel(c)).best; }

TEST(Replan, NoDriftKeepsThePlanAndItsBasis) {
  const Cluster used = cluster(100);
  const Plan current = best_plan(used);
  Measurement m;
  m.up_mbps = {110, 95, 90, 100};       // within 20%
  m.device_time_scale = {1.1, 0.9, 1, 1};
  const ReplanDecision d = replan(used, current, m);
  EXPECT_FALSE(d.drifted);
  EXPECT_FALSE(d.changed);
  EXPECT_TRUE(d.reasons.empty());
  EXPECT_EQ(d.plan.split, current.split);
  EXPECT_EQ(d.cluster.devices[0].link.up_mbps, 100);  // the basis stays, so slow drifts add up
  EXPECT_DOUBLE_EQ(d.current_round_s, current.round_s);
}

TEST(Replan, SlowerUplinkMovesTheCut) {
  const Cluster used = cluster(100);
  const Plan current = best_plan(used);
  Measurement m;
  m.up_mbps.assign(4, 2.0);
  m.down_mbps = {0, NAN, 100, 100};  // unmeasured entries are ignored
  const ReplanDecision d = replan(used, current, m);
  EXPECT_TRUE(d.drifted);
  ASSERT_EQ(d.reasons.size(), 4u);
  EXPECT_NE(d.reasons[2].find("device 2 uplink"), std::string::npos) << d.reasons[2];
  EXPECT_NE(d.reasons[2].find("-98%"), std::string::npos) << d.reasons[2];
  EXPECT_TRUE(d.changed);
  EXPECT_GT(d.plan.split[0], current.split[0]) << "from " << current.describe() << " to " << d.plan.describe();
  EXPECT_LT(d.plan.round_s, d.current_round_s);
  EXPECT_EQ(d.cluster.devices[3].link.up_mbps, 2.0);
  EXPECT_EQ(d.cluster.devices[0].link.down_mbps, 100);
  // The new plan is the best under the new conditions.
  EXPECT_EQ(d.plan.split, best_plan(d.cluster).split);
}

TEST(Replan, DriftWithoutABetterPlanKeepsThePlan) {
  const Cluster used = cluster(100);
  const Plan current = best_plan(used);
  Measurement m;
  m.server_time_scale = 0.05 * 1.5;  // +50% on a resource that is not the bottleneck
  ReplanOptions o;
  o.min_gain = 0.5;                  // demand a large gain
  const ReplanDecision d = replan(used, current, m, o);
  EXPECT_TRUE(d.drifted);
  EXPECT_FALSE(d.changed);
  EXPECT_EQ(d.plan.split, current.split);
  EXPECT_EQ(d.plan.micro_batches, current.micro_batches);
  EXPECT_DOUBLE_EQ(d.cluster.server_time_scale, 0.075);  // the new basis
  EXPECT_DOUBLE_EQ(d.plan.round_s, d.current_round_s);
}

TEST(Replan, SlowerDeviceDrifts) {
  const Cluster used = cluster(5);
  const Plan current = best_plan(used);
  Measurement m;
  m.device_time_scale = {1, 1, 3, 1};
  const ReplanDecision d = replan(used, current, m);
  EXPECT_TRUE(d.drifted);
  ASSERT_EQ(d.reasons.size(), 1u);
  EXPECT_NE(d.reasons[0].find("device 2 time scale"), std::string::npos);
  EXPECT_DOUBLE_EQ(d.cluster.devices[2].time_scale, 3);
  EXPECT_LE(d.plan.round_s, d.current_round_s);
  Measurement wrong;
  wrong.up_mbps = {1, 2};
  EXPECT_THROW(replan(used, current, wrong), Error);
}

TEST(Replan, MeasurementFromRoundBusyTimes) {
  Cluster used = cluster(100);
  used.devices[1].time_scale = 2;
  const Plan current = best_plan(used);
  const Timing t = CostModel(used).round(current.mode, current.split, current.micro_batches);
  // Device 1 measured 1.5x its prediction, device 3 unmeasured, the server at its prediction.
  const std::vector<double> busy = {t.busy[1].busy_s, 1.5 * t.busy[4].busy_s, t.busy[7].busy_s, 0};
  const Measurement m = measurement_from_round(used, current, busy, t.busy[0].busy_s, {50, 0, 100, 100});
  EXPECT_NEAR(m.device_time_scale[0], 1.0, 1e-12);
  EXPECT_NEAR(m.device_time_scale[1], 3.0, 1e-12);  // relative to the profile, not to the plan
  EXPECT_EQ(m.device_time_scale[3], 0.0);
  EXPECT_NEAR(m.server_time_scale, used.server_time_scale, 1e-12);
  const ReplanDecision d = replan(used, current, m);
  EXPECT_TRUE(d.drifted);
  EXPECT_EQ(d.reasons.size(), 2u);  // device 0 uplink, device 1 time scale
  EXPECT_DOUBLE_EQ(d.cluster.devices[1].time_scale, 3.0);
  EXPECT_DOUBLE_EQ(d.cluster.devices[3].time_scale, 1.0);
}

// The server's time per micro-batch beyond its kernels and steps, measured apart: its busy time (kernels
// and steps) is compared with the prediction less the per-micro-batch part (with or without a measured
// value), and a measured value replaces the basis's where the change is worth more than the drift's
// share of the round.
TEST(Replan, ServerTimePerMicroBatchIsMeasuredApartFromItsKernels) {
  Cluster used = cluster(100);
  used.server_per_micro_batch_s = 4e-3;
  const Plan current = evaluate_plan(CostModel(used), Mode::kPipar, {1, 1, 1, 1}, 8);
  const Timing t = CostModel(used).round(current.mode, current.split, current.micro_batches);
  const int64_t visits = server_micro_batches(used, current);
  EXPECT_EQ(visits, 4 * 5 * 8);  // 4 devices, 5 batches of 100, 8 micro-batches each
  const double kernels = t.busy[0].busy_s - visits * used.server_per_micro_batch_s;
  const std::vector<double> busy = {t.busy[1].busy_s, t.busy[4].busy_s, t.busy[7].busy_s, t.busy[10].busy_s};
  // The kernels ran as profiled, the loop took 0.2 ms a micro-batch: the scale stays.
  Measurement m = measurement_from_round(used, current, busy, kernels, {}, {}, 0.0, 0.2e-3);
  EXPECT_NEAR(m.server_time_scale, used.server_time_scale, 1e-9);
  EXPECT_EQ(m.server_per_micro_batch_s, 0.2e-3);
  // Without it, the scale is the same, and nothing else is measured.
  const Measurement scale_only = measurement_from_round(used, current, busy, kernels, {}, {}, 0.0);
  EXPECT_NEAR(scale_only.server_time_scale, used.server_time_scale, 1e-9);
  EXPECT_EQ(scale_only.server_per_micro_batch_s, 0.0);

  const ReplanDecision d = replan(used, current, m);
  const double change_s = 3.8e-3 * static_cast<double>(visits);
  ASSERT_GT(change_s, 0.2 * current.round_s);  // a change worth more than 20% of the round
  EXPECT_TRUE(d.drifted);
  ASSERT_EQ(d.reasons.size(), 1u);
  EXPECT_NE(d.reasons[0].find("server time per micro-batch 4 -> 0.2 ms"), std::string::npos) << d.reasons[0];
  EXPECT_DOUBLE_EQ(d.cluster.server_per_micro_batch_s, 0.2e-3);
  // 4 -> 4.1 ms: 16 ms of the round, no drift, and the basis keeps its value.
  m.server_per_micro_batch_s = 4.1e-3;
  const ReplanDecision same = replan(used, current, m);
  EXPECT_FALSE(same.drifted);
  EXPECT_DOUBLE_EQ(same.cluster.server_per_micro_batch_s, 4e-3);
}

// A fixed plan (search_plans off) is re-scored under the measurements, never replaced.
TEST(Replan, AFixedPlanIsReScoredNotReplaced) {
  const Cluster used = cluster(100);
  const Plan current = best_plan(used);
  Measurement m;
  m.up_mbps.assign(4, 2.0);
  ReplanOptions o;
  o.search_plans = false;
  const ReplanDecision d = replan(used, current, m, o);
  EXPECT_TRUE(d.drifted);
  EXPECT_FALSE(d.changed);
  EXPECT_EQ(d.plan.split, current.split);
  EXPECT_EQ(d.plan.micro_batches, current.micro_batches);
  EXPECT_GT(d.plan.round_s, 2 * current.round_s);  // the same plan on a 50x slower uplink
  EXPECT_DOUBLE_EQ(d.plan.round_s, d.current_round_s);
  EXPECT_TRUE(replan(used, current, m).changed);  // where the search may, it moves the cut
}

// The server's time averaging the weights, measured, joins the basis where it moves the round by more
// than the drift's share; a few milliseconds do not.
TEST(Replan, MeasuredAggregationJoinsTheBasisWhereItMatters) {
  const Cluster used = cluster(100);
  const Plan current = best_plan(used);
  Measurement m;
  m.aggregation_s = 0.5 * current.round_s;
  const ReplanDecision d = replan(used, current, m);
  EXPECT_TRUE(d.drifted);
  ASSERT_EQ(d.reasons.size(), 1u);
  EXPECT_NE(d.reasons[0].find("aggregation 0 -> "), std::string::npos) << d.reasons[0];
  EXPECT_DOUBLE_EQ(d.cluster.aggregation_s, m.aggregation_s);
  EXPECT_NEAR(d.current_round_s, 1.5 * current.round_s, 1e-9);  // the round now includes it
  m.aggregation_s = 0.01 * current.round_s;
  const ReplanDecision small = replan(used, current, m);
  EXPECT_FALSE(small.drifted);
  EXPECT_EQ(small.cluster.aggregation_s, 0.0);
}

TEST(Replan, ServerMicroBatchesAreCountedAsTheRuntimeCutsBatches) {
  Cluster c = cluster(100);
  c.devices.resize(2);
  c.devices[0].samples = 250;  // batches 100, 100, 50
  c.devices[1].samples = 201;  // 100, 100 (a last batch of one sample is dropped)
  Plan p;
  p.mode = Mode::kPipar;
  p.split = {1, 1};
  p.micro_batches = 64;
  EXPECT_EQ(server_micro_batches(c, p), 64 + 64 + 50 + 64 + 64);  // min(batch, N) each
  p.micro_batches = 8;
  EXPECT_EQ(server_micro_batches(c, p), 5 * 8);
  c.private_labels = true;  // two server visits a micro-batch
  EXPECT_EQ(server_micro_batches(c, p), 2 * 5 * 8);
  c.private_labels = false;
  p.mode = Mode::kSfl;
  EXPECT_EQ(server_micro_batches(c, p), 5);
  p.mode = Mode::kFl;
  EXPECT_EQ(server_micro_batches(c, p), 0);
}

// Compute under min_share of the predicted round is not measured: with the whole round as the
// threshold no device and not the server count; with 0 all do. (On devices under a CPU quota, the
// first block's few small ops ran at 0.2-0.5x their profiled time and, extrapolated to the blocks the
// next plan moved there, sent the re-planner to plans 2x slower than predicted.)
TEST(Replan, SmallShareOfTheRoundIsNotMeasured) {
  const Cluster used = cluster(100);
  const Plan current = best_plan(used);
  const Timing t = CostModel(used).round(current.mode, current.split, current.micro_batches);
  const std::vector<double> busy = {2 * t.busy[1].busy_s, 2 * t.busy[4].busy_s, 2 * t.busy[7].busy_s, 2 * t.busy[10].busy_s};
  const Measurement none = measurement_from_round(used, current, busy, 2 * t.busy[0].busy_s, {}, {}, 1.0);
  for (double s : none.device_time_scale) EXPECT_EQ(s, 0.0);
  EXPECT_EQ(none.server_time_scale, 0.0);
  const Measurement all = measurement_from_round(used, current, busy, 2 * t.busy[0].busy_s, {}, {}, 0.0);
  for (double s : all.device_time_scale) EXPECT_NEAR(s, 2.0, 1e-12);
  EXPECT_NEAR(all.server_time_scale, 2.0 * used.server_time_scale, 1e-9);
}

// A device under a CPU quota is measured only where its compute fills at least half the round (a light
// load runs in bursts on the quota's slack, or shares the quota with the device's transport threads:
// neither is the speed a heavier plan would see), and never taken for faster than its profile.
TEST(Replan, DeviceUnderAQuotaIsMeasuredOnlyUnderLoad) {
  Cluster used = cluster(100);
  used.device_profiles[0].cpu_quota_cores = 0.3;
  // Split 3: the devices compute the dear blocks (most of the round); split 1: a cheap one.
  for (const int p : {3, 1}) {
    SCOPED_TRACE(p);
    const Plan plan = evaluate_plan(CostModel(used), Mode::kPipar, {p, p, p, p}, 4);
    const Timing t = CostModel(used).round(plan.mode, plan.split, plan.micro_batches);
    const double share = t.busy[1].busy_s / t.span_s;
    ASSERT_TRUE(p == 3 ? share > kQuotaMinShare : share < kQuotaMinShare) << share;
    const std::vector<double> busy = {0.2 * t.busy[1].busy_s, 3 * t.busy[4].busy_s, 0.2 * t.busy[7].busy_s, t.busy[10].busy_s};
    const Measurement m = measurement_from_round(used, plan, busy, t.busy[0].busy_s, {}, {}, 0.0);
    if (p == 3) {
      EXPECT_NEAR(m.device_time_scale[0], 1.0, 1e-12);  // faster: not believed
      EXPECT_NEAR(m.device_time_scale[1], 3.0, 1e-12);  // slower: measured
    } else {
      for (double s : m.device_time_scale) EXPECT_EQ(s, 0.0);  // too light a load to tell
    }
    Cluster free = used;  // without a quota both count, at any share over min_share
    free.device_profiles[0].cpu_quota_cores = 0;
    const Measurement f = measurement_from_round(free, plan, busy, t.busy[0].busy_s, {}, {}, 0.0);
    EXPECT_NEAR(f.device_time_scale[0], 0.2, 1e-12);
    EXPECT_NEAR(f.device_time_scale[1], 3.0, 1e-12);
  }
}

TEST(Replan, MeasurementHelpers) {
  EXPECT_DOUBLE_EQ(measured_mbps({{1e6, 1.0}, {1e6, 1.0}}), 8.0);
  EXPECT_DOUBLE_EQ(measured_mbps({}), 0.0);
  EXPECT_DOUBLE_EQ(measured_time_scale(3.0, 1.5), 2.0);
  EXPECT_DOUBLE_EQ(measured_time_scale(3.0, 0), 0.0);
}

// A re-plan's first round against the last under the plan before, per sample: over the margin it is
// undone; slower within it, kept but measured speeds re-plan no more (a walk of small slow steps);
// faster, or on links that changed, or unmeasured, nothing.
// 10 Mbit/s up, 25 down, 2 ms each way: 1 MB down adds 0.32 s to the round trip, 0.5 MB up 0.4 s.
TEST(Replan, LinkFromProbeRoundTrips) {
  const LinkSpec l = link_from_probes(0.004, 1e6, 0.004 + 0.32, 0.5e6, 0.004 + 0.4);
  EXPECT_NEAR(l.down_mbps, 25.0, 1e-9);
  EXPECT_NEAR(l.up_mbps, 10.0, 1e-9);
  EXPECT_NEAR(l.latency_s, 0.002, 1e-12);
  const LinkSpec fast = link_from_probes(0.004, 1e6, 0.0039, 1e6, NAN);  // too fast to time, or not timed
  EXPECT_EQ(fast.down_mbps, 0.0);
  EXPECT_EQ(fast.up_mbps, 0.0);
}

TEST(Replan, VerdictOnARePlanUndoesOrStopsTheSlowSteps) {
  auto v = judge_replan(1.0, 1.2, true);
  EXPECT_TRUE(v.undo);
  EXPECT_TRUE(v.stop_speed_replans);
  v = judge_replan(1.0, 1.03, true);
  EXPECT_FALSE(v.undo);
  EXPECT_TRUE(v.stop_speed_replans);
  v = judge_replan(1.0, 0.9, true);
  EXPECT_FALSE(v.undo || v.stop_speed_replans);
  v = judge_replan(1.0, 1.5, false);  // the links moved: not comparable
  EXPECT_FALSE(v.undo || v.stop_speed_replans);
  v = judge_replan(0.0, 1.5, true);  // the plan before unmeasured
  EXPECT_FALSE(v.undo || v.stop_speed_replans);
  EXPECT_TRUE(judge_replan(1.0, 1.03, true, 0.02).undo);
}

}  // namespace
}  // namespace pipar::planner
