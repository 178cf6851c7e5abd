// The distributed modes end to end on loopback, server and devices as threads of this process: every
// mode trains; pipar equals sfl on a model without batch-norm; a device that vanishes mid-round or a
// peer that sends garbage does not stop the run, nor does hostile traffic from a device in the round;
// every split-mode round has a predicted time.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "kernels/rng.h"
#include "planner/profile.h"
#include "runtime/checkpoint.h"
#include "runtime/data.h"
#include "runtime/model.h"
#include "runtime/modes/distributed.h"
#include "runtime/privacy.h"
#include "transport/codec.h"
#include "tests/gpu.h"
#include "tests/runtime/process_util.h"
#include "transport/link.h"
#include "tests/scratch.h"

namespace pipar {
namespace {

namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  return test::scratch_dir("distributed", name);
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
                        const std::function<void(const std::string&)>& extra = {}, ProgressSink* progress = nullptr) {
  std::vector<std::thread> threads;
  std::vector<int> codes(static_cast<size_t>(devices), -1);
  struct JoinAll {  // a failing server must not leave joinable threads behind
    std::vector<std::thread>& t;
    ~JoinAll() {
      for (auto& x : t)
        if (x.joinable()) x.join();
    }
  } join_all{threads};
  TrainResult r = run_server(c, n, progress, [&](const std::string& endpoint) {
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

// The error a server with options c stops with before any device connects ("" if none).
std::string error_of(const TrainConfig& c) {
  try {
    run_server(c, fast_net());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
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
    EXPECT_EQ(s.value("server_backend", ""), "cpu") << mode;
  }
}

// A multi-GPU server (--gpus 0,1): the replicas dealt over two GPUs and averaged through NCCL train
// as the one-GPU server does, within float rounding (2e-3 relative per epoch's losses, as above).
// Skips with the reason on a machine with fewer than two GPUs.
TEST(DistributedCuda, ReplicasOverTwoGpusTrainAsOnOne) {
  PIPAR_REQUIRE_CUDA();
  if (kernels::cuda_device_count() < 2) GTEST_SKIP() << "one GPU: the multi-GPU server needs two (NCCL's one-rank path is NcclCuda.*)";
  TrainConfig a = small_config("pipar", "gpus_one");
  a.norm = "none";
  a.epochs = 2;
  a.backend = "cuda";
  a.devices = 4;
  TrainConfig b = a;
  b.gpus = {0, 1};
  b.out_dir = temp_dir("gpus_two");
  const TrainResult ra = run_cluster(a, fast_net(), 4);
  const TrainResult rb = run_cluster(b, fast_net(), 4);
  ASSERT_EQ(rb.epochs.size(), 2u);
  for (size_t e = 0; e < 2; ++e)
    EXPECT_NEAR(rb.epochs[e].test_loss, ra.epochs[e].test_loss, 2e-3 * std::abs(ra.epochs[e].test_loss)) << "epoch " << e;
}

// The server-side parts on the GPU (--backend cuda: a replica per device, each on its own stream,
// driven by server lanes): the same training as on the CPU, in pipar with shared and with private
// labels (the middle part) and in sl; and the replicas stacked (--server-batching stack) on both.
// (The stacked run is new since the last GPU session: not yet run on a GPU.) Tolerance: losses within 2e-3 relative per epoch and accuracy
// within two of the 200 test images; FP32 on both, the sums in another order (and conv algorithms
// other than the CPU's), which over 32 steps grows to about the 5e-4 the CPU-only runs see between
// kernels (PiparEqualsSplitFedWithoutBatchNorm) and a little more.
TEST(DistributedCuda, ServerOnCudaTrainsAsOnCpu) {
  PIPAR_REQUIRE_CUDA();
  struct Run {
    const char* mode;
    const char* labels;
    const char* batching;  // --server-batching: lanes, or stack (the replicas stacked, on both sides)
  };
  for (const Run run : {Run{"pipar", "shared", "lanes"}, Run{"pipar", "private", "lanes"}, Run{"sl", "shared", "lanes"},
                        Run{"pipar", "shared", "stack"}}) {
    const std::string name = std::string(run.mode) + "_" + run.labels + "_" + run.batching;
    SCOPED_TRACE(name);
    TrainConfig a = small_config(run.mode, "cuda_ref_" + name);
    a.norm = "none";
    a.labels = run.labels;
    a.server_batching = run.batching;
    a.epochs = 2;
    TrainConfig b = a;
    b.backend = "cuda";
    b.out_dir = temp_dir("cuda_" + name);
    const TrainResult ra = run_cluster(a, fast_net(), 2);
    const TrainResult rb = run_cluster(b, fast_net(), 2);
    ASSERT_EQ(ra.epochs.size(), 2u);
    ASSERT_EQ(rb.epochs.size(), 2u);
    for (size_t e = 0; e < 2; ++e) {
      EXPECT_NEAR(rb.epochs[e].test_loss, ra.epochs[e].test_loss, 2e-3 * std::abs(ra.epochs[e].test_loss)) << "epoch " << e;
      EXPECT_NEAR(rb.epochs[e].train_loss, ra.epochs[e].train_loss, 2e-3 * std::abs(ra.epochs[e].train_loss)) << "epoch " << e;
    }
    EXPECT_NEAR(rb.test_accuracy, ra.test_accuracy, 2.0 / 200 + 1e-9);
    EXPECT_EQ(summary(b.out_dir).value("server_backend", ""), "cuda");
    if (std::string(run.labels) == "shared" && std::string(run.batching) == "lanes") {  // replayed as CUDA graphs
      std::ifstream f(b.out_dir + "/metrics.jsonl");
      nlohmann::json last;
      for (std::string line; std::getline(f, line);) last = nlohmann::json::parse(line);
      EXPECT_GT(last.value("graph_replays", 0), 0) << last.dump();
      EXPECT_FALSE(last.contains("graphs_off")) << last.dump();
    }
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
    // Same updates up to float rounding: losses agree to 5e-4 relative, accuracy to one of the 200 test
    // images. Rounding differs by more than summation order: sfl's batches of 25 run conv3 through
    // Winograd, pipar's micro-batches of 6-7 through the direct kernel (too few tiles), whose results
    // differ by ~1e-7 relative; over 32 steps that grew to 2.1e-4 in the test loss (2.21706 against
    // 2.21660), one image's class flipping. A wrong loss scale or a lost micro-batch moves the loss by
    // percents; the schedule check below needs 1e-3.
    for (size_t e = 0; e < 2; ++e) {
      EXPECT_NEAR(ra.epochs[e].test_loss, rb.epochs[e].test_loss, 5e-4 * std::abs(ra.epochs[e].test_loss));
      EXPECT_NEAR(ra.epochs[e].train_loss, rb.epochs[e].train_loss, 5e-4 * std::abs(ra.epochs[e].train_loss));
    }
    EXPECT_NEAR(ra.test_accuracy, rb.test_accuracy, 1.0 / 200 + 1e-9);
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

// A device's weights upload on a slow link is not silence: its heartbeats queue behind the weights, so
// the server allows the transfer's time on top of --device-timeout (found by the ResNet18 grid at 5
// Mbit/s, whose 44 MB device part took 70 s against a 60 s timeout: every device was dropped).
TEST(Distributed, SlowWeightsUploadIsNotSilence) {
  TrainConfig c = small_config("fl", "slow_weights");
  c.devices = 1;
  c.limit_train = 50;
  NetConfig n = fast_net();
  n.uplink_mbps = 2;         // VGG5's 1.8 MB of weights: 7.3 s up
  n.device_timeout_s = 2;    // far less than that
  const TrainResult r = run_cluster(c, n, 1);
  ASSERT_EQ(r.epochs.size(), 1u);
  std::ifstream f(c.out_dir + "/metrics.jsonl");
  std::string line;
  std::getline(f, line);
  EXPECT_EQ(nlohmann::json::parse(line)["devices_finished"], 1);
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
      // A fixed plan's first round is predicted at set-up (the summary's figure); later rounds as
      // re-scored under what the rounds before measured.
      if (fixed && rounds == 0) {
        EXPECT_EQ(m["predicted_round_seconds"], s["predicted_round_seconds"]);
      }
    }
    EXPECT_EQ(rounds, 2);
  }
}

// Before the first plan the server probes every device's link through the links as they are: here
// shaped to 20 Mbit/s up (by the device) and 40 down (by the server), 2 ms each way. The measured
// rates are within 10% of the shaping, the latency at least the 2 ms, and the plan is scored on them.
TEST(Distributed, LinkProbeMeasuresTheShapedLinksBeforeTheFirstPlan) {
  TrainConfig c = small_config("pipar", "probe");
  c.epochs = 1;
  c.split = c.micro_batches = -1;
  NetConfig n = fast_net();
  n.uplink_mbps = 20;
  n.downlink_mbps = 40;
  n.latency_ms = 2;
  run_cluster(c, n, 2);
  const auto s = summary(c.out_dir);
  ASSERT_TRUE(s.contains("link_probe")) << s.dump();
  const auto& links = s["link_probe"]["links"];
  ASSERT_EQ(links.size(), 2u);
  for (const auto& l : links) {
    EXPECT_NEAR(l["up_mbps"].get<double>(), 20, 2) << l.dump();
    EXPECT_NEAR(l["down_mbps"].get<double>(), 40, 4) << l.dump();
    EXPECT_GE(l["latency_ms"].get<double>(), 2.0) << l.dump();
    EXPECT_LT(l["latency_ms"].get<double>(), 10.0) << l.dump();
  }
  EXPECT_LT(s["link_probe"]["seconds"].get<double>(), 10.0);
}

// The uplink cut to a quarter from round 1 on (--uplink-schedule, shaped at run time): the re-planner
// sees each device's measured uplink drift after that round and re-plans, within the two
// rounds; the downlink, measured from the server's paced sends, does not drift.
TEST(Distributed, SlowerUplinkRePlansAfterTheFirstSlowRound) {
  TrainConfig c = small_config("pipar", "replan_uplink");
  c.epochs = 3;
  c.limit_train = 400;
  c.split = c.micro_batches = -1;
  NetConfig n = fast_net();
  n.uplink_mbps = 40;
  n.downlink_mbps = 40;
  n.uplink_schedule = {{1, 10}};
  run_cluster(c, n, 2);
  const auto s = summary(c.out_dir);
  ASSERT_TRUE(s.contains("replans")) << s.dump();
  bool uplink = false;
  for (const auto& r : s["replans"]) {
    const int after = r["after_round"].get<int>();
    for (const auto& why : r["reasons"]) {
      const std::string w = why.get<std::string>();
      EXPECT_EQ(w.find("downlink"), std::string::npos) << w;
      if (w.find("uplink") != std::string::npos) {
        uplink = true;
        EXPECT_EQ(after, 2) << w;  // after round 2 (1-based), the first slow one
        EXPECT_NE(w.find("-7"), std::string::npos) << w;  // about -75%
      }
    }
  }
  EXPECT_TRUE(uplink) << s["replans"].dump();
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

// --- crash recovery --------------------------------------------------------------------------------

// Ends a server abruptly after round `after` (its checkpoint written), as a SIGKILL between rounds
// would: the exception unwinds run_server, whose socket closes without a "finished" message, so its
// devices only see it fall silent.
struct Crash : std::runtime_error {
  Crash() : std::runtime_error("crash") {}
};
struct CrashAfter : ProgressSink {
  int after;
  explicit CrashAfter(int a) : after(a) {}
  void on_epoch(const EpochMetrics& m, int) override {
    if (m.epoch == after) throw Crash();
  }
};

// Runs c's server for one round with two device threads that give up when it is gone (no
// reconnecting; the caller joins them), then crashes it.
void crash_after_round_one(const TrainConfig& c, std::vector<std::thread>& old_devices) {
  CrashAfter crash(1);
  EXPECT_THROW(run_server(c, fast_net(), &crash,
                          [&](const std::string& e) {
                            for (uint32_t d = 0; d < 2; ++d)
                              old_devices.emplace_back([d, e] {
                                DeviceOptions o;
                                o.connect = e, o.id = d, o.timeout_s = 5, o.reconnect_s = 0;
                                run_device(o);
                              });
                          }),
               Crash);
}

// The server's log lines (ProgressSink).
struct Said : ProgressSink {
  std::vector<std::string> lines;
  void on_message(const std::string& line) override { lines.push_back(line); }
  bool any(const std::string& part) const {
    return std::any_of(lines.begin(), lines.end(), [&](const std::string& l) { return l.find(part) != std::string::npos; });
  }
};

std::vector<nlohmann::json> metrics(const std::string& dir) {
  std::ifstream f(dir + "/metrics.jsonl");
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// Devices that share the server's machine on one thread each (launched_device_threads 1, as pipar
// train's) profile at set-up in their CPU time, and the planner reads those profiles as each device's
// speed alone (the server log says so); --device-profile-clock wall keeps the wall clock, an unknown
// clock is refused before anything starts.
TEST(Distributed, DevicesSharingTheCoresProfileInCpuTime) {
  for (const std::string clock : {"auto", "wall"}) {
    TrainConfig c = small_config("pipar", "profile_clock_" + clock);
    c.split = c.micro_batches = -1;
    NetConfig n = fast_net();
    n.launched_device_threads = 1;
    n.shared_cores = 2;
    n.device_profile_clock = clock;
    Said said;
    run_cluster(c, n, 2, {}, &said);
    for (const int d : {0, 1}) {
      const planner::Profile p = planner::Profile::load(c.out_dir + "/profile_device" + std::to_string(d) + ".json");
      EXPECT_EQ(p.cpu_time, clock == "auto") << clock << " device " << d;
    }
    EXPECT_TRUE(said.any(clock == "auto" ? "their profiles alone, in CPU time" : "their profiles all at once")) << clock;
  }
  NetConfig bad = fast_net();
  bad.device_profile_clock = "sundial";
  TrainConfig c = small_config("pipar", "profile_clock_bad");
  try {
    run_server(c, bad);
    ADD_FAILURE() << "an unknown profile clock was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sundial"), std::string::npos) << e.what();
  }
}

// Runs a and b trained the same model over `rounds` rounds of small_config: per round the train and
// test losses agree to 1e-4 relative, the accuracies to one of the 400 training and 200 test images.
void expect_same_training(const TrainResult& ra, const TrainResult& rb, size_t rounds) {
  ASSERT_EQ(ra.epochs.size(), rounds);
  ASSERT_EQ(rb.epochs.size(), rounds);
  for (size_t e = 0; e < rounds; ++e) {
    SCOPED_TRACE(e);
    EXPECT_NEAR(ra.epochs[e].train_loss, rb.epochs[e].train_loss, 1e-4 * std::abs(ra.epochs[e].train_loss));
    EXPECT_NEAR(ra.epochs[e].test_loss, rb.epochs[e].test_loss, 1e-4 * std::abs(ra.epochs[e].test_loss));
    EXPECT_NEAR(ra.epochs[e].train_accuracy, rb.epochs[e].train_accuracy, 1.0 / 400 + 1e-9);
    EXPECT_NEAR(ra.epochs[e].test_accuracy, rb.epochs[e].test_accuracy, 1.0 / 200 + 1e-9);
  }
}

// Every tensor of a server checkpoint (the model's weights, momentum, buffers and the state records),
// by name, as floats.
std::map<std::string, std::vector<float>> checkpoint_tensors(const std::string& path) {
  const CheckpointMeta meta = read_checkpoint_meta(path);
  auto m = build_model(meta.model, meta.options);
  std::vector<CheckpointState> state;
  load_checkpoint(path, *m, &state);
  std::map<std::string, std::vector<float>> out;
  for (Param* p : m->params()) out[p->name] = p->value.to_vector(), out[p->name + "/momentum"] = p->momentum.to_vector();
  for (const Buffer& b : m->buffers()) out[b.name] = b.value->to_vector();
  for (const CheckpointState& st : state) out["state " + st.name] = st.value.to_vector();
  return out;
}

// Runs c with a server that crashes after round `crash_after` and a second one that resumes from its
// checkpoint (--load <out>/server.ckpt, same options, same endpoint). The devices are threads that live
// through both: they notice the silence (timeout 5 s), reconnect with back-off and take the restarted
// server's rounds.
void run_crashed_and_resumed(const TrainConfig& c, int crash_after, const std::function<void()>& before_resume = {}) {
  std::vector<std::thread> devices;
  std::vector<int> codes(static_cast<size_t>(c.devices), -1);
  std::string endpoint;
  CrashAfter crash(crash_after);
  EXPECT_THROW(run_server(c, fast_net(), &crash,
                          [&](const std::string& e) {
                            endpoint = e;
                            for (int d = 0; d < c.devices; ++d)
                              devices.emplace_back([&, d, e] {
                                DeviceOptions o;
                                o.connect = e;
                                o.id = static_cast<uint32_t>(d);
                                o.timeout_s = 5;  // > every silence of a live server (it profiles, evaluates)
                                o.reconnect_s = 120;
                                codes[static_cast<size_t>(d)] = run_device(o);
                              });
                          }),
               Crash);
  EXPECT_TRUE(fs::exists(c.out_dir + "/server.ckpt"));
  if (before_resume) before_resume();
  TrainConfig again = c;
  again.load_path = c.out_dir + "/server.ckpt";
  NetConfig n = fast_net();
  n.listen = endpoint;  // where the devices look for it
  try {
    // The crashed server's socket closes in the background (the transport's shared ZeroMQ context), and
    // a device's reconnect attempt may hold the port for a moment: bind again until it is free.
    for (int attempt = 0;; ++attempt) {
      try {
        run_server(again, n);
        break;
      } catch (const Error& e) {
        if (std::string(e.what()).find("cannot bind") == std::string::npos || attempt >= 150) throw;
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
    }
  } catch (...) {
    for (auto& t : devices) t.join();
    throw;
  }
  for (auto& t : devices) t.join();
  for (int d = 0; d < c.devices; ++d) EXPECT_EQ(codes[static_cast<size_t>(d)], 0) << "device " << d;
}

// A run of 3 rounds, interrupted after the first and resumed, ends bitwise as the uninterrupted run:
// every round's losses and accuracy, and every tensor of the final checkpoint (weights, batch-norm
// statistics, each server-side replica's momentum). Bitwise, not within a tolerance: the resumed
// server restores exactly the state the uninterrupted one carried (the checkpoint stores raw f32), the
// devices roll their momentum back to its state at the start of the repeated round, data order,
// augmentation and learning rate are functions of (seed, round, batch), and one thread per process
// makes every kernel's summation order fixed. pipar (server-side momentum per device, batch-norm, 3
// micro-batches, cosine schedule) and fl (the momentum lives on the devices only).
TEST(Distributed, ResumedRunEqualsTheUninterruptedOne) {
  for (const std::string mode : {"pipar", "fl"}) {
    SCOPED_TRACE(mode);
    TrainConfig ref = small_config(mode, "resume_ref_" + mode);
    ref.epochs = 3;
    // pipar: cross-device batching, 2 lanes of one thread; the resumed server trains on the same lanes.
    if (mode == "pipar") ref.threads = 2, ref.server_lanes = 2;
    ASSERT_GT(ref.momentum, 0.0f);
    run_cluster(ref, fast_net(), 2);
    TrainConfig c = small_config(mode, "resume_crash_" + mode);
    c.epochs = 3;
    c.threads = ref.threads, c.server_lanes = ref.server_lanes;
    // What a crash can leave in metrics.jsonl besides the checkpointed rounds: the record of a round the
    // resumed run will run again, and a line cut short. The resumed run keeps one line per round.
    run_crashed_and_resumed(c, 1, [&] {
      std::ofstream(c.out_dir + "/metrics.jsonl", std::ios::app) << "{\"round\": 1, \"epoch\": 2, \"device_busy_seconds\": [0, 0]}\n"
                                                                  << "{\"round\": 2, \"tra";
    });

    const auto a = metrics(ref.out_dir), b = metrics(c.out_dir);
    ASSERT_EQ(a.size(), 3u);
    ASSERT_EQ(b.size(), 3u);
    for (size_t r = 0; r < 3; ++r) {
      SCOPED_TRACE(r);
      EXPECT_EQ(b[r]["epoch"], static_cast<int>(r + 1));
      for (const char* key : {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "samples"})
        EXPECT_EQ(a[r][key], b[r][key]) << key;
      EXPECT_EQ(b[r]["devices_finished"], 2);
      if (mode == "pipar") {
        EXPECT_EQ(b[r]["server_lanes"], 2);
      }
    }
    // summary.json of the resumed run covers the whole run, the rounds before the crash included.
    const auto sa = summary(ref.out_dir), sb = summary(c.out_dir);
    EXPECT_EQ(sb["epochs_completed"], 3);
    ASSERT_EQ(sb["epoch_seconds"].size(), 3u);
    double rounds_s = 0, up = 0;
    for (const auto& line : b) rounds_s += line["round_seconds"].get<double>(), up += line["bytes_up"].get<double>();
    EXPECT_NEAR(sb["train_seconds"].get<double>(), rounds_s, 1e-9 * rounds_s);
    EXPECT_EQ(sb["bytes_up"].get<double>(), up);
    EXPECT_EQ(sb["test_accuracy"], sa["test_accuracy"]);
    const auto ta = checkpoint_tensors(ref.out_dir + "/server.ckpt");
    const auto tb = checkpoint_tensors(c.out_dir + "/server.ckpt");
    ASSERT_EQ(ta.size(), tb.size());
    size_t states = 0;
    for (const auto& [name, values] : ta) {
      ASSERT_TRUE(tb.count(name)) << name;
      EXPECT_TRUE(values == tb.at(name)) << name;
      states += name.rfind("state ", 0) == 0;
    }
    if (mode == "pipar") EXPECT_GT(states, 0u);  // the replicas' momentum is there
    else EXPECT_EQ(states, 0u);                  // fl: the server keeps no optimizer state
  }
}

// With differential privacy, epsilon in metrics.jsonl goes on from its total after a resume, even when
// the devices are new processes: the checkpoint holds, per device, the rounds of its data released,
// and the server hands them to the devices, whose accountants compose them before the next round.
// Crashed between rounds, the total is exactly the uninterrupted run's; crashed in a round that had
// begun (privacy_rounds.json, written before a round's plans go out, says so), that round's releases
// count too, and the round run again counts once more.
TEST(Distributed, EpsilonContinuesAfterAResume) {
  for (const bool begun : {false, true}) {
    SCOPED_TRACE(begun ? "crashed in round 2" : "crashed after round 1");
    TrainConfig c = small_config("pipar", begun ? "resume_dp_begun" : "resume_dp");
    c.norm = "none";
    c.limit_train = 400;
    c.epochs = 3;
    c.dp_clip = 5, c.dp_sigma = 1.5f, c.dp_sgd = true, c.dp_delta = 1e-5;
    // Round 1, then the server crashes; its devices give up (no reconnecting) and are not used again.
    std::vector<std::thread> old_devices;
    crash_after_round_one(c, old_devices);
    const std::string journal = c.out_dir + "/privacy_rounds.json";
    {
      std::ifstream f(journal);
      ASSERT_TRUE(f.good());
      EXPECT_EQ(nlohmann::json::parse(f), (nlohmann::json{{"round", 0}, {"privacy_rounds", {1, 1}}}));
    }
    if (begun) std::ofstream(journal) << nlohmann::json{{"round", 1}, {"privacy_rounds", {2, 2}}}.dump();
    // Rounds 2 and 3: a new server (new endpoint) and two new device processes (threads).
    TrainConfig again = c;
    again.load_path = c.out_dir + "/server.ckpt";
    run_cluster(again, fast_net(), 2);
    for (auto& t : old_devices) t.join();

    const auto lines = metrics(c.out_dir);
    ASSERT_EQ(lines.size(), 3u);
    RdpAccountant expected;
    for (size_t r = 0; r < 3; ++r) {
      // Per round and device (200 samples, 8 batches of 25): the activations once at sigma/2, then 8
      // DP-SGD steps at q = 25/200; replayed round by round, so the same sums in the same order.
      for (int times = 0; times < (begun && r == 1 ? 2 : 1); ++times) {
        expected.step(1.0, c.dp_sigma / 2.0, 1);
        expected.step(25 / 200.0, c.dp_sigma, 8);
      }
      ASSERT_TRUE(lines[r].contains("epsilon")) << lines[r].dump();
      EXPECT_DOUBLE_EQ(lines[r]["epsilon"].get<double>(), expected.epsilon(c.dp_delta)) << "round " << r + 1;
    }
    EXPECT_GT(lines[1]["epsilon"].get<double>(), lines[0]["epsilon"].get<double>());
    const auto extra = nlohmann::json::parse(read_checkpoint_meta(c.out_dir + "/server.ckpt").extra_json);
    EXPECT_EQ(extra["privacy_rounds"], begun ? nlohmann::json({4, 4}) : nlohmann::json({3, 3}));
  }
}

// Runs c (automatic plan, 2 rounds) to a crash after round 1, lets `edit` change the checkpoint's
// metadata, and resumes it to the end with two fresh devices. Returns the resumed server's log.
Said resume_with_edited_checkpoint(const TrainConfig& c, const std::function<void(nlohmann::json& extra)>& edit) {
  std::vector<std::thread> old_devices;
  crash_after_round_one(c, old_devices);
  const std::string ckpt = c.out_dir + "/server.ckpt";
  CheckpointMeta meta = read_checkpoint_meta(ckpt);
  nlohmann::json extra = nlohmann::json::parse(meta.extra_json);
  EXPECT_TRUE(extra.contains("planner")) << extra.dump();
  edit(extra);
  meta.extra_json = extra.dump();
  auto m = build_model(meta.model, meta.options);
  std::vector<CheckpointState> state;
  load_checkpoint(ckpt, *m, &state);
  save_checkpoint(ckpt, *m, meta, state);

  TrainConfig again = c;
  again.load_path = ckpt;
  Said said;
  std::vector<std::thread> devices;
  run_server(again, fast_net(), &said, [&](const std::string& e) {
    for (uint32_t d = 0; d < 2; ++d)
      devices.emplace_back([d, e] {
        DeviceOptions o;
        o.connect = e, o.id = d, o.timeout_s = 30;
        run_device(o);
      });
  });
  for (auto& t : devices) t.join();
  for (auto& t : old_devices) t.join();
  return said;
}

// A resumed run with an automatic plan goes on with the plan its checkpoint holds (and the
// re-planner's basis), not one searched afresh: here the checkpoint's plan is replaced by another
// valid one, which the resumed round then uses.
TEST(Distributed, ResumeKeepsTheCheckpointsPlan) {
  TrainConfig c = small_config("pipar", "resume_plan");
  c.split = c.micro_batches = -1;  // auto
  c.epochs = 2;
  nlohmann::json split;
  const Said said = resume_with_edited_checkpoint(c, [&](nlohmann::json& extra) {
    ASSERT_EQ(extra["planner"]["devices"].size(), 2u);
    // Another plan than the one in force, with a split point per device: 1 and 3, or 3 and 1, and 5
    // micro-batches.
    split = extra["split"] == nlohmann::json::array({1, 3}) ? nlohmann::json::array({3, 1}) : nlohmann::json::array({1, 3});
    extra["split"] = split, extra["micro_batches"] = 5;
    extra["planner"]["plan"]["split"] = split, extra["planner"]["plan"]["micro_batches"] = 5;
  });
  EXPECT_TRUE(said.any("plan as the checkpoint left it")) << ::testing::PrintToString(said.lines);
  const auto lines = metrics(c.out_dir);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[1]["split"], split);
  EXPECT_EQ(lines[1]["micro_batches"], 5);
}

// A re-plan that measures worse is undone: the first round under a re-planned plan took longer per
// sample than the last round under the plan before it, so the server goes back to that plan (and its
// basis) and from then on re-plans only on drifting links. The re-plan on trial is put into the
// checkpoint (plan 1/3 N=5 in force, plan 2 N=4 before it, whose last round "took" 1 ns per sample);
// the resumed round 2 is then its first round. Against a plan before that "took" 1000 s per sample
// nothing is undone.
TEST(Distributed, ReplanThatMeasuresWorseIsUndone) {
  for (const bool worse : {true, false}) {
    SCOPED_TRACE(worse);
    TrainConfig c = small_config("pipar", worse ? "replan_undo" : "replan_kept");
    c.split = c.micro_batches = -1;  // auto
    c.epochs = 2;
    const Said said = resume_with_edited_checkpoint(c, [&](nlohmann::json& extra) {
      nlohmann::json& ps = extra["planner"];
      ps["trial"] = {{"before", ps["plan"]}, {"basis", {{"devices", ps["devices"]}, {"server_time_scale", ps["server_time_scale"]}}},
                     {"per_sample_s", worse ? 1e-9 : 1e3}, {"up_mbps", {0, 0}}};  // 0: not measured (unshaped links)
      ps["trial"]["before"]["split"] = {2, 2}, ps["trial"]["before"]["micro_batches"] = 4;
      extra["split"] = {1, 3}, extra["micro_batches"] = 5;
      ps["plan"]["split"] = {1, 3}, ps["plan"]["micro_batches"] = 5;
    });
    const auto lines = metrics(c.out_dir);
    ASSERT_EQ(lines.size(), 2u);
    EXPECT_EQ(lines[1]["split"], nlohmann::json::array({1, 3}));  // round 2 ran the plan on trial
    EXPECT_EQ(said.any("re-plan undone"), worse) << ::testing::PrintToString(said.lines);
    const auto extra = nlohmann::json::parse(read_checkpoint_meta(c.out_dir + "/server.ckpt").extra_json);
    // The injected trial was judged (a re-plan after round 2 may have put a new one on trial).
    if (extra["planner"].contains("trial")) {
      EXPECT_NE(extra["planner"]["trial"]["per_sample_s"], worse ? 1e-9 : 1e3);
    }
    if (worse) {
      EXPECT_FALSE(extra["planner"].contains("trial"));  // undone: nothing re-planned that round
    }
    if (worse) {
      EXPECT_EQ(extra["split"], 2);  // the next round's plan: the one before
      EXPECT_EQ(extra["micro_batches"], 4);
      EXPECT_EQ(extra["planner"]["speed_replans"], false);
      const auto s = summary(c.out_dir);
      ASSERT_FALSE(s["replans"].empty());
      EXPECT_NE(s["replans"].back()["reasons"][0].get<std::string>().find("undone"), std::string::npos);
    } else {
      EXPECT_EQ(extra["planner"]["speed_replans"], true);
    }
  }
}

// --- private labels (U-shaped split) ---------------------------------------------------------------

// --labels private trains exactly the model --labels shared trains: the same blocks run the same ops
// on the same micro-batches with the same loss scale and steps, only the last block and the loss run
// on the device. Per round the train and test losses agree to 1e-4 relative, the accuracies to one of
// the 200 test images (observed: bitwise equal, one thread per process; the tolerance leaves room for
// kernels whose summation order follows the thread count, as the device's and the server's may
// differ). sfl and pipar with N = 3, with batch-norm in the server's middle blocks. No label reaches
// the server. (This test found that profiling on the device's own model left momentum behind.)
TEST(Distributed, PrivateLabelsTrainAsSharedLabels) {
  for (const std::string mode : {"sfl", "pipar"}) {
    SCOPED_TRACE(mode);
    TrainConfig a = small_config(mode, "labels_shared_" + mode);
    TrainConfig b = small_config(mode, "labels_private_" + mode);
    a.epochs = b.epochs = 2;
    b.labels = "private";
    const TrainResult ra = run_cluster(a, fast_net(), 2);
    const TrainResult rb = run_cluster(b, fast_net(), 2);
    ASSERT_NO_FATAL_FAILURE(expect_same_training(ra, rb, 2));
    EXPECT_GE(rb.test_accuracy, 0.6);
    EXPECT_GT(rb.epochs[0].train_loss, 0);  // the devices' loss reached the metrics
    const auto ma = metrics(a.out_dir), mb = metrics(b.out_dir);
    ASSERT_EQ(mb.size(), 2u);
    for (const auto& m : mb) {
      EXPECT_EQ(m["labels"], "private");
      EXPECT_EQ(m["labelled_activations"], 0);
      EXPECT_EQ(m["devices_finished"], 2);
      EXPECT_EQ(m["bad_messages"], 0);
    }
    EXPECT_GT(ma[1]["labelled_activations"].get<int>(), 0);  // shared: they do come (anti-vacuity)
    // The extra hop: the middle outputs go down and their gradients up (more bytes both ways).
    EXPECT_GT(mb[0]["bytes_down"].get<double>(), ma[0]["bytes_down"].get<double>());
    EXPECT_EQ(summary(b.out_dir)["labels"], "private");
  }
}

// A run interrupted after round 1 and resumed ends bitwise as the uninterrupted one with private
// labels too: the checkpoint holds the devices' averaged last block, the devices their own momentum.
// Runs ref (2 rounds) uninterrupted, and again in crash_dir crashed after round 1 and resumed; both
// runs' rounds and final checkpoints must be bitwise equal. Returns the checkpoint's tensors.
std::map<std::string, std::vector<float>> expect_resumed_run_equals_uninterrupted(const TrainConfig& ref, const std::string& crash_dir) {
  run_cluster(ref, fast_net(), 2);
  TrainConfig c = ref;
  c.out_dir = temp_dir(crash_dir);
  run_crashed_and_resumed(c, 1);
  const auto a = metrics(ref.out_dir), b = metrics(c.out_dir);
  EXPECT_EQ(a.size(), 2u);
  EXPECT_EQ(b.size(), 2u);
  for (size_t r = 0; r < 2 && r < a.size() && r < b.size(); ++r)
    for (const char* key : {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}) EXPECT_EQ(a[r][key], b[r][key]) << r << key;
  const auto ta = checkpoint_tensors(ref.out_dir + "/server.ckpt");
  const auto tb = checkpoint_tensors(c.out_dir + "/server.ckpt");
  EXPECT_EQ(ta.size(), tb.size());
  for (const auto& [name, values] : ta) EXPECT_TRUE(tb.count(name) && values == tb.at(name)) << name;
  return ta;
}

TEST(Distributed, PrivateLabelsResumedRunEqualsTheUninterruptedOne) {
  TrainConfig ref = small_config("pipar", "labels_resume_ref");
  ref.epochs = 2;
  ref.labels = "private";
  const auto ta = expect_resumed_run_equals_uninterrupted(ref, "labels_resume_crash");
  // The tail in the checkpoint is trained: not the initial weights.
  ModelOptions mo;
  mo.input = {1, 1, 28, 28};
  auto init = build_model(ref.model, mo);
  const Param* tail = init->params(init->num_blocks() - 1).front();
  ASSERT_TRUE(ta.count(tail->name));
  EXPECT_NE(ta.at(tail->name), tail->value.to_vector()) << tail->name;
}

// Invalid combinations fail at once with errors that name the problem.
TEST(Distributed, PrivateLabelsRefuseInvalidPlans) {
  TrainConfig c = small_config("fl", "labels_bad_fl");
  c.labels = "private";
  EXPECT_NE(error_of(c).find("--labels private needs a split mode"), std::string::npos) << error_of(c);
  c = small_config("sfl", "labels_bad_split");
  c.labels = "private";
  c.split = 4;  // vgg5: 5 blocks, the device keeps the last: 1..3
  const std::string split_error = error_of(c);
  EXPECT_NE(split_error.find("5 blocks"), std::string::npos) << split_error;
  EXPECT_NE(split_error.find("1..3"), std::string::npos) << split_error;
  c = small_config("pipar", "labels_bad_dpsgd");
  c.labels = "private";
  c.norm = "none";
  c.dp_clip = 1, c.dp_sigma = 0.1f, c.dp_sgd = true;
  EXPECT_NE(error_of(c).find("--dp-sgd with --labels private"), std::string::npos) << error_of(c);
  c = small_config("sfl", "labels_bad_value");
  c.labels = "secret";
  EXPECT_NE(error_of(c).find("--labels must be shared or private"), std::string::npos) << error_of(c);
}

// Device 2 of 3 in a private-labels pipar run turns hostile: a labelled activation (rejected: labels
// must not reach the server), then a good unlabelled one (the server answers with the middle output,
// no labels), then gradients of that output of the wrong shape, for a micro-batch never forwarded, and
// the right one (the cut gradient comes back), then the right one again. Every bad message gets an
// error reply; the server stays up; the run ends with the two honest devices.
TEST(Distributed, PrivateLabelsServerRejectsLabelsAndBadGradients) {
  TrainConfig c = small_config("pipar", "labels_hostile");
  c.devices = 3;
  c.labels = "private";
  NetConfig n = fast_net();
  n.device_timeout_s = 3;  // device 2 falls silent after its messages
  const data::Dataset train = data::load_dataset(c.dataset, c.data_dir, true, c.seed, c.limit_train);
  const int64_t n2 = static_cast<int64_t>(data::partition_iid(train.size(), 3, hash64(c.seed, 77))[2].size());
  ModelOptions mo;
  mo.input = train.sample_shape();
  mo.num_classes = train.num_classes;
  auto model = build_model(c.model, mo);
  const Shape4 cut = model->block_out_shape(static_cast<size_t>(c.split) - 1);
  const Shape4 mid = model->block_out_shape(model->num_blocks() - 2);
  struct Seen {
    int errors = 0;
    bool middle_output = false, middle_labels = false, cut_gradient = false;
    Shape4 middle_shape{}, cut_shape{};
  };
  std::promise<Seen> seen;
  std::thread actor;
  const TrainResult r = run_cluster(c, n, 2, [&](const std::string& endpoint) {
    actor = std::thread([&, endpoint] {
      Seen out;
      transport::DeviceLink d(endpoint, 2);
      transport::Hello h;
      h.device = 2;
      d.send(h);
      auto next = [&](auto pred) {  // the server's next message matching pred (30 s at most); counts errors
        for (int i = 0; i < 300; ++i)
          if (auto m = d.recv(std::chrono::milliseconds(100)); m && m->ok()) {
            if (std::holds_alternative<transport::ErrorReply>(m->value())) ++out.errors;
            if (pred(m->value())) return m->value();
          }
        return transport::Message{};
      };
      next([](const transport::Message& m) { return std::holds_alternative<transport::Plan>(m); });  // set-up
      h.data_size = n2;
      d.send(h);
      next([](const transport::Message& m) { return std::holds_alternative<transport::Weights>(m); });  // round 1
      const Shape4 good{9, cut.c, cut.h, cut.w};
      transport::Activation a;
      a.round = 0, a.batch = 0, a.micro_batch = 0, a.device = 2, a.samples = 9;
      a.data = Tensor::zeros(good);
      a.labels = Tensor::zeros({9, 1, 1, 1}, Device::kCpu, DType::kI32);
      d.send(a);  // labelled: rejected
      a.labels = Tensor{};
      d.send(a);  // accepted: the middle output comes back
      const transport::Message m = next([](const transport::Message& x) { return std::holds_alternative<transport::Activation>(x); });
      if (const auto* o = std::get_if<transport::Activation>(&m)) {
        out.middle_output = true;
        out.middle_labels = o->labels.defined();
        out.middle_shape = o->data.shape();
      }
      auto grad = [&](Shape4 shape, int micro) {
        transport::Gradient g;
        g.round = 0, g.batch = 0, g.micro_batch = micro, g.device = 2, g.samples = static_cast<int32_t>(shape.n);
        g.data = Tensor::zeros(shape);
        d.send(g);
      };
      grad({9, mid.c + 1, mid.h, mid.w}, 0);  // wrong shape: rejected
      grad({8, mid.c, mid.h, mid.w}, 0);      // wrong sample count: rejected
      grad({9, mid.c, mid.h, mid.w}, 1);      // micro-batch 1 was never forwarded: rejected
      grad({9, mid.c, mid.h, mid.w}, 0);      // right: the cut gradient comes back
      const transport::Message back = next([](const transport::Message& x) { return std::holds_alternative<transport::Gradient>(x); });
      if (const auto* g = std::get_if<transport::Gradient>(&back)) out.cut_gradient = true, out.cut_shape = g->data.shape();
      grad({9, mid.c, mid.h, mid.w}, 0);  // again: rejected
      for (int i = 0; i < 20; ++i)
        if (auto x = d.recv(std::chrono::milliseconds(100)); x && x->ok() && std::holds_alternative<transport::ErrorReply>(x->value()))
          ++out.errors;
      seen.set_value(out);
    });
  });
  actor.join();
  const Seen s = seen.get_future().get();
  EXPECT_EQ(s.errors, 5);
  EXPECT_TRUE(s.middle_output);
  EXPECT_FALSE(s.middle_labels);
  EXPECT_EQ(s.middle_shape, (Shape4{9, mid.c, mid.h, mid.w}));
  EXPECT_TRUE(s.cut_gradient);
  EXPECT_EQ(s.cut_shape, (Shape4{9, cut.c, cut.h, cut.w}));
  ASSERT_EQ(r.epochs.size(), 1u);
  EXPECT_GE(r.test_accuracy, 0.5);
  const auto m = metrics(c.out_dir);
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0]["devices_finished"], 2);
  EXPECT_EQ(m[0]["labelled_activations"], 1);  // device 2's, rejected
  EXPECT_GE(m[0]["bad_messages"].get<int>(), 5);
}

// --- per-device split points ----------------------------------------------------------------------

// Devices that split at different blocks train the same model as devices that all split at one: a block
// runs the same ops on the device as on the server, and FedAvg averages each block over the devices
// wherever each trained it. sfl, pipar and pipar with private labels; devices at blocks 1 and 3 against
// both at 2. Per round the losses agree to 1e-4 relative and the accuracies to one image (as
// PrivateLabelsTrainAsSharedLabels: the same arithmetic, but the device's and the server's kernels may
// sum in another order). The split points are recorded per device wherever the plan is.
TEST(Distributed, PerDeviceSplitsTrainAsOneSplit) {
  for (const auto& [mode, labels] : {std::pair<std::string, std::string>{"sfl", "shared"}, {"pipar", "shared"}, {"pipar", "private"}}) {
    SCOPED_TRACE(mode + " " + labels);
    TrainConfig a = small_config(mode, "split_one_" + mode + labels);
    TrainConfig b = small_config(mode, "split_per_device_" + mode + labels);
    a.epochs = b.epochs = 2;
    a.labels = b.labels = labels;
    b.device_splits = {1, 3};
    b.split = 1;
    const TrainResult ra = run_cluster(a, fast_net(), 2);
    const TrainResult rb = run_cluster(b, fast_net(), 2);
    ASSERT_NO_FATAL_FAILURE(expect_same_training(ra, rb, 2));
    EXPECT_GE(rb.test_accuracy, 0.6);
    const nlohmann::json splits = nlohmann::json::array({1, 3});
    for (const auto& m : metrics(b.out_dir)) {
      EXPECT_EQ(m["split"], splits);
      EXPECT_EQ(m["devices_finished"], 2);
      EXPECT_EQ(m["bad_messages"], 0);
    }
    EXPECT_EQ(metrics(a.out_dir)[0]["split"], 2);  // one number where every device splits alike
    const auto s = summary(b.out_dir);
    EXPECT_EQ(s["split"], splits);
    EXPECT_EQ(s["predicted_plan"]["split"], splits);  // the cost model scored the plan as it ran
    EXPECT_EQ(nlohmann::json::parse(read_checkpoint_meta(b.out_dir + "/server.ckpt").extra_json)["split"], splits);
  }
}

// Split points per device that cannot work fail at once, naming the problem.
TEST(Distributed, PerDeviceSplitsRefuseInvalidPlans) {
  TrainConfig c = small_config("sl", "splits_bad_sl");
  c.device_splits = {1, 3};
  EXPECT_NE(error_of(c).find("take turns through one server part"), std::string::npos) << error_of(c);
  c = small_config("pipar", "splits_bad_count");
  c.device_splits = {1, 2, 3};
  EXPECT_NE(error_of(c).find("3 split points for 2 devices"), std::string::npos) << error_of(c);
  c = small_config("pipar", "splits_bad_auto");
  c.device_splits = {1, 3};
  c.micro_batches = -1;
  EXPECT_NE(error_of(c).find("give --micro-batches too"), std::string::npos) << error_of(c);
  c = small_config("sfl", "splits_bad_block");
  c.device_splits = {1, 5};  // vgg5: split points 1..4
  EXPECT_NE(error_of(c).find("1..4"), std::string::npos) << error_of(c);
  c = small_config("pipar", "splits_bad_private");
  c.labels = "private";
  c.device_splits = {1, 4};  // the device keeps the last block: 1..3
  EXPECT_NE(error_of(c).find("1..3"), std::string::npos) << error_of(c);
}

// A run with per-device split points, interrupted after round 1 and resumed, ends bitwise as the
// uninterrupted one: each replica's momentum at its own split point comes back from the checkpoint.
TEST(Distributed, PerDeviceSplitsResumedRunEqualsTheUninterruptedOne) {
  TrainConfig ref = small_config("pipar", "splits_resume_ref");
  ref.epochs = 2;
  ref.device_splits = {3, 1};
  ref.split = 3;
  expect_resumed_run_equals_uninterrupted(ref, "splits_resume_crash");
}

// --- one server-side model for all devices (--server-model shared) --------------------------------

// sfl and pipar with one server-side model: it trains, its memory estimate counts the server-side
// weights once (less than one replica per device), and the checkpoint holds one server-side model's
// momentum, not one per device. With one device it is the per-device run, bitwise.
TEST(Distributed, SharedServerModelTrainsWithOneServerSideModel) {
  for (const std::string mode : {"sfl", "pipar"}) {
    SCOPED_TRACE(mode);
    TrainConfig per = small_config(mode, "server_per_device_" + mode);
    TrainConfig shared = small_config(mode, "server_shared_" + mode);
    shared.server_model = "shared";
    run_cluster(per, fast_net(), 2);
    const TrainResult r = run_cluster(shared, fast_net(), 2);
    EXPECT_GE(r.test_accuracy, 0.6);
    const auto sp = summary(per.out_dir), ss = summary(shared.out_dir);
    EXPECT_EQ(ss["server_model"], "shared");
    EXPECT_LT(ss["predicted_plan"]["server_memory_bytes"].get<double>(), sp["predicted_plan"]["server_memory_bytes"].get<double>());
    int replica0 = 0, replica1 = 0;
    for (const auto& [name, values] : checkpoint_tensors(shared.out_dir + "/server.ckpt")) {
      replica0 += name.rfind("state replica0/", 0) == 0;
      replica1 += name.rfind("state replica1/", 0) == 0;
    }
    EXPECT_GT(replica0, 0);
    EXPECT_EQ(replica1, 0);
    for (const auto& m : metrics(shared.out_dir)) EXPECT_EQ(m["devices_finished"], 2);

    TrainConfig one = small_config(mode, "server_one_per_device_" + mode), one_shared = one;
    one.devices = one_shared.devices = 1;
    one_shared.server_model = "shared";
    one_shared.out_dir = temp_dir("server_one_shared_" + mode);
    run_cluster(one, fast_net(), 1);
    run_cluster(one_shared, fast_net(), 1);
    const auto a = metrics(one.out_dir), b = metrics(one_shared.out_dir);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i)
      for (const char* key : {"train_loss", "test_loss", "test_accuracy"}) EXPECT_EQ(a[i][key], b[i][key]) << key;
  }
}

TEST(Distributed, SharedServerModelRefusesWhatItCannotDo) {
  TrainConfig c = small_config("fl", "shared_bad_fl");
  c.server_model = "shared";
  EXPECT_NE(error_of(c).find("applies to sfl and pipar"), std::string::npos) << error_of(c);
  c = small_config("pipar", "shared_bad_splits");
  c.server_model = "shared";
  c.device_splits = {1, 3};
  EXPECT_NE(error_of(c).find("splits at one block"), std::string::npos) << error_of(c);
  c = small_config("pipar", "shared_bad_private");
  c.server_model = "shared";
  c.labels = "private";
  EXPECT_NE(error_of(c).find("--labels private is not supported"), std::string::npos) << error_of(c);
  c = small_config("pipar", "shared_bad_value");
  c.server_model = "pooled";
  EXPECT_NE(error_of(c).find("--server-model must be per-device or shared"), std::string::npos) << error_of(c);
}

// GPUs named for a server that trains on the CPU, or GPUs that do not exist: refused before training.
TEST(Distributed, GpusNeedTheCudaBackendAndExistingGpus) {
  TrainConfig c = small_config("pipar", "gpus_cpu");
  c.gpus = {0};
  EXPECT_NE(error_of(c).find("--gpus places the server-side replicas on GPUs: it needs --backend cuda"), std::string::npos)
      << error_of(c);
  if (!kernels::cuda_available() || !kernels::cuda_ops_built()) return;  // the rest needs a GPU
  c.backend = "cuda";
  c.gpus = {kernels::cuda_device_count()};
  EXPECT_NE(error_of(c).find("is not one of this machine's"), std::string::npos) << error_of(c);
}

// --- light devices (DeviceOptions::record / replay) -------------------------------------------------

// A real device records its first batch; 64 light devices replaying it against one server (one shared
// server-side model) finish a round: every device's weights and round end arrive, every sample of the
// 64 partitions is served, no message is rejected. A file that is no recording fails at once.
// Three runs of 4 devices with --labels `labels`: one micro-batch at a time on one thread; 4 lanes of one
// thread, grouping what has arrived; the same waiting up to 40 ms for more (the test below).
void check_cross_device_batching(const std::string& labels) {
  auto config = [&](const std::string& out, int threads, int lanes) {  // lanes: --server-lanes
    TrainConfig c = small_config("pipar", out + "_" + labels);
    c.devices = 4;
    c.epochs = 2;
    c.threads = threads;
    c.server_lanes = lanes;
    c.labels = labels;
    c.save_path = c.out_dir + "/server.ckpt";
    return c;
  };
  const TrainConfig one = config("lanes_one", 1, 1), grouped = config("lanes_grouped", 4, 4),
                    waited = config("lanes_waited", 4, 4);
  NetConfig wait = fast_net();
  wait.group_wait_ms = 40;
  run_cluster(one, fast_net(), 4);
  run_cluster(grouped, fast_net(), 4);
  run_cluster(waited, wait, 4);
  const auto m1 = metrics(one.out_dir);
  ASSERT_EQ(m1.size(), 2u);
  for (const TrainConfig* c : {&grouped, &waited}) {
    SCOPED_TRACE(c->out_dir);
    const auto m = metrics(c->out_dir);
    ASSERT_EQ(m.size(), 2u);
    for (size_t r = 0; r < 2; ++r) {
      EXPECT_EQ(m1[r]["server_lanes"], 1);
      EXPECT_EQ(m[r]["server_lanes"], 4);
      if (labels == "private") {
        EXPECT_EQ(m[r]["labelled_activations"], 0);
      }
      for (const char* key : {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "samples"})
        EXPECT_EQ(m1[r][key], m[r][key]) << key << " round " << r;
    }
    const auto ta = checkpoint_tensors(one.out_dir + "/server.ckpt"), tb = checkpoint_tensors(c->out_dir + "/server.ckpt");
    ASSERT_EQ(ta.size(), tb.size());
    for (const auto& [name, values] : ta) {
      ASSERT_TRUE(tb.count(name)) << name;
      EXPECT_TRUE(values == tb.at(name)) << name;
    }
  }
  // Waiting for the other devices formed groups (4 devices start together and run alike).
  for (const auto& line : metrics(waited.out_dir)) {
    std::printf("%s labels: mean group size %.2f over %d groups\n", labels.c_str(), line["mean_group_size"].get<double>(),
                line["server_groups"].get<int>());
    EXPECT_GT(line["mean_group_size"].get<double>(), 1.5);
  }
  for (const auto& line : metrics(grouped.out_dir))
    std::printf("%s labels, no wait: mean group size %.2f over %d groups\n", labels.c_str(),
                line["mean_group_size"].get<double>(), line["server_groups"].get<int>());
}

// Cross-device batching: the server trains the waiting micro-batches of several devices' replicas side
// by side, one thread per lane here. Which micro-batches share a group depends on timing; the
// arithmetic must not. Runs that group differently (no waiting; waiting up to 40 ms for more devices)
// end bitwise as the run that trains one micro-batch at a time (--server-lanes 1) on one thread: every
// round's losses and accuracies, and every tensor of the final checkpoint. Shared labels (groups of
// whole server steps) and private labels (groups of middle forwards and middle backwards).
TEST(Distributed, CrossDeviceBatchingDoesNotChangeTheArithmetic) {
  for (const std::string labels : {"shared", "private"}) {
    SCOPED_TRACE(labels);
    check_cross_device_batching(labels);
  }
}

// --server-batching stack: the replicas trained as stacks (runtime/replica_stack.h), the micro-batches
// that arrive together (up to 40 ms apart) in one call per layer, against one micro-batch at a time.
// The same training up to summation order (a stacked convolution is a grouped one, and may take
// other kernels than the plain one, as ReplicaStack.EachReplicaTrainsAsAlone measures): every round's
// losses and accuracies, every tensor of the final checkpoint; groups did form. And what it refuses.
TEST(Distributed, StackedReplicasTrainAsOneAtATime) {
  auto config = [&](const std::string& out, const std::string& batching) {
    TrainConfig c = small_config("pipar", out);
    c.devices = 4;
    c.epochs = 2;
    c.server_lanes = 1;
    c.server_batching = batching;
    c.save_path = c.out_dir + "/server.ckpt";
    return c;
  };
  const TrainConfig one = config("stack_ref", "lanes"), stack = config("stack", "stack");
  NetConfig wait = fast_net();
  wait.group_wait_ms = 40;
  run_cluster(one, fast_net(), 4);
  run_cluster(stack, wait, 4);
  const auto m1 = metrics(one.out_dir), m = metrics(stack.out_dir);
  ASSERT_EQ(m1.size(), 2u);
  ASSERT_EQ(m.size(), 2u);
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_EQ(m1[r]["samples"], m[r]["samples"]);
    for (const char* key : {"train_loss", "test_loss"})
      EXPECT_NEAR(m1[r][key].get<double>(), m[r][key].get<double>(), 1e-3 * std::fabs(m1[r][key].get<double>()))
          << key << " round " << r;
    for (const char* key : {"train_accuracy", "test_accuracy"})
      EXPECT_NEAR(m1[r][key].get<double>(), m[r][key].get<double>(), 0.01) << key << " round " << r;
    std::printf("stacked: mean group size %.2f over %d groups\n", m[r]["mean_group_size"].get<double>(),
                m[r]["server_groups"].get<int>());
    EXPECT_GT(m[r]["mean_group_size"].get<double>(), 1.5) << "round " << r;
  }
  const auto ta = checkpoint_tensors(one.out_dir + "/server.ckpt"), tb = checkpoint_tensors(stack.out_dir + "/server.ckpt");
  ASSERT_EQ(ta.size(), tb.size());
  double worst = 0;
  for (const auto& [name, values] : ta) {
    ASSERT_TRUE(tb.count(name)) << name;
    const double e = relative_error(tb.at(name), values);
    worst = std::max(worst, e);
    EXPECT_LT(e, 1e-4) << name;  // 6.2e-7 seen
  }
  std::printf("stacked: largest relative gap of a checkpoint tensor %.2e\n", worst);
  // The fixed plan scored by the cost model with the stacks' own profiles: a round time, and more
  // server memory than one at a time (each replica's server blocks twice).
  const auto s1 = summary(one.out_dir), s = summary(stack.out_dir);
  ASSERT_TRUE(s.contains("predicted_plan")) << s.dump();
  EXPECT_GT(s["predicted_round_seconds"].get<double>(), 0);
  EXPECT_GT(s["predicted_plan"]["server_memory_bytes"].get<double>(), s1["predicted_plan"]["server_memory_bytes"].get<double>());

