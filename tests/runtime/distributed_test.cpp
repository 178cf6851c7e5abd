// The distributed modes end to end on loopback, server and devices as threads of this process: every
// mode trains; pipar equals sfl on a model without batch-norm; a device that vanishes mid-round or a
// peer that sends garbage does not stop the run, nor does hostile traffic from a device in the round;
// every split-mode round has a predicted time.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "kernels/rng.h"
#include "runtime/data.h"
#include "runtime/model.h"
#include "runtime/modes/distributed.h"
#include "transport/codec.h"
#include "transport/link.h"

namespace pipar {
namespace {

namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("pipar_dist_test_" + std::to_string(getpid())) / name;
  fs::create_directories(d);
  return d.string();
}

TrainConfig small_config(const std::string& mode, const std::string& out) {
  TrainConfig c;
  c.mode = mode;
  c.model = "vgg5";
  c.dataset = "synthetic";
  c.limit_train = 800;
  c.limit_test = 200;
  c.epochs = 1;
  c.batch_size = 25;
  c.devices = 2;
  c.split = 2;
  c.micro_batches = mode == "pipar" ? 3 : 1;
  c.threads = 1;
  c.out_dir = temp_dir(out);
  return c;
}

NetConfig fast_net() {
  NetConfig n;
  n.uplink_mbps = 0;  // unshaped: the tests check behaviour, the benchmarks speed
  n.downlink_mbps = 0;
  n.connect_timeout_s = 30;
  n.device_timeout_s = 30;
  return n;
}

// Runs a server and `devices` real devices (threads) to the end.
TrainResult run_cluster(const TrainConfig& c, const NetConfig& n, int devices,
                        const std::function<void(const std::string&)>& extra = {}) {
  std::vector<std::thread> threads;
  std::vector<int> codes(static_cast<size_t>(devices), -1);
  struct JoinAll {  // a failing server must not leave joinable threads behind
    std::vector<std::thread>& t;
    ~JoinAll() {
      for (auto& x : t)
        if (x.joinable()) x.join();
    }
  } join_all{threads};
  TrainResult r = run_server(c, n, nullptr, [&](const std::string& endpoint) {
    for (int d = 0; d < devices; ++d)
      threads.emplace_back([&, d, endpoint] {
        DeviceOptions o;
        o.connect = endpoint;
        o.id = static_cast<uint32_t>(d);
        o.timeout_s = 60;
        codes[static_cast<size_t>(d)] = run_device(o);
      });
    if (extra) extra(endpoint);
  });
  for (auto& t : threads) t.join();
  for (int d = 0; d < devices; ++d) EXPECT_EQ(codes[static_cast<size_t>(d)], 0) << "device " << d;
  return r;
}

nlohmann::json summary(const std::string& dir) {
  std::ifstream f(dir + "/summary.json");
  return nlohmann::json::parse(f);
}

TEST(Distributed, EveryModeTrainsAndReports) {
  for (const std::string mode : {"fl", "sl", "sfl", "pipar"}) {
    const TrainConfig c = small_config(mode, "mode_" + mode);
    const TrainResult r = run_cluster(c, fast_net(), 2);
    EXPECT_GE(r.test_accuracy, 0.6) << mode;  // one epoch, 16 batches per device, learnable synthetic data
    const auto s = summary(c.out_dir);
    for (const char* key : {"server_busy_seconds", "server_idle_seconds", "device_busy_seconds", "device_idle_seconds",
                            "bytes_up", "bytes_down", "pipeline_efficiency", "test_accuracy", "train_seconds"})
      EXPECT_TRUE(s.contains(key)) << mode << " " << key;
    EXPECT_EQ(s["device_busy_seconds"].size(), 2u);
    EXPECT_GT(s["bytes_up"].get<double>(), 0) << mode;
    const double eff = s["pipeline_efficiency"].get<double>();
    EXPECT_GT(eff, 0.0) << mode;
    EXPECT_LE(eff, 1.0 + 1e-9) << mode;
    EXPECT_TRUE(fs::exists(c.out_dir + "/trace.json"));
  }
}

// Also under the cosine learning-rate schedule, which devices and server both apply per batch: pipar
// still equals sfl, and both differ from the constant-rate run.
TEST(Distributed, PiparEqualsSplitFedWithoutBatchNorm) {
  double constant_loss = 0;
  for (const std::string schedule : {"constant", "cosine"}) {
    SCOPED_TRACE(schedule);
    TrainConfig a = small_config("sfl", "eq_sfl_" + schedule);
    TrainConfig b = small_config("pipar", "eq_pipar_" + schedule);
    a.norm = b.norm = "none";
    a.lr_schedule = b.lr_schedule = schedule;
    a.epochs = b.epochs = 2;
    b.micro_batches = 4;  // 25 samples: micro-batches of 7, 6, 6, 6
    const TrainResult ra = run_cluster(a, fast_net(), 2);
    const TrainResult rb = run_cluster(b, fast_net(), 2);
    // Same updates up to float summation order: losses agree to 1e-4 relative.
    for (size_t e = 0; e < 2; ++e) {
      EXPECT_NEAR(ra.epochs[e].test_loss, rb.epochs[e].test_loss, 1e-4 * std::abs(ra.epochs[e].test_loss));
      EXPECT_NEAR(ra.epochs[e].train_loss, rb.epochs[e].train_loss, 1e-4 * std::abs(ra.epochs[e].train_loss));
    }
    EXPECT_EQ(ra.test_accuracy, rb.test_accuracy);
    if (schedule == "constant") constant_loss = ra.epochs[1].test_loss;
    else EXPECT_GT(std::abs(ra.epochs[1].test_loss - constant_loss), 1e-3 * constant_loss);  // the schedule took effect
  }
}

TEST(Distributed, VanishingDeviceAndGarbageDoNotStopTheRun) {
  TrainConfig c = small_config("pipar", "vanish");
  c.devices = 3;
  NetConfig n = fast_net();
  n.device_timeout_s = 2;
  std::unique_ptr<transport::DeviceLink> ghost;
  const TrainResult r = run_cluster(c, n, 2, [&](const std::string& endpoint) {
    // Device 2 says hello and falls silent for good; a rogue peer sends garbage.
    ghost = std::make_unique<transport::DeviceLink>(endpoint, 2);
    transport::Hello h;
    h.device = 2;
    ghost->send(h);
    std::thread([endpoint] {
      zmq::context_t ctx;
      zmq::socket_t s(ctx, zmq::socket_type::dealer);
      s.set(zmq::sockopt::routing_id, "rogue-peer");
      s.set(zmq::sockopt::linger, 0);
      s.connect(endpoint);
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      s.send(zmq::str_buffer("not a flatbuffer at all"), zmq::send_flags::none);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }).detach();
  });
  ASSERT_EQ(r.epochs.size(), 1u);
  EXPECT_GE(r.test_accuracy, 0.5);
  std::ifstream f(c.out_dir + "/metrics.jsonl");
  std::string line;
  std::getline(f, line);
  const auto m = nlohmann::json::parse(line);
  EXPECT_EQ(m["devices_finished"], 2);
}

// The cost model's predicted round time is reported next to the measured one whether the planner
// chose the plan or it was given; a given plan is scored as it is and never re-planned.
TEST(Distributed, PredictedRoundTimeForFixedAndChosenPlans) {
  for (const bool fixed : {true, false}) {
    TrainConfig c = small_config("pipar", fixed ? "predict_fixed" : "predict_auto");
    c.epochs = 2;
    if (!fixed) c.split = c.micro_batches = -1;
    run_cluster(c, fast_net(), 2);
    const auto s = summary(c.out_dir);
    ASSERT_TRUE(s.contains("predicted_round_seconds")) << fixed;
    EXPECT_GT(s["predicted_round_seconds"].get<double>(), 0) << fixed;
    ASSERT_TRUE(s.contains("predicted_plan")) << fixed;
    EXPECT_EQ(s["predicted_plan"]["round_s"], s["predicted_round_seconds"]);
    if (fixed) {
      EXPECT_EQ(s["predicted_plan"]["split"], nlohmann::json::array({2, 2}));
      EXPECT_EQ(s["predicted_plan"]["micro_batches"], 3);
      EXPECT_FALSE(s.contains("replans"));  // the plan was given: no re-planning
    } else {
      EXPECT_TRUE(s.contains("plan"));
    }
    std::ifstream f(c.out_dir + "/metrics.jsonl");
    int rounds = 0;
    for (std::string line; std::getline(f, line); ++rounds) {
      const auto m = nlohmann::json::parse(line);
      ASSERT_TRUE(m.contains("predicted_round_seconds")) << fixed << " round " << rounds;
      EXPECT_GT(m["predicted_round_seconds"].get<double>(), 0);
      if (fixed) {
        EXPECT_EQ(m["predicted_round_seconds"], s["predicted_round_seconds"]);
      }
    }
    EXPECT_EQ(rounds, 2);
  }
}

// Device 2 of 3 gets ready (the partition size the server expects) and is sent round 1; then either it
// falls silent (reference) or it turns hostile: activations of the wrong shape, batches and micro-batches
// out of range, labels out of range, a micro-batch sent twice, weights of another round, while a
// stranger sends random bytes, truncated messages and a 65 MiB frame. The server answers errors, stays
// up, drops device 2 from the round after kMaxRejects, and the run ends exactly as the reference.
TEST(Distributed, HostileTrafficDuringTrainingLeavesTheRunAsIs) {
  TrainResult results[2];
  for (const bool hostile : {false, true}) {
    SCOPED_TRACE(hostile ? "hostile" : "silent");
    TrainConfig c = small_config("pipar", hostile ? "hostile" : "hostile_ref");
    c.devices = 3;
    c.epochs = 2;
    NetConfig n = fast_net();
    n.device_timeout_s = hostile ? 30 : 2;  // the hostile device is never silent: only its rejects drop it
    const data::Dataset train = data::load_dataset(c.dataset, c.data_dir, true, c.seed, c.limit_train);
    const int64_t n2 = static_cast<int64_t>(data::partition_iid(train.size(), 3, hash64(c.seed, 77))[2].size());
    ModelOptions mo;
    mo.input = train.sample_shape();
    mo.num_classes = train.num_classes;
    const Shape4 cut = build_model(c.model, mo)->block_out_shape(static_cast<size_t>(c.split) - 1);
    std::promise<int> rejected;
    std::thread actor;
    const TrainResult r = run_cluster(c, n, 2, [&](const std::string& endpoint) {
      actor = std::thread([&, endpoint] {
        transport::DeviceLink d(endpoint, 2);
        transport::Hello h;
        h.device = 2;
        d.send(h);
        auto next = [&](auto pred) {  // the server's next message matching pred (30 s at most)
          for (int i = 0; i < 300; ++i)
            if (auto m = d.recv(std::chrono::milliseconds(100)); m && m->ok() && pred(m->value())) return m->value();
          return transport::Message{};
        };
        next([](const transport::Message& m) { return std::holds_alternative<transport::Plan>(m); });  // set-up
        h.data_size = n2;
        d.send(h);  // ready, with the partition the server expects
        next([](const transport::Message& m) { return std::holds_alternative<transport::Weights>(m); });  // round 1
        if (!hostile) {
          rejected.set_value(0);
          return;  // silent from here on
        }
        auto act = [&](Shape4 shape, int batch, int micro, int label) {
          transport::Activation a;
          a.round = 0, a.batch = batch, a.micro_batch = micro, a.device = 2, a.samples = static_cast<int32_t>(shape.n);
          a.data = Tensor::zeros(shape);
          a.labels = Tensor::empty({shape.n, 1, 1, 1}, Device::kCpu, DType::kI32);
          for (int64_t i = 0; i < shape.n; ++i) a.labels.idata()[i] = label;
          d.send(a);
        };
        const Shape4 good{9, cut.c, cut.h, cut.w};
        act({9, cut.c + 1, cut.h, cut.w}, 0, 0, 1);  // wrong shape
        act(good, 9999, 0, 1);                      // batch out of range
        act(good, 0, 99, 1);                        // micro-batch out of range
        act(good, 0, 0, 10);                        // label out of range
        act(good, 0, 1, 1);                         // accepted: served, a gradient comes back
        act(good, 0, 1, 1);                         // the same micro-batch again
        transport::Weights w;
        w.round = 7, w.device = 2;
        d.send(w);                                  // weights of another round
        act({9, cut.c, cut.h + 3, cut.w}, 0, 2, 1);  // wrong shape
        act(good, -1, 0, 1);                        // negative batch
        transport::RoundEnd e;
        e.round = 3, e.device = 2;
        d.send(e);                                  // the end of another round: the 9th reject, dropped
        // A stranger: random bytes, a truncated message, a 65 MiB frame (over the 64 MiB envelope limit).
        zmq::context_t ctx;
        zmq::socket_t s(ctx, zmq::socket_type::dealer);
        s.set(zmq::sockopt::routing_id, "stranger");
        s.set(zmq::sockopt::linger, 0);
        s.connect(endpoint);
        std::string noise(1000, '\0');
        for (size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<char>(hash64(i, 5));
        s.send(zmq::buffer(noise), zmq::send_flags::none);
        transport::Activation a;
        a.round = 0, a.device = 2, a.samples = 9, a.data = Tensor::zeros(good);
        transport::Frames f = transport::encode(a);
        zmq::message_t cut_envelope(f[0].data(), f[0].size() / 2);
        s.send(cut_envelope, zmq::send_flags::sndmore);
        s.send(f[1], zmq::send_flags::none);
        s.send(zmq::message_t(size_t{65} << 20), zmq::send_flags::none);
        int errors = 0;  // error replies to device 2
        for (int i = 0; i < 50; ++i)
          if (auto m = d.recv(std::chrono::milliseconds(100)); m && m->ok() && std::holds_alternative<transport::ErrorReply>(m->value()))
            ++errors;
        d.flush(std::chrono::milliseconds(2000));
        rejected.set_value(errors);
      });
    });
    actor.join();
    const int errors = rejected.get_future().get();
    ASSERT_EQ(r.epochs.size(), 2u);
    std::ifstream f(c.out_dir + "/metrics.jsonl");
    std::vector<nlohmann::json> rounds;
    for (std::string line; std::getline(f, line);) rounds.push_back(nlohmann::json::parse(line));
    ASSERT_EQ(rounds.size(), 2u);
    EXPECT_EQ(rounds[0]["devices_finished"], 2);
    if (hostile) {
      EXPECT_EQ(errors, 9);  // every bad message of device 2 answered
      EXPECT_GE(rounds[1]["bad_messages"].get<int>(), 9 + 2);  // and the stranger's counted
    }
    results[hostile] = r;
  }
  EXPECT_EQ(results[1].test_accuracy, results[0].test_accuracy);
  for (size_t e = 0; e < 2; ++e) EXPECT_EQ(results[1].epochs[e].test_loss, results[0].epochs[e].test_loss);
}

TEST(Distributed, ServerResumesFromItsLastRound) {
  TrainConfig c = small_config("sfl", "resume_a");
  c.epochs = 1;
  const TrainResult a = run_cluster(c, fast_net(), 2);
  ASSERT_TRUE(fs::exists(c.out_dir + "/server.ckpt"));
  TrainConfig d = small_config("sfl", "resume_b");
  d.epochs = 2;
  d.load_path = c.out_dir + "/server.ckpt";
  const TrainResult b = run_cluster(d, fast_net(), 2);
  ASSERT_EQ(b.epochs.size(), 1u);  // only the second round ran
  EXPECT_EQ(b.epochs[0].epoch, 2);
  // It went on from the trained model: better than the first round's result, not from scratch.
  EXPECT_LE(b.epochs[0].test_loss, a.epochs[0].test_loss);
}

}  // namespace
}  // namespace pipar
