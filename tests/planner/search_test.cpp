// Plan selection: the obvious cut on a designed profile, per-device splits that beat every shared one
// on heterogeneous devices, memory limits, ranked runners-up, mode comparison, and the search time
// for every model of the zoo with 16 devices (bound 1 s on two cores; printed).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>

#include "planner/search.h"
#include "tests/planner/planner_test_util.h"

namespace pipar::planner {
namespace {

using test::synthetic_profile;

// Four blocks; the cut after block 2 carries 10 floats, the others 100000: with a slow uplink the
// planner must cut there.
Cluster narrow_waist_cluster(size_t k) {
  Cluster c;
  c.device_profiles = {synthetic_profile({{1e-4, 2e-4, 100000}, {1e-4, 2e-4, 10}, {1e-4, 2e-4, 100000}, {1e-4, 1e-4, 10}})};
  c.batch_size = 100;
  for (size_t d = 0; d < k; ++d) {
    DeviceSpec s;
    s.link = {5, 20, 0.001, 0};
    s.samples = 1000;
    c.devices.push_back(s);
  }
  return c;
}

TEST(Planner, CutsAtTheNarrowWaist) {
  const CostModel model(narrow_waist_cluster(4));
  SearchOptions o;
  o.micro_batch_margin = 0;  // the fastest plan, ranked first (overlap gains 3% here: under the default margin)
  const SearchResult r = search(model, o);
  EXPECT_EQ(r.best.split, (std::vector<int>{2, 2, 2, 2}));
  EXPECT_GT(r.best.micro_batches, 1);  // overlap pays off
  EXPECT_GT(r.best.round_s, 0);
  EXPECT_FALSE(r.best.bottleneck.empty());
  ASSERT_EQ(r.ranked.size(), 6u);  // best + 5 runners-up
  EXPECT_EQ(r.ranked.front().split, r.best.split);
  for (size_t i = 1; i < r.ranked.size(); ++i) {
    EXPECT_GE(r.ranked[i].round_s, r.ranked[i - 1].round_s);
    EXPECT_FALSE(r.ranked[i].split == r.ranked[0].split && r.ranked[i].micro_batches == r.ranked[0].micro_batches);
  }
  // The reported plan is exactly what the cost model says about it.
  const Plan again = evaluate_plan(model, Mode::kPipar, r.best.split, r.best.micro_batches);
  EXPECT_DOUBLE_EQ(again.round_s, r.best.round_s);
  EXPECT_NE(r.best.describe().find("P=2"), std::string::npos) << r.best.describe();
  EXPECT_NE(r.best.to_json().find("\"split\":[2,2,2,2]"), std::string::npos) << r.best.to_json();
}

TEST(Planner, HonoursCandidateListsAndMemoryLimits) {
  const CostModel model(narrow_waist_cluster(2));
  SearchOptions o;
  o.splits = {1, 3};
  o.micro_batches = {1, 4};
  const SearchResult r = search(model, o);
  for (const Plan& p : r.ranked) {
    for (int s : p.split) EXPECT_TRUE(s == 1 || s == 3);
    EXPECT_TRUE(p.micro_batches == 1 || p.micro_batches == 4);
  }
  // Device needs here: P=2 < P=1 < P=3 (the wide cuts queue big activations). A limit at P=1's need
  // leaves P=1 and P=2; one below P=2's leaves nothing.
  SearchOptions lim;
  const int64_t need1 = model.device_memory_bytes(0, 1, 64), need2 = model.device_memory_bytes(0, 2, 64);
  ASSERT_LT(need2, need1);
  ASSERT_LT(need1, model.device_memory_bytes(0, 3, 64));
  lim.device_memory_limit = static_cast<double>(need1);
  lim.runners_up = 50;
  const SearchResult small = search(model, lim);
  EXPECT_EQ(small.best.split, (std::vector<int>{2, 2}));
  for (const Plan& p : small.ranked) {
    for (int s : p.split) EXPECT_NE(s, 3);
    EXPECT_LE(static_cast<double>(p.device_memory_bytes), lim.device_memory_limit);
  }
  lim.device_memory_limit = static_cast<double>(need2 - 1);
  EXPECT_THROW(search(model, lim), Error);
  lim.device_memory_limit = 1;
  EXPECT_THROW(search(model, lim), Error);
  SearchOptions bad;
  bad.splits = {4};
  EXPECT_THROW(search(model, bad), Error);
}

TEST(Planner, SkipsMicroBatchesTooSmallToTrain) {
  Cluster c = narrow_waist_cluster(2);
  c.device_profiles[0].min_micro_batch = 2;
  c.devices[1].samples = 350;  // batches 100, 100, 100, 50
  const CostModel model(c);
  EXPECT_TRUE(model.micro_batches_fit(25));
  EXPECT_FALSE(model.micro_batches_fit(26));  // the last batch of 50 would hold a micro-batch of 1
  SearchOptions o;
  o.runners_up = 30;
  const SearchResult r = search(model, o);
  for (const Plan& p : r.ranked) EXPECT_LE(p.micro_batches, 25);
  o.micro_batches = {40, 64};
  EXPECT_THROW(search(model, o), Error);
}

TEST(Planner, PerDeviceSplitsBeatEverySharedSplitOnHeterogeneousDevices) {
  // Three equal blocks (1/3 s forward, 2/3 s backward per sample on every machine), fast links; two
  // devices four times slower. Shared P=1 loads the server with 2 blocks x 4 devices, shared P=2
  // loads the slow devices with 2 blocks x 4; fast devices at P=2 and slow ones at P=1 balance both.
  Cluster c;
  c.device_profiles = {synthetic_profile({{1.0 / 3, 2.0 / 3, 10}, {1.0 / 3, 2.0 / 3, 10}, {1.0 / 3, 2.0 / 3, 10}})};
  c.batch_size = 20;
  for (double scale : {1.0, 1.0, 4.0, 4.0}) {
    DeviceSpec s;
    s.link = {1000, 1000, 0, 0};
    s.time_scale = scale;
    c.devices.push_back(s);
  }
  const CostModel model(c);
  SearchOptions shared;
  shared.per_device_split = false;
  const SearchResult best_shared = search(model, shared);
  const SearchResult best = search(model);
  std::printf("[ planner ] shared: %s\n[ planner ] per device: %s\n", best_shared.best.describe().c_str(), best.best.describe().c_str());
  EXPECT_TRUE(best_shared.best.shared_split());
  EXPECT_FALSE(best.best.shared_split());
  EXPECT_LT(best.best.round_s, 0.9 * best_shared.best.round_s);
  EXPECT_GT(best.best.split[0], best.best.split[2]);  // fast devices take more blocks
  EXPECT_GT(best.best.split[1], best.best.split[3]);
}

TEST(Planner, ComparesModes) {
  const CostModel model(narrow_waist_cluster(4));
  const std::vector<Plan> modes = compare_modes(model);
  ASSERT_EQ(modes.size(), 4u);
  for (size_t i = 1; i < modes.size(); ++i) EXPECT_GE(modes[i].round_s, modes[i - 1].round_s);
  double pipar = 0, sfl = 0;
  for (const Plan& p : modes) {
    if (p.mode == Mode::kPipar) pipar = p.round_s;
    if (p.mode == Mode::kSfl) sfl = p.round_s;
    if (p.mode == Mode::kFl) {
      EXPECT_TRUE(p.split.empty());
    }
    if (p.mode != Mode::kPipar) {
      EXPECT_EQ(p.micro_batches, 1);
    }
  }
  EXPECT_LE(pipar, sfl);  // sfl is pipar with N = 1, a candidate of the pipar search
}

// Private labels leave the device the last block: with the narrowest cut after block 3 of 4, shared
// labels cut there, private labels may not (nor may any runner-up or per-device refinement).
TEST(Planner, PrivateLabelsOnlyConsiderSplitsThatLeaveTheServerABlock) {
  Cluster c = narrow_waist_cluster(2);
  c.device_profiles = {synthetic_profile({{1e-4, 2e-4, 100000}, {1e-4, 2e-4, 100000}, {1e-4, 2e-4, 10}, {1e-4, 1e-4, 10}})};
  SearchOptions o;
  o.per_device_split = true;
  EXPECT_EQ(search(CostModel(c), o).best.split, (std::vector<int>{3, 3}));
  c.private_labels = true;
  const CostModel model(c);
  const SearchResult r = search(model, o);
  ASSERT_FALSE(r.ranked.empty());
  for (const Plan& p : r.ranked)
    for (int s : p.split) EXPECT_LE(s, 2) << p.describe();
  o.splits = {3};
  EXPECT_THROW(search(model, o), Error);
}

TEST(Planner, SearchesEveryZooModelWith16DevicesUnderASecond) {
  // Estimated (FLOP-based) profiles stand in for measured ones; heterogeneous speeds and links.
  for (const std::string& name : model_names()) {
    auto m = build_model(name, ModelOptions{});
    Cluster c;
    c.device_profiles = {estimate_profile(*m, 2e10, 2e-5, {1, 4, 16, 64})};
    c.server_profile = estimate_profile(*m, 5e11, 1e-5, {1, 4, 16, 64});
    c.batch_size = 100;
    for (int d = 0; d < 16; ++d) {
      DeviceSpec s;
      s.link = {5.0 + 3.0 * d, 25, 0.002, 0};
      s.time_scale = 1.0 + 0.2 * (d % 4);
      s.samples = 3750;
      c.devices.push_back(s);
    }
    const CostModel model(c);
    const SearchResult r = search(model);
    std::printf("[ planner ] %-18s %2zu blocks, 16 devices: %.3f s, %d evaluations; best %s\n", name.c_str(), model.num_blocks(),
                r.seconds, r.evaluated, r.best.describe().c_str());
    EXPECT_LT(r.seconds, 1.0) << name;
    EXPECT_EQ(r.best.split.size(), 16u);
  }
}

// pipar with one micro-batch is sfl's plan, so pipar's pick is never predicted slower than sfl's, also
// where the cheap estimate that picks the leaders for exact re-scoring errs: every zoo model, devices
// sharing the server's 2 cores (where the exact simulation's processor sharing departs from it most).
TEST(Planner, PiparIsNeverPredictedSlowerThanSfl) {
  for (const std::string& name : model_names()) {
    auto m = build_model(name, ModelOptions{});
    for (const double mbps : {5.0, 50.0, 500.0})
    for (const double srv : {1e10, 4e10})
    for (const int lanes : {1, 2}) {
      Cluster c;
      c.device_profiles = {estimate_profile(*m, 2e10, 2e-5, {1, 4, 16, 64})};
      c.server_profile = estimate_profile(*m, srv, 1e-5, {1, 4, 16, 64});
      c.batch_size = 100;
      c.server_lanes = lanes;
      c.host_cores = 2, c.host_device_threads = 1, c.host_server_threads = 2;
      for (int d = 0; d < 4; ++d) {
        DeviceSpec s;
        s.link = {mbps, 2.5 * mbps, 0, 0};
        s.samples = 1000;
        c.devices.push_back(s);
      }
      const CostModel model(c);
      SearchOptions o;
      const Plan pipar = search(model, o).best;
      o.mode = Mode::kSfl;
      const Plan sfl = search(model, o).best;
      EXPECT_LE(pipar.round_s, sfl.round_s * (1 + 1e-9))
          << name << " at " << mbps << " Mbit/s, server " << srv << " FLOP/s, " << lanes << " lane(s): " << pipar.describe()
          << " against " << sfl.describe();
    }
  }
}

// The margin for more micro-batches (SearchOptions::micro_batch_margin): of the plans predicted within
// the margin of the fastest, the one of fewest micro-batches is picked, so a pick costs at most the
// margin (as predicted); at a margin below the pipelining's predicted gain the fastest plan stays.
TEST(Planner, MoreMicroBatchesMustGainMoreThanTheMargin) {
  Cluster c = narrow_waist_cluster(4);
  for (DeviceSpec& s : c.devices) s.link = {200, 500, 0.0001, 0};  // fast links: overlap gains little
  const CostModel model(c);
  SearchOptions o;
  o.micro_batch_margin = 0;
  o.runners_up = 400;
  o.exact_rescore = 400;
  const SearchResult fastest = search(model, o);
  ASSERT_GT(fastest.best.micro_batches, 1) << fastest.best.describe();
  EXPECT_TRUE(fastest.margin_note.empty());
  SearchOptions one = o;
  one.micro_batches = {1};
  const Plan sfl_like = search(model, one).best;
  const double gain = sfl_like.round_s / fastest.best.round_s - 1;  // what N = 1 loses, as a fraction
  ASSERT_GT(gain, 0.002) << sfl_like.describe() << " against " << fastest.best.describe();
  ASSERT_LT(gain, 0.9);

  for (const double margin : {gain * 0.5, gain * 1.01, 0.05}) {
    SearchOptions m = o;
    m.micro_batch_margin = margin;
    const SearchResult r = search(model, m);
    // Bounded: the pick is within the margin of the fastest, and no plan within it has fewer micro-batches.
    EXPECT_LE(r.best.round_s, fastest.best.round_s * (1 + margin) * (1 + 1e-12)) << margin << ": " << r.best.describe();
    for (const Plan& p : fastest.ranked) {
      if (p.round_s <= fastest.best.round_s * (1 + margin)) {
        EXPECT_GE(p.micro_batches, r.best.micro_batches) << p.describe();
      }
    }
    EXPECT_EQ(r.ranked.front().split, r.best.split);
    EXPECT_EQ(r.ranked.front().micro_batches, r.best.micro_batches);
    if (margin > gain) {
      EXPECT_EQ(r.best.micro_batches, 1) << margin << ": " << r.best.describe();
      EXPECT_NE(r.margin_note.find("kept"), std::string::npos) << r.margin_note;
      EXPECT_NE(r.margin_note.find("N=1"), std::string::npos) << r.margin_note;
    }
    if (r.best.micro_batches == fastest.best.micro_batches) {
      EXPECT_TRUE(r.margin_note.empty()) << r.margin_note;
    }
  }
  SearchOptions bad = o;
  bad.micro_batch_margin = -0.1;
  EXPECT_THROW(search(model, bad), Error);
  bad.micro_batch_margin = 1.5;
  EXPECT_THROW(search(model, bad), Error);
}

}  // namespace
}  // namespace pipar::planner