  // auto: both profiled, one kept (and said in summary.json); where stacks cannot serve, lanes.
  TrainConfig automatic = config("stack_auto", "auto");
  automatic.split = automatic.micro_batches = -1;
  run_cluster(automatic, wait, 4);
  const auto sa = summary(automatic.out_dir);
  ASSERT_TRUE(sa.contains("server_batching")) << sa.dump();
  EXPECT_TRUE(sa["server_batching"] == "lanes" || sa["server_batching"] == "stack") << sa.dump();
  if (sa["server_batching"] == "stack") {
    EXPECT_EQ(sa["plan"]["split"][0], sa["plan"]["split"][3]);
  }
  std::printf("server batching auto chose %s\n", sa["server_batching"].get<std::string>().c_str());
  EXPECT_EQ(s["server_batching"], "stack");
  EXPECT_EQ(s1["server_batching"], "lanes");
  TrainConfig private_auto = config("stack_auto_private", "auto");
  private_auto.labels = "private";
  run_cluster(private_auto, fast_net(), 4);
  EXPECT_EQ(summary(private_auto.out_dir)["server_batching"], "lanes");

  TrainConfig bad = config("stack_bad", "stack");
  bad.server_model = "shared";
  EXPECT_NE(error_of(bad).find("--server-batching stack needs a replica per device"), std::string::npos) << error_of(bad);
  bad = config("stack_bad2", "stack");
  bad.labels = "private";
  EXPECT_NE(error_of(bad).find("--labels shared"), std::string::npos) << error_of(bad);
  bad = config("stack_bad3", "stack");
  bad.split = 1, bad.device_splits = {1, 2, 2, 2};
  EXPECT_NE(error_of(bad).find("one split point for every device"), std::string::npos) << error_of(bad);
  bad = config("stack_bad4", "pile");
  EXPECT_NE(error_of(bad).find("--server-batching must be lanes, stack or auto"), std::string::npos) << error_of(bad);
}

