// The cost model: exact sum of stages at K = 1, N = 1; hand-computed pipelines (K = 2, N = 2); the
// busiest resource as the limit for large N; monotonicity in rates, latency, speed and device count;
// the other modes' structure (sl = sequential, fl = local training + weight exchange); server lanes and stacks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "planner/cost_model.h"
#include "planner/search.h"
#include "tests/planner/planner_test_util.h"
#include "tests/random.h"

namespace pipar::planner {
namespace {

using test::SyntheticBlock;
using test::synthetic_profile;

// Two blocks: device forward 1 s/sample, backward 2 s/sample; server 0.5 + 0.5 s/sample; the cut
// activation is 250000 floats (1,000,004 bytes with the label, 1,000,000 bytes of gradient).
Cluster two_block_cluster(size_t k, double latency_s, double dev_step, double srv_step) {
  Cluster c;
  c.device_profiles = {synthetic_profile({{1.0, 2.0, 250000, 0, dev_step}, {0.5, 0.5, 10, 0, srv_step}})};
  c.batch_size = 2;
  for (size_t d = 0; d < k; ++d) {
    DeviceSpec s;
    s.link.up_mbps = 8.0 * 1000004 / 1e6;  // 1 s per sample up
    s.link.down_mbps = 8.0;                // 1 s per sample down
    s.link.latency_s = latency_s;
    c.devices.push_back(s);
  }
  return c;
}

// One device on a random link and speed, over min_blocks..8 random synthetic blocks that the server
// profile shares; odd trials add a fixed server cost per micro-batch.
Cluster random_one_device_cluster(pipar::test::Rng& rng, int min_blocks, int trial) {
  std::vector<SyntheticBlock> blocks;
  const int nb = rng.integer(min_blocks, 8);
  for (int b = 0; b < nb; ++b)
    blocks.push_back({rng.uniform(1e-4f, 1e-2f), rng.uniform(1e-4f, 2e-2f), rng.integer(1, 100000), rng.uniform(0, 1e-3f),
                      rng.uniform(0, 1e-3f), rng.integer(0, 100000)});
  Cluster c;
  c.device_profiles = {synthetic_profile(blocks)};
  c.server_profile = synthetic_profile(blocks);
  c.server_time_scale = rng.uniform(0.05f, 2.0f);
  c.server_per_micro_batch_s = trial % 2 ? rng.uniform(0, 2e-3f) : 0.0;
  c.batch_size = rng.integer(1, 200);
  DeviceSpec d;
  d.link = {rng.uniform(1, 100), rng.uniform(1, 100), rng.uniform(0, 0.05f), 0};
  d.time_scale = rng.uniform(0.5f, 3.0f);
  c.devices = {d};
  return c;
}

TEST(CostModel, OneDeviceOneMicroBatchIsTheSumOfStages) {
  SCOPED_TRACE(pipar::test::seed_trace());
  pipar::test::Rng rng(5);
  for (int trial = 0; trial < 20; ++trial) {
    const Cluster c = random_one_device_cluster(rng, 2, trial);
    const DeviceSpec& d = c.devices[0];
    const int nb = static_cast<int>(c.device_profiles[0].num_blocks());
    const CostModel model(c);
    const int p = rng.integer(1, nb - 1);
    const size_t ps = static_cast<size_t>(p), nbs = static_cast<size_t>(nb);
    const Profile& dp = c.device_profiles[0];
    const Profile& sp = *c.server_profile;
    const double m = static_cast<double>(c.batch_size);
    const double f = dp.forward_s(0, ps, m) * d.time_scale, b = dp.backward_s(0, ps, m) * d.time_scale;
    const double up = CostModel::transfer_s(static_cast<double>(dp.activation_bytes(ps)) * m, d.link.up_mbps, 0);
    const double down = CostModel::transfer_s(static_cast<double>(dp.gradient_bytes(ps)) * m, d.link.down_mbps, 0);
    const double s = (sp.forward_s(ps, nbs, m) + sp.loss_time_s(m) + sp.backward_s(ps, nbs, m)) * c.server_time_scale +
                     c.server_per_micro_batch_s;
    const double sstep = sp.step_s(ps, nbs) * c.server_time_scale, dstep = dp.step_s(0, ps) * d.time_scale;
    const double sum = f + up + d.link.latency_s + s + sstep + down + d.link.latency_s + b + dstep;
    for (Mode mode : {Mode::kPipar, Mode::kSfl, Mode::kSl}) EXPECT_DOUBLE_EQ(model.batch(mode, {p}, 1).span_s, sum) << mode_name(mode);
    // A round of one batch adds the weight exchange of the device part.
    const double w = static_cast<double>(dp.state_bytes(0, ps));
    const double wx = CostModel::transfer_s(w, d.link.down_mbps, 0) + CostModel::transfer_s(w, d.link.up_mbps, 0) + 2 * d.link.latency_s;
    EXPECT_NEAR(model.round(Mode::kPipar, {p}, 1).span_s, sum + wx, 1e-12 * (sum + wx));
  }
}

TEST(CostModel, HandComputedTwoDevicesTwoMicroBatches) {
  // m = 1 per micro-batch; f = 1, up = 1, s = 1, down = 1, b = 2 (seconds). Arrivals at the server:
  // d0 and d1 at 2 (then 3). Server: d0m0 2-3, d1m0 3-4, d0m1 4-5, d1m1 5-6. Downlinks: d0 3-4,
  // 5-6; d1 4-5, 6-7. Backwards (from F = 2): d0 4-6, 6-8; d1 5-7, 7-9. Batch: 9 s.
  const CostModel model(two_block_cluster(2, 0, 0, 0));
  const Timing t = model.batch(Mode::kPipar, {1, 1}, 2);
  EXPECT_NEAR(t.span_s, 9.0, 1e-9);
  EXPECT_EQ(t.bottleneck, "device 0");  // 6 s busy (tied with device 1; the first wins)
  EXPECT_NEAR(t.bottleneck_busy_s, 6.0, 1e-9);
  EXPECT_NEAR(t.busy[0].busy_s, 4.0, 1e-9);  // server
  EXPECT_NEAR(t.busy[2].busy_s, 2.0, 1e-9);  // device 0 uplink
  // sfl: one micro-batch of 2 per device: f 2, up 2 (both arrive at 4), server 4-6 and 6-8, down
  // 6-8 and 8-10, backward 8-12 and 10-14.
  EXPECT_NEAR(model.batch(Mode::kSfl, {1, 1}, 2).span_s, 14.0, 1e-9);
  // sl: one device after the other, each 2+2+2+2+4 = 12.
  EXPECT_NEAR(model.batch(Mode::kSl, {1, 1}, 2).span_s, 24.0, 1e-9);
}

// Devices and server on one machine's cores (pipar train): every running thread gets an equal share
// of the cores. The batch above on 2 cores, 1 thread per device (profiled 2 at once: 1 core each), 2
// for the server (profiled alone: 2 cores). Forwards and the server's first two micro-batches run as
// before (server d0m0 2-3, d1m0 3-4: no device computes then). At 4 d0's first backward (2 s of
// work) starts beside the server's d0m1 (1 s): 3 threads on 2 cores, each at 2/3 pace. At 5 d1's
// backward joins: 4 threads, pace 1/2; the server has 1/3 s of work left (ends 5 2/3), d0 4/3, d1 2.
// Server d1m1 5 2/3-7 2/3 at pace 1/2; d0's backward also ends 7 2/3, d1's has 2/3 s left. Then
// 2 threads, full pace: d1's backward ends 8 1/3; d0's second (its gradient came down 5 2/3-6 2/3)
// 7 2/3-9 2/3; d1's second (gradient 7 2/3-8 2/3) 8 2/3-10 2/3. Batch 32/3 s, not the 9 s of separate
// machines, and at least the 20 core-seconds of compute over 2 cores (10 s, "host cores").
TEST(CostModel, HandComputedSharedHostCores) {
  Cluster c = two_block_cluster(2, 0, 0, 0);
  c.host_cores = 2, c.host_device_threads = 1, c.host_server_threads = 2;
  const Timing t = CostModel(c).batch(Mode::kPipar, {1, 1}, 2);
  EXPECT_NEAR(t.span_s, 32.0 / 3, 1e-9);
  EXPECT_EQ(t.bottleneck, "host cores");
  EXPECT_NEAR(t.bottleneck_busy_s, 10.0, 1e-9);
  // Busy: as long as each resource was occupied, stretched where it shared the cores: the server
  // 1 + 1 + 5/3 + 2 s (4 s of work), device 0 2 + 11/3 + 2 s (6 s of work).
  EXPECT_NEAR(t.busy[0].busy_s, 17.0 / 3, 1e-9);
  EXPECT_NEAR(t.busy[1].busy_s, 23.0 / 3, 1e-9);
  // On 4 cores nothing waits for a core: as separate machines. Nor with the server on a GPU (0
  // threads): it takes no core, and the devices have one each.
  c.host_cores = 4;
  EXPECT_NEAR(CostModel(c).batch(Mode::kPipar, {1, 1}, 2).span_s, 9.0, 1e-9);
  c.host_cores = 2, c.host_server_threads = 0;
  EXPECT_NEAR(CostModel(c).batch(Mode::kPipar, {1, 1}, 2).span_s, 9.0, 1e-9);
  c.host_server_threads = -1;
  EXPECT_THROW(CostModel{c}, Error);
  // One device, one micro-batch: compute in turns, the sum of stages.
  Cluster one = two_block_cluster(1, 0, 0, 0);
  one.host_cores = 2, one.host_device_threads = 1, one.host_server_threads = 2;
  EXPECT_NEAR(CostModel(one).batch(Mode::kPipar, {1}, 1).span_s, 2 + 2 + 2 + 2 + 4, 1e-9);  // f up s down b
}

// A device profiled beside the others (4 devices on 2 cores: half a core each) runs at twice that
// pace alone: sl's devices take turns, each batch f 2 -> 1, up 2, server 2 (alone, as profiled), down
// 2, b 4 -> 2: 9 s a device, 36 s in all (48 s on separate machines).
TEST(CostModel, ADeviceAloneRunsFasterThanItsSharedProfile) {
  Cluster c = two_block_cluster(4, 0, 0, 0);
  EXPECT_NEAR(CostModel(c).batch(Mode::kSl, {1, 1, 1, 1}, 1).span_s, 48.0, 1e-9);
  c.host_cores = 2, c.host_device_threads = 1, c.host_server_threads = 2;
  EXPECT_NEAR(CostModel(c).batch(Mode::kSl, {1, 1, 1, 1}, 1).span_s, 36.0, 1e-9);
}

// Device profiles timed alone (host_device_profiles_alone: in CPU time, on one thread) hold half the
// times of profiles taken four at once on 2 cores (half a core each), so the two clusters are the same
// in every mode: sl's devices, which take turns, then run exactly at their profile's pace (48 s, as on
// separate machines), and every mode agrees with the at-once cluster whose devices are twice as slow.
TEST(CostModel, DevicesProfiledAloneAreTheAtOnceProfileAtTheirShareOfTheCores) {
  Cluster alone = two_block_cluster(4, 0, 0, 0);
  alone.host_cores = 2, alone.host_device_threads = 1, alone.host_server_threads = 2;
  alone.host_device_profiles_alone = true;
  EXPECT_NEAR(CostModel(alone).batch(Mode::kSl, {1, 1, 1, 1}, 1).span_s, 48.0, 1e-9);
  Cluster at_once = alone;
  at_once.host_device_profiles_alone = false;
  for (DeviceSpec& d : at_once.devices) d.time_scale = 2;
  for (const Mode mode : {Mode::kSl, Mode::kSfl, Mode::kPipar})
    for (const int n : {1, 2}) {
      const double a = CostModel(alone).batch(mode, {1, 1, 1, 1}, n).span_s;
      EXPECT_NEAR(a, CostModel(at_once).batch(mode, {1, 1, 1, 1}, n).span_s, 1e-9 * a) << mode_name(mode) << " N=" << n;
    }
  // The at-once reading of the alone profile takes the devices for twice as fast as they run together.
  Cluster misread = alone;
  misread.host_device_profiles_alone = false;
  EXPECT_LT(CostModel(misread).batch(Mode::kSfl, {1, 1, 1, 1}, 1).span_s,
            CostModel(alone).batch(Mode::kSfl, {1, 1, 1, 1}, 1).span_s);
}

// Random clusters of several devices, lanes or not: with cores to spare the shared host is exactly
// the separate machines' simulation; with one core too few no round is shorter than its compute over
// the cores (one server lane: a lane group smaller than the lanes uses fewer threads than the bound
// counts).
TEST(CostModel, SharedHostMatchesSeparateMachinesWithCoresToSpareAndHoldsItsCoreSeconds) {
  SCOPED_TRACE(pipar::test::seed_trace());
  pipar::test::Rng rng(33);
  for (int trial = 0; trial < 30; ++trial) {
    Cluster c = random_one_device_cluster(rng, 2, trial);
    const size_t k = static_cast<size_t>(rng.integer(2, 6));
    for (size_t d = 1; d < k; ++d) {
      DeviceSpec s = c.devices[0];
      s.link.up_mbps = rng.uniform(1, 100);
      s.time_scale = rng.uniform(0.5f, 3.0f);
      c.devices.push_back(s);
    }
    for (DeviceSpec& s : c.devices) s.samples = rng.integer(1, 3) * c.batch_size;
    c.server_lanes = trial % 3 == 0 ? rng.integer(2, 4) : 1;
    const int p = rng.integer(1, static_cast<int>(c.device_profiles[0].num_blocks()) - 1);
    const int n = rng.integer(1, 8);
    const std::vector<int> split(k, p);
    const double separate = CostModel(c).round(Mode::kPipar, split, n).span_s;
    c.host_device_threads = 1, c.host_server_threads = c.server_lanes;
    c.host_cores = static_cast<int>(k) + c.server_lanes;
    EXPECT_NEAR(CostModel(c).round(Mode::kPipar, split, n).span_s, separate, 1e-9 * separate) << "trial " << trial;
    c.host_device_profiles_alone = true;  // a core each: alone or at once, the same pace
    EXPECT_NEAR(CostModel(c).round(Mode::kPipar, split, n).span_s, separate, 1e-9 * separate) << "trial " << trial;
    c.host_device_profiles_alone = false;
    if (c.server_lanes > 1) continue;
    c.host_cores = static_cast<int>(k);  // each device profiled on a core of its own
    const Timing shared = CostModel(c).round(Mode::kPipar, split, n);
    EXPECT_EQ(shared.busy.back().name, "host cores");
    EXPECT_GE(shared.span_s, shared.busy.back().busy_s * (1 - 1e-9)) << "trial " << trial;
  }
}

TEST(CostModel, HandComputedWithLatencyAndSteps) {
  // As above with latency 0.5 each way, server step 0.5 (after a device's last micro-batch), device
  // step 0.25. Arrivals 2.5 (both), 3.5 (both). Server: d0m0 2.5-3.5, d1m0 3.5-4.5, d0m1 4.5-6.0,
  // d1m1 6.0-7.5. Gradients arrive: d0 5.0, 7.5; d1 6.0, 9.0. Backwards: d0 5-7, 7.5-9.5 (+0.25);
  // d1 6-8, 9-11 (+0.25) = 11.25.
  const CostModel model(two_block_cluster(2, 0.5, 0.25, 0.5));
  EXPECT_NEAR(model.batch(Mode::kPipar, {1, 1}, 2).span_s, 11.25, 1e-9);
}

// Cross-device batching (server lanes): the server takes what has arrived, one micro-batch per device,
// as a group over its lanes, and the group's gradients leave together.
TEST(CostModel, HandComputedServerLanes) {
  // The two devices above, N = 2, 2 lanes: groups {d0m0, d1m0} 2-3 and {d0m1, d1m1} 3-4. Downlinks
  // 3-4, 4-5 each; backwards (from F = 2) 4-6, 6-8. Batch: 8 s (9 with one lane), server busy 2 s.
  Cluster c = two_block_cluster(2, 0, 0, 0);
  c.server_lanes = 2;
  const Timing t = CostModel(c).batch(Mode::kPipar, {1, 1}, 2);
  EXPECT_NEAR(t.span_s, 8.0, 1e-9);
  EXPECT_NEAR(t.busy[0].busy_s, 2.0, 1e-9);
  // Three devices on 2 lanes (groups of at most 2, earliest first): {d0m0, d1m0} 2-3, {d2m0, d0m1}
  // 3-4, {d1m1, d2m1} 4-5. Device 2: gradients down 4-5 and 5-6, backwards 5-7 and 7-9: 9 s. One
  // lane: server 2-8 in turn, the third device's last gradient down 8-9, backward 9-11: 11 s.
  Cluster three = two_block_cluster(3, 0, 0, 0);
  EXPECT_NEAR(CostModel(three).batch(Mode::kPipar, {1, 1, 1}, 2).span_s, 11.0, 1e-9);
  three.server_lanes = 2;
  EXPECT_NEAR(CostModel(three).batch(Mode::kPipar, {1, 1, 1}, 2).span_s, 9.0, 1e-9);
  // Per-message work and steps run in turn on the server's loop: sfl, batch 2, per-message 0.25 s,
  // server step 0.5 s. Both arrive at 4 (f 2, up 2); kernels 2 s side by side, then 2 x (0.25 + 0.5):
  // gradients leave at 7.5, down 2 s, backward 4 s: 13.5 s.
  Cluster steps = two_block_cluster(2, 0, 0, 0.5);
  steps.server_per_micro_batch_s = 0.25;
  steps.server_lanes = 2;
  EXPECT_NEAR(CostModel(steps).batch(Mode::kSfl, {1, 1}, 1).span_s, 13.5, 1e-9);
  c.server_lanes = 0;
  EXPECT_THROW(CostModel{c}, Error);
}

// With one device there is never more than one micro-batch to group: lanes change nothing.
TEST(CostModel, ServerLanesChangeNothingForOneDevice) {
  SCOPED_TRACE(pipar::test::seed_trace());
  pipar::test::Rng rng(21);
  for (int trial = 0; trial < 20; ++trial) {
    Cluster c = random_one_device_cluster(rng, 2, trial);
    c.devices[0].samples = rng.integer(1, 3) * c.batch_size;
    const int p = rng.integer(1, static_cast<int>(c.device_profiles[0].num_blocks()) - 1);
    const int n = rng.integer(1, 8);
    const double one = CostModel(c).round(Mode::kPipar, {p}, n).span_s;
    c.server_lanes = rng.integer(2, 16);
    EXPECT_NEAR(CostModel(c).round(Mode::kPipar, {p}, n).span_s, one, 1e-9 * one) << "trial " << trial;
  }
}

TEST(CostModel, UnevenMicroBatchesFollowMicroBatchSizes) {
  // batch 3 in 2 micro-batches: sizes 2 and 1 (runtime/split.h). K = 1, no latency:
  // F 2, 3; up 2-4, 4-5; server 4-6, 6-7; down 6-8, 8-9; backward (from 3) 8-12, 12-14.
  Cluster c = two_block_cluster(1, 0, 0, 0);
  c.batch_size = 3;
  const CostModel model(c);
  EXPECT_NEAR(model.batch(Mode::kPipar, {1}, 2).span_s, 14.0, 1e-9);
  // N above the batch is capped at the batch (3 micro-batches of 1).
  EXPECT_NEAR(model.batch(Mode::kPipar, {1}, 7).span_s, model.batch(Mode::kPipar, {1}, 3).span_s, 1e-12);
}

TEST(CostModel, ApproachesTheBusiestResourceAsMicroBatchesGrow) {
  // Linear compute and links, no latency or steps, identical devices: the limit is max(device F+B,
  // uplink, server total over all devices, downlink). (With devices of different speeds the server's
  // arrival order leaves the slowest device's last gradients for the end, and its backward, not the
  // server, closes the batch: a real effect of first-come-first-served, not reached by any N.)
  for (size_t k : {1u, 3u}) {
    Cluster c;
    c.device_profiles = {synthetic_profile({{1e-3, 2e-3, 1000}, {1e-3, 1e-3, 500}, {5e-4, 5e-4, 10}})};
    c.batch_size = 6400;
    for (size_t d = 0; d < k; ++d) {
      DeviceSpec s;
      s.link = {50.0, 100, 0, 0};
      s.time_scale = k == 1 ? 2.0 : 1.0;  // k = 1: the device is the bottleneck; k = 3: the server
      c.devices.push_back(s);
    }
    const CostModel model(c);
    const std::vector<int> split(k, 1);
    const Timing one = model.batch(Mode::kPipar, split, 1);
    double bound = 0;
    for (const ResourceBusy& r : one.busy) bound = std::max(bound, r.busy_s);  // busy time does not depend on N here
    double prev = one.span_s;
    for (int n : {2, 4, 8, 16, 32, 64, 128, 256, 640}) {
      const Timing t = model.batch(Mode::kPipar, split, n);
      EXPECT_LE(t.span_s, prev * (1 + 1e-12)) << "k " << k << " n " << n;
      EXPECT_GE(t.span_s, bound * (1 - 1e-12)) << "k " << k << " n " << n;
      EXPECT_NEAR(t.bottleneck_busy_s, bound, 1e-9 * bound);
      prev = t.span_s;
    }
    EXPECT_LT(prev, bound * 1.01) << "k " << k << ": N = 640 should be within 1% of the busiest resource";
    EXPECT_GT(one.span_s, prev * 1.2) << "k " << k << ": N = 1 overlaps little";
  }
}

// One device: every stage enters the recurrence through + and max, so slowing anything never speeds
// a batch or a round up. With several devices this holds for the server's speed and for adding a
// device, but not for one device's link or speed: a delay can reorder the server's first-come queue
// for the better (a scheduling anomaly the real server shows too), so those are checked with K = 1.
TEST(CostModel, MonotoneInRatesLatencySpeedAndDevices) {
  Cluster base;
  base.device_profiles = {synthetic_profile({{1e-3, 2e-3, 4000, 1e-4, 1e-3}, {2e-3, 2e-3, 800, 1e-4, 1e-3}, {1e-3, 1e-3, 10, 1e-4, 1e-3}})};
  base.batch_size = 100;
  base.devices.assign(1, DeviceSpec{});
  base.devices[0].samples = 1000;
  const std::vector<int> ns = {1, 3, 8, 17};
  auto times = [&](const Cluster& c, size_t k) {
    const CostModel m(c);
    std::vector<double> v;
    for (Mode mode : {Mode::kPipar, Mode::kSfl, Mode::kSl, Mode::kFl})
      for (int p : {1, 2})
        for (int n : ns) {
          const std::vector<int> split(k, p);
          v.push_back(m.batch(mode, split, n).span_s);
          v.push_back(m.round(mode, split, n).span_s);
        }
    return v;
  };
  std::vector<double> t0 = times(base, 1);
  auto expect_not_faster = [&](const Cluster& c, const char* what) {
    const std::vector<double> t1 = times(c, c.devices.size());
    for (size_t i = 0; i < t0.size(); ++i) EXPECT_GE(t1[i], t0[i] * (1 - 1e-12)) << what << " case " << i;
  };
  Cluster c = base;
  c.devices[0].link.up_mbps = 5;
  expect_not_faster(c, "slower uplink");
  c = base;
  c.devices[0].link.down_mbps = 2;
  expect_not_faster(c, "slower downlink");
  c = base;
  c.devices[0].link.latency_s = 0.01;
  expect_not_faster(c, "latency");
  c = base;
  c.devices[0].time_scale = 2;
  expect_not_faster(c, "slower device");
  c = base;
  c.server_time_scale = 3;
  expect_not_faster(c, "slower server");
  // Two devices: a slower server, then a third device.
  base.devices.push_back(base.devices[0]);
  base.devices[1].samples = 777;
  base.devices[1].link.up_mbps = 7;
  t0 = times(base, 2);
  c = base;
  c.server_time_scale = 3;
  expect_not_faster(c, "slower server, two devices");
  c = base;
  c.devices.push_back(c.devices[0]);
  const std::vector<double> t3 = times(c, 3);
  for (size_t i = 0; i < t0.size(); ++i) EXPECT_GE(t3[i], t0[i] * (1 - 1e-12)) << "a third device, case " << i;
}

TEST(CostModel, RoundCoversEveryBatchOfEveryDevice) {
  Cluster c = two_block_cluster(2, 0, 0, 0);
  c.devices[0].samples = 6;  // 3 batches of 2
  c.devices[1].samples = 2;  // 1 batch
  const CostModel model(c);
  const Timing r = model.round(Mode::kPipar, {1, 1}, 1);
  // Device 0 alone needs at least 3 batches of sum-of-stages minus overlap: f 2 + 3 * (up 2 + ...)
  // its compute is 3 * 6 s = 18 s, and weights (no params) cost nothing.
  EXPECT_GE(r.span_s, 18.0);
  EXPECT_NEAR(r.busy[1].busy_s, 18.0, 1e-9);  // device 0 compute: 3 batches * (f 2 + b 4)
  EXPECT_NEAR(r.busy[4].busy_s, 6.0, 1e-9);   // device 1 compute: one batch
  EXPECT_EQ(r.bottleneck, "device 0");
  EXPECT_EQ(batch_lengths(0, 100), (std::vector<int64_t>{100}));
  EXPECT_EQ(batch_lengths(201, 100), (std::vector<int64_t>{100, 100}));  // a last batch of 1 is dropped
  EXPECT_EQ(batch_lengths(202, 100), (std::vector<int64_t>{100, 100, 2}));
}

TEST(CostModel, FederatedTrainsTheWholeModelAndExchangesIt) {
  Cluster c;
  c.device_profiles = {synthetic_profile({{1, 2, 10, 0, 0.5, 250000}, {1, 1, 10, 0, 0.5, 0}})};
  c.batch_size = 2;
  DeviceSpec d;
  d.link = {8, 4, 0.1, 0};  // the 1e6-byte model: 1 s up, 2 s down
  c.devices = {d};
  const CostModel model(c);
  // batch: forward 2 * 2 + backward 3 * 2 + steps 1 = 11 s.
  EXPECT_NEAR(model.batch(Mode::kFl, {}, 1).span_s, 11.0, 1e-9);
  EXPECT_NEAR(model.round(Mode::kFl, {}, 1).span_s, 11.0 + 1 + 2 + 0.2, 1e-9);
  EXPECT_THROW(model.batch(Mode::kPipar, {2}, 1), Error);  // split outside 1..B-1
  EXPECT_THROW(model.batch(Mode::kPipar, {1, 1}, 1), Error);  // two splits for one device
  EXPECT_THROW(parse_mode("pipe"), Error);
  EXPECT_EQ(parse_mode("sfl"), Mode::kSfl);
}

TEST(CostModel, MemoryGrowsWithTheDevicePart) {
  Cluster c;
  c.device_profiles = {synthetic_profile({{1, 1, 100, 0, 0, 1000}, {1, 1, 50, 0, 0, 5000}, {1, 1, 10, 0, 0, 100}})};
  c.devices.assign(4, DeviceSpec{});
  const CostModel model(c);
  EXPECT_LT(model.device_memory_bytes(0, 1, 4), model.device_memory_bytes(0, 2, 4));
  EXPECT_GT(model.server_memory_bytes(Mode::kPipar, {1, 1, 1, 1}, 4), model.server_memory_bytes(Mode::kPipar, {2, 2, 2, 2}, 4));
  EXPECT_LT(model.server_memory_bytes(Mode::kSl, {1, 1, 1, 1}, 1), model.server_memory_bytes(Mode::kSfl, {1, 1, 1, 1}, 1));
}

// --- private labels (U-shaped split) ----------------------------------------------------------------

// K = 1, N = 1 with private labels: the sum of every stage of the extra hop, in order. The per-micro-batch
// server overhead is charged to both server visits; the weight exchange includes the device's tail.
TEST(CostModel, PrivateLabelsOneDeviceOneMicroBatchIsTheSumOfStages) {
  SCOPED_TRACE(pipar::test::seed_trace());
  pipar::test::Rng rng(11);
  for (int trial = 0; trial < 20; ++trial) {
    Cluster c = random_one_device_cluster(rng, 3, trial);
    c.private_labels = true;
    const DeviceSpec& d = c.devices[0];
    const int nb = static_cast<int>(c.device_profiles[0].num_blocks());
    const CostModel model(c);
    const int p = rng.integer(1, nb - 2);
    const size_t ps = static_cast<size_t>(p), nbs = static_cast<size_t>(nb), e = nbs - 1;
    const Profile& dp = c.device_profiles[0];
    const Profile& sp = *c.server_profile;
    const double m = static_cast<double>(c.batch_size), lat = d.link.latency_s;
    const double f = dp.forward_s(0, ps, m) * d.time_scale, b = dp.backward_s(0, ps, m) * d.time_scale;
    const double up = CostModel::transfer_s(static_cast<double>(dp.gradient_bytes(ps)) * m, d.link.up_mbps, 0);  // no labels
    const double down = CostModel::transfer_s(static_cast<double>(dp.gradient_bytes(ps)) * m, d.link.down_mbps, 0);
    const double s_fwd = sp.forward_s(ps, e, m) * c.server_time_scale + c.server_per_micro_batch_s;
    const double s_bwd = sp.backward_s(ps, e, m) * c.server_time_scale + c.server_per_micro_batch_s;
    const double down_mid = CostModel::transfer_s(static_cast<double>(dp.gradient_bytes(e)) * m, d.link.down_mbps, 0);
    const double up_mid = CostModel::transfer_s(static_cast<double>(dp.gradient_bytes(e)) * m, d.link.up_mbps, 0);
    const double tail = (dp.forward_s(e, nbs, m) + dp.loss_time_s(m) + dp.backward_s(e, nbs, m)) * d.time_scale;
    const double sstep = sp.step_s(ps, e) * c.server_time_scale;
    const double dstep = (dp.step_s(0, ps) + dp.step_s(e, nbs)) * d.time_scale;
    const double sum = f + up + lat + s_fwd + down_mid + lat + tail + up_mid + lat + s_bwd + sstep + down + lat + b + dstep;
    for (Mode mode : {Mode::kPipar, Mode::kSfl, Mode::kSl})
      EXPECT_NEAR(model.batch(mode, {p}, 1).span_s, sum, 1e-12 * sum) << mode_name(mode);
    const double w = static_cast<double>(dp.state_bytes(0, ps) + dp.state_bytes(e, nbs));
    const double wx = CostModel::transfer_s(w, d.link.down_mbps, 0) + CostModel::transfer_s(w, d.link.up_mbps, 0) + 2 * lat;
    EXPECT_NEAR(model.round(Mode::kPipar, {p}, 1).span_s, sum + wx, 1e-12 * (sum + wx));
  }
}

// Three blocks: device front f 1, b 2 s/sample; server middle 0.5 + 0.5 s/sample; device tail 0.25 +
// 0.25 s/sample. Cut and middle output 250000 floats each (1,000,000 bytes: 1 s per sample at 8 Mbit/s
// either way; private activations carry no labels).
Cluster three_block_private_cluster() {
  Cluster c;
  c.device_profiles = {synthetic_profile({{1.0, 2.0, 250000, 0, 0}, {0.5, 0.5, 250000, 0, 0}, {0.25, 0.25, 10, 0, 0}})};
  c.batch_size = 2;
  c.private_labels = true;
  DeviceSpec s;
  s.link.up_mbps = 8.0;
  s.link.down_mbps = 8.0;
  c.devices = {s};
  return c;
}

TEST(CostModel, PrivateLabelsHandComputedTwoMicroBatches) {
  // K = 1, N = 2, m = 1. Forwards 0-1, 1-2; uplinks 1-2, 2-3. Server middle forwards: m0 2-2.5, m1
  // 3-3.5. Middle outputs down: 2.5-3.5, 3.5-4.5. Tails (device free from 2): 3.5-4, 4.5-5. Their
  // gradients up: 4-5, 5-6. Server middle backwards: m0 5-5.5, m1 6-6.5. Cut gradients down: 5.5-6.5,
  // 6.5-7.5. Backwards: 6.5-8.5, 8.5-10.5. Batch: 10.5 s.
  const CostModel model(three_block_private_cluster());
  const Timing t = model.batch(Mode::kPipar, {1}, 2);
  EXPECT_NEAR(t.span_s, 10.5, 1e-9);
  EXPECT_NEAR(t.busy[0].busy_s, 2.0, 1e-9);  // server: 4 visits of 0.5
  EXPECT_NEAR(t.busy[1].busy_s, 7.0, 1e-9);  // device: forwards 2, tails 1, backwards 4
  EXPECT_NEAR(t.busy[2].busy_s, 4.0, 1e-9);  // uplink: activations 2, middle-output gradients 2
  EXPECT_NEAR(t.busy[3].busy_s, 4.0, 1e-9);  // downlink: middle outputs 2, cut gradients 2
  EXPECT_EQ(t.bottleneck, "device 0");
  // The same cluster with shared labels: f 1, 2; up 1-2, 2-3 (4 bytes of label: 1.000004 s); server
  // runs middle and tail at once (1.5 s): the extra hop costs time.
  Cluster shared = three_block_private_cluster();
  shared.private_labels = false;
  EXPECT_LT(CostModel(shared).batch(Mode::kPipar, {1}, 2).span_s, t.span_s);
}

TEST(CostModel, PrivateLabelsLeaveTheDeviceTheLastBlock) {
  const CostModel model(three_block_private_cluster());
  try {
    model.batch(Mode::kPipar, {2}, 1);
    FAIL() << "split 2 of 3 blocks accepted with private labels";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("outside 1..1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("3 blocks"), std::string::npos) << e.what();
  }
  Cluster two = two_block_cluster(1, 0, 0, 0);
  two.private_labels = true;
  EXPECT_THROW(CostModel{two}, Error);  // no middle block for the server
}


// Stacked replicas (Cluster::server_stack): a group is every arrival so far, one per device, and its
// kernels are one call per stack, timed by the stack's own profile whatever the group's size.
namespace stacks {

// A stack's profile over the two blocks above: block 1's forward and backward per call of m samples
// per replica: `per_sample` each (so a call is 2 * per_sample * m), nothing in block 0.
Profile stack_profile(double per_sample) { return synthetic_profile({{0, 0, 250000, 0, 0}, {per_sample, per_sample, 10, 0, 0}}); }

}  // namespace stacks

TEST(CostModel, HandComputedStacks) {
  // Two devices, N = 2 (micro-batches of 1), a stack of both whose call takes 1.5 s. F 1, 2; up 1-2,
  // 2-3; groups {d0m0, d1m0} 2-3.5 and {d0m1, d1m1} 3.5-5; downlinks 3.5-4.5, 5-6; backwards (from F
  // = 2) 4.5-6.5, 6.5-8.5. Batch 8.5 s, server busy 3 s (one at a time: 9 s and 4 s).
  Cluster c = two_block_cluster(2, 0, 0, 0);
  c.server_stack = 64;
  c.stack_profiles = {{2, stacks::stack_profile(0.75)}};
  Timing t = CostModel(c).batch(Mode::kPipar, {1, 1}, 2);
  EXPECT_NEAR(t.span_s, 8.5, 1e-9);
  EXPECT_NEAR(t.busy[0].busy_s, 3.0, 1e-9);
  // Three devices in stacks of at most 2: {d0, d1} and {d2}. All arrive together (2, then 3): each
  // group is a call of each stack, 1.5 + 0.5 s: 2-4 and 4-6; downlinks 4-5, 6-7; backwards 5-7, 7-9.
  Cluster three = two_block_cluster(3, 0, 0, 0);
  three.server_stack = 2;
  three.stack_profiles = {{2, stacks::stack_profile(0.75)}, {1, stacks::stack_profile(0.25)}};
  t = CostModel(three).batch(Mode::kPipar, {1, 1, 1}, 2);
  EXPECT_NEAR(t.span_s, 9.0, 1e-9);
  EXPECT_NEAR(t.busy[0].busy_s, 4.0, 1e-9);
  // Per-message work and steps run in turn after the calls: sfl, batch 2, per-message 0.25 s, server
  // step 0.5 s. Both arrive at 4; the call of 2 samples per replica 3 s, then 2 x 0.75: gradients
  // leave at 8.5, down 2 s, backward 4 s: 14.5 s.
  Cluster steps = two_block_cluster(2, 0, 0, 0.5);
  steps.server_per_micro_batch_s = 0.25;
  steps.server_stack = 64;
  steps.stack_profiles = {{2, stacks::stack_profile(0.75)}};
  EXPECT_NEAR(CostModel(steps).batch(Mode::kSfl, {1, 1}, 1).span_s, 14.5, 1e-9);
  // sl's one server part is never stacked: the same as without stacks.
  Cluster plain = steps;
  plain.server_stack = 0;
  EXPECT_DOUBLE_EQ(CostModel(steps).round(Mode::kSl, {1, 1}, 1).span_s, CostModel(plain).round(Mode::kSl, {1, 1}, 1).span_s);
}

TEST(CostModel, StacksAreChecked) {
  Cluster c = two_block_cluster(3, 0, 0, 0);
  const Profile three_blocks = synthetic_profile({{1, 1, 10}, {1, 1, 10}, {1, 1, 10}});
  c.device_profiles = {three_blocks};
  c.server_stack = 2;
  c.stack_profiles = {{2, three_blocks}};
  EXPECT_THROW(CostModel{c}, Error);  // no profile of the last stack (1 replica)
  c.stack_profiles.push_back({1, three_blocks});
  EXPECT_NO_THROW(CostModel(c).batch(Mode::kPipar, {1, 1, 1}, 2));
  EXPECT_THROW(CostModel(c).batch(Mode::kPipar, {1, 1, 2}, 2), Error);  // a stack has one split point
  c.stack_split = 2;  // profiled from block 2: split 1 cannot be scored, and the planner keeps to 2
  EXPECT_THROW(CostModel(c).batch(Mode::kPipar, {1, 1, 1}, 2), Error);
  EXPECT_NO_THROW(CostModel(c).batch(Mode::kPipar, {2, 2, 2}, 2));
  SearchOptions so;
  EXPECT_EQ(search(CostModel(c), so).best.split, (std::vector<int>{2, 2, 2}));
  so.splits = {1, 2};
  EXPECT_THROW(search(CostModel(c), so), Error);
  c.stack_split = 3;
  EXPECT_THROW(CostModel{c}, Error);  // no split point left
  c.stack_split = 1;
  c.server_lanes = 2;
  EXPECT_THROW(CostModel{c}, Error);  // stacks or lanes
  c.server_lanes = 1;
  c.private_labels = true;
  EXPECT_THROW(CostModel{c}, Error);
  c.private_labels = false;
  c.stack_profiles[1].second = synthetic_profile({{0, 0, 1, 0, 0}}, "other");
  EXPECT_THROW(CostModel{c}, Error);  // profiles of another model
  c.server_stack = -1;
  EXPECT_THROW(CostModel{c}, Error);
}

// One device in a stack whose profile is the plain server profile: exactly the plain model, every
// mode, N and split (a stack of one computes what one replica does).
TEST(CostModel, StackOfOneIsOneReplica) {
  SCOPED_TRACE(pipar::test::seed_trace());
  pipar::test::Rng rng(31);
  for (int trial = 0; trial < 20; ++trial) {
    Cluster c = random_one_device_cluster(rng, 2, trial);
    c.devices[0].samples = rng.integer(1, 3) * c.batch_size;
    const int p = rng.integer(1, static_cast<int>(c.device_profiles[0].num_blocks()) - 1);
    const int n = rng.integer(1, 8);
    const double one = CostModel(c).round(Mode::kPipar, {p}, n).span_s;
    const double sfl = CostModel(c).round(Mode::kSfl, {p}, 1).span_s;
    c.server_stack = rng.integer(1, 64);
    c.stack_profiles = {{1, *c.server_profile}};
    EXPECT_NEAR(CostModel(c).round(Mode::kPipar, {p}, n).span_s, one, 1e-9 * one) << "trial " << trial;
    EXPECT_NEAR(CostModel(c).round(Mode::kSfl, {p}, 1).span_s, sfl, 1e-9 * sfl) << "trial " << trial;
  }
}

// Memory: a stacked server holds each replica's server blocks twice (its replica between rounds, its
// stack slice during one) and the largest stack's call instead of one lane's tape.
TEST(CostModel, StackedMemoryCountsEachReplicaTwice) {
  Cluster c = two_block_cluster(3, 0, 0, 0);
  c.device_profiles[0].blocks[1].params = 1000;
  c.batch_size = 8;
  const CostModel plain(c);
  c.server_stack = 2;
  c.stack_profiles = {{2, stacks::stack_profile(0.75)}, {1, stacks::stack_profile(0.25)}};
  const CostModel stacked(c);
  const Profile& sp = c.device_profiles[0];
  const int64_t m_max = 4;  // 8 samples in 2 micro-batches
  const int64_t slice = 3 * sp.param_bytes(1, 2) + (sp.state_bytes(1, 2) - sp.param_bytes(1, 2));
  const int64_t call = 2 * m_max * (sp.tape_bytes(1, 2) + 2 * sp.gradient_bytes(1));
  EXPECT_EQ(stacked.server_memory_bytes(Mode::kPipar, {1, 1, 1}, 2),
            plain.server_memory_bytes(Mode::kPipar, {1, 1, 1}, 2) - m_max * sp.tape_bytes(1, 2) + 3 * slice + call);
  EXPECT_EQ(stacked.server_memory_bytes(Mode::kSl, {1, 1, 1}, 1), plain.server_memory_bytes(Mode::kSl, {1, 1, 1}, 1));
}

}  // namespace
}  // namespace pipar::planner