// A real device's first batch (VGG5 split 2, batch 25, 3 micro-batches), recorded for light devices.
std::string record_first_batch(const std::string& name) {
  const std::string rec = temp_dir(name) + "/first_batch.rec";
  TrainConfig c = small_config("pipar", name + "_record");
  c.devices = 1;
  c.limit_train = 100;
  std::thread device;
  run_server(c, fast_net(), nullptr, [&](const std::string& e) {
    device = std::thread([e, rec] {
      DeviceOptions o;
      o.connect = e, o.id = 0, o.timeout_s = 30, o.record = rec;
      EXPECT_EQ(run_device(o), 0);
    });
  });
  device.join();
  return rec;
}

// K light devices (threads here) replaying `rec` against a `pipar server` process of its own (a run
// as record_first_batch's, 25 samples per device); returns its exit code.
int light_devices_against_a_server_process(const std::string& rec, int k, const std::string& server_model,
                                                  const std::string& out) {
  const std::string endpoint = "ipc://" + out + "/server.sock";
  const pid_t server = test::spawn({"server", "--listen", endpoint, "--insecure", "--mode", "pipar", "--model", "vgg5",
                                    "--dataset", "synthetic", "--limit-train", std::to_string(25 * k), "--limit-test", "200",
                                    "--batch-size", "25", "--devices", std::to_string(k), "--split", "2", "--micro-batches",
                                    "3", "--epochs", "1", "--threads", "1", "--uplink-mbps", "0", "--downlink-mbps", "0",
                                    "--server-model", server_model == "stack" ? "per-device" : server_model,
                                    "--server-batching", server_model == "stack" ? "stack" : "lanes", "--out", out},
                                   out + "/log");
  // The devices connect once it listens (a device that finds no server retries; this one waits instead).
  for (int i = 0; i < 600 && !fs::exists(out + "/server.sock"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::vector<std::thread> devices;
  std::vector<int> codes(static_cast<size_t>(k), -1);
  for (int d = 0; d < k; ++d)
    devices.emplace_back([&, d] {
      DeviceOptions o;
      o.connect = endpoint, o.id = static_cast<uint32_t>(d), o.timeout_s = 30, o.reconnect_s = 30, o.replay = rec;
      codes[static_cast<size_t>(d)] = run_device(o);
    });
  const int code = test::wait_exit(server, 120);
  for (auto& t : devices) t.join();
  for (int d = 0; d < k; ++d) EXPECT_EQ(codes[static_cast<size_t>(d)], 0) << "device " << d;
  return code;
}

// The server's memory stays within its computed bound: from 1 light device to 64, the server process's
// peak resident memory (VmHWM, in its summary.json) grows by no more than the cost model's server memory (the first plan's, in
// summary.json) grows, with 10% of that growth for the allocator's slack. Per-device replicas, one
// shared server-side model, and per-device replicas stacked (each held twice: replica and stack slice).
// (bench/RESULTS.md: measured 469 against 479 MiB and 18 against 42 MiB.)
TEST(Distributed, ServerMemoryWithSixtyFourLightDevicesStaysWithinItsBound) {
  const std::string rec = record_first_batch("memory");
  ASSERT_TRUE(fs::exists(rec));
  for (const std::string model : {"per-device", "shared", "stack"}) {
    SCOPED_TRACE(model);
    double rss[2] = {0, 0}, computed[2] = {0, 0};
    const int ks[2] = {1, 64};
    for (int i = 0; i < 2; ++i) {
      const std::string out = temp_dir("memory_" + model + "_" + std::to_string(ks[i]));
      const int code = light_devices_against_a_server_process(rec, ks[i], model, out);
      std::ifstream log(out + "/log");
      ASSERT_EQ(code, 0) << std::string(std::istreambuf_iterator<char>(log), {});
      rss[i] = summary(out)["server_peak_rss_bytes"].get<double>();
      computed[i] = summary(out)["predicted_plan"]["server_memory_bytes"].get<double>();
      EXPECT_EQ(metrics(out).at(0)["devices_finished"], ks[i]);
    }
    const double grew = rss[1] - rss[0], bound = computed[1] - computed[0];
    std::printf("%s: peak RSS %.1f -> %.1f MiB (+%.1f), computed %.1f -> %.1f MiB (+%.1f)\n", model.c_str(), rss[0] / 1048576,
                rss[1] / 1048576, grew / 1048576, computed[0] / 1048576, computed[1] / 1048576, bound / 1048576);
    EXPECT_GT(bound, 0);
    EXPECT_LE(grew, 1.1 * bound);
  }
}

TEST(Distributed, SixtyFourLightDevicesFinishARound) {
  const std::string rec = record_first_batch("light");
  ASSERT_TRUE(fs::exists(rec));
  TrainConfig c = small_config("pipar", "light_64");
  c.devices = 64;
  c.limit_train = 1600;  // 25 samples per device: one batch of 3 micro-batches each
  c.server_model = "shared";
  std::vector<std::thread> devices;
  std::vector<int> codes(64, -1);
  run_server(c, fast_net(), nullptr, [&](const std::string& e) {
    for (uint32_t d = 0; d < 64; ++d)
      devices.emplace_back([&, d, e] {
        DeviceOptions o;
        o.connect = e, o.id = d, o.timeout_s = 30, o.reconnect_s = 0, o.replay = rec;
        codes[d] = run_device(o);
      });
  });
  for (auto& t : devices) t.join();
  for (size_t d = 0; d < 64; ++d) EXPECT_EQ(codes[d], 0) << d;
  const auto m = metrics(c.out_dir);
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0]["devices_finished"], 64);
  EXPECT_EQ(m[0]["samples"], 1600);
  EXPECT_EQ(m[0]["bad_messages"], 0);
  DeviceOptions bad;
  bad.connect = "tcp://127.0.0.1:1", bad.replay = c.out_dir + "/summary.json";  // not a recording
  EXPECT_EQ(run_device(bad), 1);
}

}  // namespace
}  // namespace pipar
