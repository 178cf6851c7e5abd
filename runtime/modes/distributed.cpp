// Server and device roles of the distributed modes, and the launcher that runs them on loopback.
#include "runtime/modes/distributed.h"

#include <malloc.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "kernels/parallel.h"
#include "kernels/rng.h"
#include "planner/replan.h"
#include "runtime/aggregation.h"
#include "runtime/checkpoint.h"
#include "runtime/lanes.h"
#include "runtime/replica_stack.h"
#include "runtime/privacy.h"
#include "runtime/split.h"
#include "runtime/trace.h"
#include "transport/link.h"

namespace pipar {

namespace tp = transport;
using json = nlohmann::json;
using ms = std::chrono::milliseconds;

namespace {

// --- configuration that travels in the plan ---------------------------------------------------------

bool is_split_mode(const std::string& mode) { return mode == "sl" || mode == "sfl" || mode == "pipar"; }

// Whether the device processes run on the server's machine and share its cores (pipar train's, or
// pipar server --shared-cores), for the planner.
bool devices_share_cores(const NetConfig& n) { return n.launched_device_threads > 0 && n.shared_cores != 0; }

// Whether the devices time their set-up profiles by their CPU time (NetConfig::device_profile_clock).
bool device_profiles_in_cpu_time(const NetConfig& n) {
  if (n.device_profile_clock == "cpu") return true;
  if (n.device_profile_clock == "wall") return false;
  if (n.device_profile_clock != "auto")
    throw Error("device profile clock '" + n.device_profile_clock + "': expected auto, wall or cpu");
  return devices_share_cores(n) && n.launched_device_threads == 1;
}

json config_to_json(const TrainConfig& c, const NetConfig& n) {
  return {{"mode", c.mode},
          {"model", c.model},
          {"dataset", c.dataset},
          {"data_dir", c.data_dir},
          {"norm", c.norm},
          {"epochs", c.epochs},
          {"batch_size", c.batch_size},
          {"lr", c.lr},
          {"lr_schedule", c.lr_schedule},
          {"momentum", c.momentum},
          {"weight_decay", c.weight_decay},
          {"seed", c.seed},
          {"limit_train", c.limit_train},
          {"devices", c.devices},
          {"split", c.split},
          {"micro_batches", c.micro_batches},
          {"partition", c.partition},
          {"dirichlet_alpha", c.dirichlet_alpha},
          {"augment", c.augment},
          {"dp_clip", c.dp_clip},  // differential privacy (runtime/privacy.h)
          {"dp_sigma", c.dp_sigma},
          {"dp_sgd", c.dp_sgd},
          {"dp_delta", c.dp_delta},
          {"labels", c.labels},
          {"server_model", c.server_model},
          {"server_lanes", c.server_lanes},
          {"server_batching", c.server_batching},
          {"latency_ms", n.latency_ms},
          // Devices measure their block times for the planner: it chooses the plan (--split or
          // --micro-batches auto) or scores the fixed one (predicted_round_seconds).
          {"profile", is_split_mode(c.mode)},
          {"profile_cpu_time", device_profiles_in_cpu_time(n)}};
}

TrainConfig config_from_json(const json& j) {
  TrainConfig c;
  c.mode = j.at("mode");
  c.model = j.at("model");
  c.dataset = j.at("dataset");
  c.data_dir = j.at("data_dir");
  c.norm = j.at("norm");
  c.epochs = j.at("epochs");
  c.batch_size = j.at("batch_size");
  c.lr = j.at("lr");
  c.lr_schedule = j.value("lr_schedule", "constant");
  c.momentum = j.at("momentum");
  c.weight_decay = j.at("weight_decay");
  c.seed = j.at("seed");
  c.limit_train = j.at("limit_train");
  c.devices = j.at("devices");
  c.split = j.at("split");
  c.micro_batches = j.at("micro_batches");
  c.partition = j.at("partition");
  c.dirichlet_alpha = j.at("dirichlet_alpha");
  c.augment = j.at("augment");
  c.dp_clip = j.value("dp_clip", 0.0f);  // differential privacy (runtime/privacy.h)
  c.dp_sigma = j.value("dp_sigma", 0.0f);
  c.dp_sgd = j.value("dp_sgd", false);
  c.dp_delta = j.value("dp_delta", 1e-5);
  c.labels = j.value("labels", "shared");  // absent: a server from before private labels
  c.server_model = j.value("server_model", "per-device");
  c.server_lanes = j.value("server_lanes", 0);
  c.server_batching = j.value("server_batching", "lanes");
  return c;
}

ModelOptions model_options(const TrainConfig& c, const data::Dataset& ds) {
  ModelOptions o;
  o.input = ds.sample_shape();
  o.num_classes = ds.num_classes;
  o.batch_norm = c.norm == "batch";
  o.seed = c.seed;
  return o;
}

std::vector<std::vector<int64_t>> make_partition(const TrainConfig& c, const data::Dataset& train) {
  if (c.partition == "iid") return data::partition_iid(train.size(), c.devices, hash64(c.seed, 77));
  if (c.partition == "dirichlet")
    return data::partition_dirichlet(train.labels, train.num_classes, c.devices, c.dirichlet_alpha, hash64(c.seed, 77));
  throw Error("--partition must be iid or dirichlet, got '" + c.partition + "'");
}

// Batches of a device's n samples: a final batch of one sample is dropped (batch-norm needs two).
int64_t batch_count(int64_t n, int64_t bs) { return n / bs + (n % bs >= 2 ? 1 : 0); }
int64_t batch_len(int64_t n, int64_t bs, int64_t b) { return std::min(bs, n - b * bs); }
// The learning rate of batch b of a partition of n samples in round `round` (one step per batch).
float batch_lr(const TrainConfig& c, int round, int64_t n, int64_t b) {
  const int64_t batches = batch_count(n, c.batch_size);
  return scheduled_lr(c, round * batches + b, c.epochs * batches);
}

bool private_labels(const TrainConfig& c) { return c.labels == "private"; }

// Block ranges [begin, end), in order, whose state a Weights message carries.
using BlockRanges = std::vector<std::pair<size_t, size_t>>;

// With private labels the device part is blocks [0, P) and the last block (the tail that computes the
// loss); the server part is the middle, [P, B-1).
BlockRanges part_ranges(tp::WeightsPart part, const Model& m, size_t split, bool private_labels) {
  const size_t b = m.num_blocks();
  switch (part) {
    case tp::WeightsPart::kDevice:
      if (private_labels) return {{0, split}, {b - 1, b}};
      return {{0, split}};
    case tp::WeightsPart::kServer: return {{split, private_labels ? b - 1 : b}};
    case tp::WeightsPart::kWhole: return {{0, b}};
  }
  return {};
}

std::vector<std::string> state_names(Model& m, const BlockRanges& ranges) {
  std::vector<std::string> names;
  for (const auto& [begin, end] : ranges) {
    for (Param* p : m.params(begin, end)) names.push_back(p->name);
    for (const Buffer& b : m.buffers(begin, end)) names.push_back(b.name);
  }
  return names;
}

std::vector<Tensor*> state_tensors(Model& m, const BlockRanges& ranges) {
  std::vector<Tensor*> out;
  for (const auto& [begin, end] : ranges)
    for (Tensor* t : state_tensors(m, begin, end)) out.push_back(t);
  return out;
}

std::vector<Tensor> copy_state(Model& m, const BlockRanges& ranges) {
  std::vector<Tensor> out;
  for (const auto& [begin, end] : ranges)
    for (Tensor& t : copy_state(m, begin, end)) out.push_back(std::move(t));
  return out;
}

// Loads state (as copy_state(m, ranges) returns it) into the ranges' blocks.
void load_state(Model& m, const std::vector<Tensor>& state, const BlockRanges& ranges) {
  size_t at = 0;
  for (const auto& [begin, end] : ranges) {
    const size_t n = state_tensors(m, begin, end).size();
    if (at + n > state.size()) throw Error(detail::concat("state of ", state.size(), " tensors for more blocks"));
    load_state(m, std::vector<Tensor>(state.begin() + static_cast<std::ptrdiff_t>(at), state.begin() + static_cast<std::ptrdiff_t>(at + n)),
               begin, end);
    at += n;
  }
  if (at != state.size()) throw Error(detail::concat("state of ", state.size(), " tensors for blocks holding ", at));
}

std::vector<tp::NamedTensor> named_state(Model& m, const BlockRanges& ranges) {
  const std::vector<std::string> names = state_names(m, ranges);
  std::vector<Tensor> state = copy_state(m, ranges);
  std::vector<tp::NamedTensor> out;
  for (size_t i = 0; i < state.size(); ++i) out.push_back({names[i], std::move(state[i])});
  return out;
}

// Unpacks a Weights message for the blocks `ranges` of m: names and shapes must match.
std::vector<Tensor> unpack_state(Model& m, const BlockRanges& ranges, const tp::Weights& w) {
  const std::vector<std::string> names = state_names(m, ranges);
  if (w.tensors.size() != names.size())
    throw Error(detail::concat("weights message holds ", w.tensors.size(), " tensors; expected ", names.size()));
  std::vector<Tensor> state;
  const std::vector<Tensor*> dst = state_tensors(m, ranges);
  for (size_t i = 0; i < names.size(); ++i) {
    if (w.tensors[i].name != names[i] || !(w.tensors[i].tensor.shape() == dst[i]->shape()))
      throw Error("weights message tensor " + w.tensors[i].name + " " + w.tensors[i].tensor.shape().str() +
                  " does not match " + names[i] + " " + dst[i]->shape().str());
    state.push_back(w.tensors[i].tensor);
  }
  return state;
}

// Differential privacy is on and accounted: activations are clipped and noised (split modes), the
// devices compose their releases, the server counts the rounds each began. Device and server decide it
// by this one rule, so that the counts the server hands out are the ones the devices expect.
bool dp_accounted(const TrainConfig& c) { return is_split_mode(c.mode) && c.dp_clip > 0 && c.dp_sigma > 0; }

// This process's peak resident memory since it started (VmHWM: unlike getrusage's ru_maxrss it does
// not carry the footprint of the process it was forked from); 0 where /proc does not say.
int64_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoll(line.c_str() + 6, nullptr, 10) * 1024;  // "VmHWM:  1234 kB"
  return 0;
}

double seconds_of(tp::Clock::time_point t) { return std::chrono::duration<double>(t.time_since_epoch()).count(); }

// --- recordings for light devices (DeviceOptions::record / replay) ---------------------------------

// A device's first batch as it sent it: split point, activations [n, c, h, w] (f32) and labels [n],
// and the device's planner profile (JSON; may be empty), which a light device reports as its own.
struct Recording {
  int32_t split = 0;
  Tensor x, y;
  std::string profile;
};

constexpr char kRecordingMagic[8] = {'P', 'I', 'P', 'A', 'R', 'R', 'C', '1'};

void write_recording(const std::string& path, int32_t split, const std::vector<Tensor>& xs, const std::vector<Tensor>& ys,
                     const std::string& profile) {
  if (xs.empty() || xs.size() != ys.size()) throw Error("write_recording: nothing to record");
  Shape4 s = xs[0].shape();
  int64_t n = 0;
  for (const Tensor& x : xs) n += x.shape().n;
  std::string bytes(kRecordingMagic, sizeof kRecordingMagic);
  auto put = [&](const void* p, size_t len) { bytes.append(static_cast<const char*>(p), len); };
  const int64_t dims[5] = {split, n, s.c, s.h, s.w};
  put(dims, sizeof dims);
  for (const Tensor& x : xs) put(x.data(), static_cast<size_t>(x.numel()) * sizeof(float));
  for (const Tensor& y : ys) put(y.idata(), static_cast<size_t>(y.numel()) * sizeof(int32_t));
  const int64_t len = static_cast<int64_t>(profile.size());
  put(&len, sizeof len);
  bytes += profile;
  write_file_atomically(path, bytes, "recording");
}

Recording read_recording(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw IoError("cannot read the recording " + path);
  const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  int64_t dims[5] = {0, 0, 0, 0, 0};
  if (bytes.size() < sizeof kRecordingMagic + sizeof dims || bytes.compare(0, sizeof kRecordingMagic, kRecordingMagic, sizeof kRecordingMagic) != 0)
    throw IoError(path + " is not a PiPar recording (pipar device --record)");
  std::memcpy(dims, bytes.data() + sizeof kRecordingMagic, sizeof dims);
  const auto [split, n, c, h, w] = std::tuple{dims[0], dims[1], dims[2], dims[3], dims[4]};
  const int64_t head = static_cast<int64_t>(sizeof kRecordingMagic + sizeof dims);
  int64_t profile_len = -1;
  const bool sane = split >= 1 && split <= 4096 && n >= 1 && n <= (1 << 20) && c >= 1 && h >= 1 && w >= 1 && c * h * w <= (int64_t{1} << 26);
  const int64_t at_profile = sane ? head + n * c * h * w * 4 + n * 4 : 0;
  if (sane && static_cast<int64_t>(bytes.size()) >= at_profile + 8) std::memcpy(&profile_len, bytes.data() + at_profile, 8);
  if (!sane || profile_len < 0 || static_cast<int64_t>(bytes.size()) != at_profile + 8 + profile_len)
    throw IoError(detail::concat(path, ": a recording of ", n, " x [", c, ", ", h, ", ", w, "] at split ", split, " does not fit its ",
                                 bytes.size(), " bytes"));
  Recording r;
  r.split = static_cast<int32_t>(split);
  r.x = Tensor::empty({n, c, h, w});
  r.y = Tensor::empty({n, 1, 1, 1}, Device::kCpu, DType::kI32);
  const char* at = bytes.data() + sizeof kRecordingMagic + sizeof dims;
  std::memcpy(r.x.data(), at, static_cast<size_t>(n * c * h * w) * sizeof(float));
  std::memcpy(r.y.idata(), at + n * c * h * w * 4, static_cast<size_t>(n) * sizeof(int32_t));
  r.profile = bytes.substr(static_cast<size_t>(at_profile + 8));
  return r;
}

// --- device ----------------------------------------------------------------------------------------

class DeviceRunner {
 public:
  explicit DeviceRunner(const DeviceOptions& o)
      : o_(o), recording_(o.replay.empty() ? std::nullopt : std::optional<Recording>(read_recording(o.replay))),
        link_(std::make_unique<tp::DeviceLink>(o.connect, o.id, link_options())) {}

  // Sessions with the server until it says training is finished. A server that goes away (silent for
  // timeout_s: killed, restarting, network down) is looked for again on a fresh link (messages queued
  // for the old server are dropped) after back-off waits, for up to reconnect_s; the device keeps its
  // data, model and optimizer state, and a restarted server (--resume) takes it into its next round.
  int run() {
    double gone_since = -1;
    for (int attempt = 0;; ++attempt) {
      try {
        return session([&] { gone_since = -1, attempt = 0; });
      } catch (const ServerGone& e) {
        const double now = now_seconds();
        if (gone_since < 0) gone_since = now - o_.timeout_s;
        const double waited = now - gone_since;
        if (waited + 1 > o_.reconnect_s)
          throw Error(detail::concat(e.what(), "; gave up after ", static_cast<int>(waited),
                                     " s (--reconnect; restart this device to rejoin)"));
        const double backoff = std::min({30.0, static_cast<double>(1 << std::min(attempt, 5)), o_.reconnect_s - waited});
        log(detail::concat(e.what(), "; reconnecting in ", backoff, " s"));
        if (device_part_) device_part_->reset();  // gradients for these micro-batches will never come
        if (dp_part_) dp_part_->reset();
        if (model_) Sgd::zero_grad(model_->params());  // nor will the step of the batch they began
        link_.reset();
        std::this_thread::sleep_for(std::chrono::duration<double>(backoff));  // back-off, not work
        link_ = std::make_unique<tp::DeviceLink>(o_.connect, o_.id, link_options());
      }
    }
  }

 private:
  // The server fell silent: worth reconnecting to (unlike an error it reported).
  struct ServerGone : Error {
    using Error::Error;
  };

  // One connection: hello, then the server's plans until the finished one (returns 0). on_message is
  // called whenever the server is heard from.
  int session(const std::function<void()>& heard) {
    tp::Hello hello;
    hello.device = o_.id;
    hello.capabilities = std::string("cpu,") + kernels::isa_name(kernels::cpu_isa());
    link_->send(hello);
    while (true) {
      tp::Message m = next();
      heard();
      if (auto* plan = std::get_if<tp::Plan>(&m)) {
        if (plan->finished) {
          // Goodbye: the server waits (a little) for every device's before its process exits, so that
          // no device's last message is lost in a socket that dies with it.
          tp::Heartbeat bye;
          bye.device = o_.id;
          bye.time_ns = tp::Heartbeat::kGoodbye;
          link_->send(bye);
          link_->flush(ms(5000));
          return 0;
        }
        if (plan->round < 0) {
          // Set-up before the first round (data, model), so that no round's time includes it; the
          // device answers with a hello that carries its partition size.
          if (!model_ && replay_samples_ == 0) setup(*plan);
          // The link as the first round will have it, from now on: the server probes it before planning.
          shape_link(*plan);
          tp::Hello ready;
          ready.device = o_.id;
          ready.capabilities = hello.capabilities;
          ready.data_size = recording_ ? replay_samples_ : static_cast<int64_t>(part_.size());
          ready.profile = recording_ ? recording_->profile : profile_;
          link_->send(ready);
          continue;
        }
        round(*plan);
      } else if (auto* err = std::get_if<tp::ErrorReply>(&m)) {
        throw Error("server error: " + err->text);
      } else {
        log(std::string("ignoring unexpected ") + tp::message_type_name(tp::message_type(m)));
      }
    }
  }

  tp::LinkOptions link_options() {
    tp::LinkOptions lo;
    lo.heartbeat_interval = ms(1000);
    lo.log = [this](const std::string& s) { log(s); };
    lo.security = o_.security;
    return lo;
  }
  void log(const std::string& s) const { std::fprintf(stderr, "device %u: %s\n", o_.id, s.c_str()); }

  void deadline_from_now(std::chrono::steady_clock::time_point& deadline) const {
    deadline = std::chrono::steady_clock::now() +
               std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(o_.timeout_s));
  }

  tp::Message next() {
    std::chrono::steady_clock::time_point deadline;
    deadline_from_now(deadline);
    while (std::chrono::steady_clock::now() < deadline) {
      auto r = link_->recv(ms(200));
      if (!r) continue;
      if (!r->ok()) {
        log("dropping a malformed message from the server: " + r->error());
        continue;
      }
      if (std::holds_alternative<tp::Heartbeat>(r->value())) {
        deadline_from_now(deadline);  // the server is alive (its heartbeats come every 2 s)
        continue;
      }
      if (const auto* probe = std::get_if<tp::Probe>(&r->value())) {
        answer_probe(*probe);
        deadline_from_now(deadline);
        continue;
      }
      return std::move(r->value());
    }
    throw ServerGone(detail::concat("no message from the server for ", o_.timeout_s, " s"));
  }

  // The server times its link to this device: the same seq back at once, with the bytes it asks for
  // (zeros, never this process's memory; at most 16 MiB).
  void answer_probe(const tp::Probe& p) {
    constexpr int64_t kMaxReplyBytes = int64_t{16} << 20;
    tp::Probe a;
    a.device = o_.id;
    a.seq = p.seq;
    const int64_t floats = std::min(p.reply_bytes, kMaxReplyBytes) / 4;
    if (floats > 0) a.payload = Tensor::zeros({floats, 1, 1, 1});
    link_->send(a);
  }

  void setup(const tp::Plan& plan) {
    cfg_ = config_from_json(json::parse(plan.config));
    if (!o_.replay.empty()) return setup_replay(plan);
    if (!o_.data_dir.empty()) cfg_.data_dir = o_.data_dir;
    kernels::set_num_threads(o_.threads);
    train_ = data::load_dataset(cfg_.dataset, cfg_.data_dir, true, cfg_.seed, cfg_.limit_train);
    const auto parts = make_partition(cfg_, train_);
    if (o_.id >= parts.size()) throw Error(detail::concat("device id ", o_.id, " but the run has ", parts.size(), " devices"));
    part_ = parts[o_.id];
    model_ = build_model(cfg_.model, model_options(cfg_, train_));
    kernels::SgdParams sp;
    sp.lr = cfg_.lr, sp.momentum = cfg_.momentum, sp.weight_decay = cfg_.weight_decay;
    sgd_ = sp;
    if (!is_split_mode(cfg_.mode)) local_opt_ = std::make_unique<Sgd>(sp);
    const Shape4 ss = train_.sample_shape();
    images_ = Tensor::empty({cfg_.batch_size, ss.c, ss.h, ss.w});
    labels_ = Tensor::empty({cfg_.batch_size, 1, 1, 1}, Device::kCpu, DType::kI32);
    // The planner needs this device's measured block times (to choose the plan, or to predict the
    // round time of a fixed one).
    const json config = json::parse(plan.config);
    if (config.value("profile", false)) {
      planner::ProfileOptions po;
      po.threads = o_.threads;
      po.sizes = {1, 4, 16, std::max<int64_t>(16, cfg_.batch_size)};
      // Devices that share their cores with each other profile all at once: on one thread, their CPU
      // time is their speed alone, whatever the OS's sharing did to the wall clock meanwhile.
      if (config.value("profile_cpu_time", false) && o_.threads == 1) po.cpu_time_cores = 1;
      // A model of its own, as the server's: profiling takes SGD steps whose momentum (and batch-norm
      // statistics) would otherwise carry into training. The round's weights overwrite the values, not
      // the momentum: with private labels the tail's first steps went 0.5% off the shared run's.
      auto own = build_model(cfg_.model, model_->options());
      std::string note;
      const planner::Profile p = planner::profile_this_process(*own, po, &note);
      if (!note.empty()) log(note);
      else if (p.cpu_time) log("profiling CPU time on 1 thread (devices that share cores profile at once)");
      profile_ = p.to_json();
    }
  }

  void round(const tp::Plan& plan) {
    if (!model_ && replay_samples_ == 0) setup(plan);
    if (recording_) return replay_round(plan);
    split_ = static_cast<size_t>(plan.split_point);
    // A new split point (first round, or a re-plan) moves blocks between device and server: a new
    // device part for the new range (momentum stays with the weights, in the model's Params).
    if (is_split_mode(cfg_.mode) && (!device_part_ || device_part_split_ != split_)) {
      if (private_labels(cfg_)) check_private_split(*model_, split_);
      device_part_ = std::make_unique<DevicePart>(*model_, split_, sgd_);
      device_part_split_ = split_;
      // Private labels: the last block and the loss run here, with the same loss scaling as the server's.
      if (private_labels(cfg_)) tail_part_ = std::make_unique<ServerPart>(*model_, model_->num_blocks() - 1, sgd_);
      if (cfg_.dp_sgd)  // differential privacy: DP-SGD replaces the plain device part's backward and step
        dp_part_ = std::make_unique<DpSgdPart>(*model_, split_, sgd_, cfg_.dp_clip, cfg_.dp_sigma, hash64(dp_secret_, ++dp_parts_));
    }
    keep_or_restore_optimizer_state(plan.round);
    // Differential privacy, before anything of this round leaves the device: this round's releases go
    // into the accountant, after any the server counted that this process has not (a device restarted
    // since: its earlier processes released them). The server's count can only raise this device's own.
    // A round begun counts in full even if it breaks off; one that is run again counts again.
    if (dp_accounting()) {
      int64_t before = dp_rounds_;
      const json config = json::parse(plan.config);
      if (auto it = config.find("privacy_rounds"); it != config.end() && it->is_array() && o_.id < it->size())
        before = std::max(before, (*it)[o_.id].get<int64_t>());
      if (before - dp_rounds_ > kMaxReplayedRounds)
        throw Error(detail::concat("the server counts ", before, " rounds of this device's data released; not believable"));
      while (dp_rounds_ < before) account_round();
      account_round();
    }
    shape_link(plan);
    // The round's starting weights.
    tp::Message m = next();
    auto* w = std::get_if<tp::Weights>(&m);
    if (!w) throw Error("expected the round's weights after the plan");
    const BlockRanges in = part_ranges(w->part, *model_, split_, private_labels(cfg_));
    load_state(*model_, unpack_state(*model_, in, *w), in);

    events_.clear();
    link_->take_transfers();
    LossStats stats;
    const double t0 = now_seconds();
    if (is_split_mode(cfg_.mode)) split_round(plan, stats);
    else local_round(plan, stats);
    const double t1 = now_seconds();

    tp::Weights out;
    out.round = plan.round;
    out.device = o_.id;
    out.part = is_split_mode(cfg_.mode) ? tp::WeightsPart::kDevice : tp::WeightsPart::kWhole;
    out.samples = static_cast<int64_t>(part_.size());
    out.tensors = named_state(*model_, part_ranges(out.part, *model_, split_, private_labels(cfg_)));
    link_->send(out);
    link_->flush(ms(600000));
    for (const auto& t : link_->take_transfers())
      if (t.ok && t.type != tp::MessageType::kHeartbeat)
        events_.push_back({"device " + std::to_string(o_.id) + " uplink", tp::message_type_name(t.type),
                           seconds_of(t.started), seconds_of(t.finished)});
    tp::RoundEnd end;
    end.round = plan.round;
    end.device = o_.id;
    end.samples = stats.count;
    end.loss_sum = stats.loss_sum;
    end.correct = stats.correct;
    end.stats["round_seconds"] = t1 - t0;
    if (dp_accounting()) end.stats["epsilon"] = privacy_.epsilon(cfg_.dp_delta);  // differential privacy
    end.details = events_to_json(events_);
    link_->send(end);
  }

  // The optimizer state a device carries from round to round (the momentum of the weights it trains:
  // the device part, or the whole model in fl) never leaves the device. It is kept as it was at the
  // start of the latest round, so a round that the server runs again after a crash (it resumed from
  // its last checkpoint, older than this device's progress: killed in the middle of the round, or after
  // the round's results arrived but before it saved them) starts from the state it started from the
  // first time, and the resumed run goes on as if never interrupted. A restarted device has no such
  // state: its momentum starts from zero, as a new device's.
  void keep_or_restore_optimizer_state(int round) {
    const auto params = model_->params();
    if (round == snapshot_round_ && snapshot_.size() == params.size()) {
      for (size_t i = 0; i < params.size(); ++i) params[i]->momentum = snapshot_[i].clone();
      log(detail::concat("round ", round + 1, " again (the server resumed from its checkpoint): optimizer state as at its start"));
      return;
    }
    snapshot_.clear();
    for (Param* p : params) snapshot_.push_back(p->momentum.clone());
    snapshot_round_ = round;
  }

  bool dp_accounting() const { return dp_accounted(cfg_); }

  // One round's releases of this device's data (differential privacy). Every sample's clipped
  // activation leaves once with noise sd sigma*C; a sample replaced moves its row by up to 2C, so noise
  // multiplier sigma/2, no subsampling. DP-SGD: one sampled Gaussian step per batch at rate
  // batch/partition (the add/remove analysis of Abadi et al.; batches are shuffled, not Poisson-sampled,
  // as TF-Privacy also assumes).
  void account_round() {
    const int64_t n = static_cast<int64_t>(part_.size()), bs = cfg_.batch_size;
    privacy_.step(1.0, cfg_.dp_sigma / 2.0, 1);
    if (cfg_.dp_sgd) privacy_.step(std::min(1.0, static_cast<double>(bs) / static_cast<double>(n)), cfg_.dp_sigma, batch_count(n, bs));
    ++dp_rounds_;
  }

  // This device's uplink as the plan sets it (rate for its round, the run's latency).
  void shape_link(const tp::Plan& plan) {
    for (const auto& d : plan.devices)
      if (d.device == o_.id) link_->set_shape({d.uplink_mbps, json::parse(plan.config).value("latency_ms", 0.0)});
  }

  std::pair<Tensor, Tensor> rows(int64_t begin, int64_t n) {
    const Shape4 s = images_.shape();
    Tensor x = Tensor::empty({n, s.c, s.h, s.w});
    std::copy(images_.data() + begin * s.per_sample(), images_.data() + (begin + n) * s.per_sample(), x.data());
    Tensor y = Tensor::empty({n, 1, 1, 1}, Device::kCpu, DType::kI32);
    std::copy(labels_.idata() + begin, labels_.idata() + begin + n, y.idata());
    return {x, y};
  }

  void trace(const std::string& name, double b, double e) {
    events_.push_back({"device " + std::to_string(o_.id), name, b, e});
  }

  void split_round(const tp::Plan& plan, LossStats& stats) {
    const int64_t n = static_cast<int64_t>(part_.size()), bs = cfg_.batch_size;
    const auto order = data::shuffled_indices(part_, hash64(cfg_.seed, 1000 + plan.round * 1000 + o_.id));
    const bool aug = cfg_.augment && train_.name.find("cifar") != std::string::npos;
    data::Augment augment;
    augment.random_crop = augment.hflip = true;
    for (int64_t b = 0; b < batch_count(n, bs); ++b) {
      const int64_t len = batch_len(n, bs, b);
      data::gather_batch(train_, order, b * bs, len, images_, labels_, aug ? &augment : nullptr, hash64(cfg_.seed, plan.round));
      const std::vector<int64_t> sizes = micro_batch_sizes(len, plan.micro_batches);
      std::vector<std::vector<float>> clip_scales(sizes.size());  // differential privacy: per-sample clip factors
      std::vector<Tensor> kept_labels(sizes.size());  // private labels: for the tail's loss
      std::vector<Tensor> sent_x, sent_y;             // --record: the first batch as sent
      std::vector<char> tail_done(sizes.size(), 0);
      int64_t off = 0;
      for (size_t m = 0; m < sizes.size(); ++m) {
        auto [x, y] = rows(off, sizes[m]);
        off += sizes[m];
        const double t0 = now_seconds();
        tp::Activation a;
        a.data = dp_part_ ? dp_part_->forward(static_cast<int>(m), x) : device_part_->forward(static_cast<int>(m), x);
        if (cfg_.dp_clip > 0) {  // differential privacy: clip and noise a copy (the tape may hold the output)
          a.data = a.data.clone();
          clip_scales[m] = clip_and_noise(a.data, cfg_.dp_clip, cfg_.dp_sigma,
                                          hash64(hash64(dp_secret_, static_cast<uint64_t>(dp_rounds_)), (static_cast<uint64_t>(b) << 20) | m));
        }
        trace("forward", t0, now_seconds());
        a.round = plan.round, a.batch = static_cast<int32_t>(b), a.micro_batch = static_cast<int32_t>(m);
        a.device = o_.id, a.samples = static_cast<int32_t>(sizes[m]);
        if (private_labels(cfg_)) kept_labels[m] = y;
        else a.labels = y;
        if (!o_.record.empty() && !recorded_) sent_x.push_back(a.data.clone()), sent_y.push_back(y.clone());
        link_->send(a);  // asynchronous: the next forward overlaps this upload
      }
      if (!sent_x.empty()) {
        write_recording(o_.record, static_cast<int32_t>(split_), sent_x, sent_y, profile_);
        recorded_ = true;
        log("recorded its first batch in " + o_.record);
      }
      // Private labels: the server's middle outputs (Activations) and the cut gradients come in any
      // order; each middle output goes through the tail and the loss here, its gradient back up.
      for (size_t got = 0; got < sizes.size();) {
        tp::Message msg = next();
        if (auto* mid = std::get_if<tp::Activation>(&msg); mid && private_labels(cfg_)) {
          tail_micro(plan, b, len, sizes, *mid, kept_labels, tail_done, stats);
          continue;
        }
        tp::Gradient* g = batch_gradient(msg, plan, b, sizes.size());
        if (!g) continue;
        const double t0 = now_seconds();
        if (cfg_.dp_clip > 0) clip_backward(g->data, clip_scales[static_cast<size_t>(g->micro_batch)]);  // differential privacy
        if (dp_part_) dp_part_->backward(g->micro_batch, g->data, len);
        else device_part_->backward(g->micro_batch, g->data);
        trace("backward", t0, now_seconds());
        ++got;
      }
      const double t0 = now_seconds();
      const float lr = batch_lr(cfg_, plan.round, n, b);
      if (dp_part_) dp_part_->set_lr(lr), dp_part_->step(len);
      else device_part_->set_lr(lr), device_part_->step();
      if (tail_part_) tail_part_->set_lr(lr), tail_part_->step();
      trace("step", t0, now_seconds());
      stats.count += len;
    }
  }

  // A message during batch b: the gradient of one of its `micros` micro-batches, or nullptr for a
  // message to ignore (logged); an error reply, or a gradient of another round, batch or micro-batch,
  // throws.
  tp::Gradient* batch_gradient(tp::Message& msg, const tp::Plan& plan, int64_t b, size_t micros) const {
    auto* g = std::get_if<tp::Gradient>(&msg);
    if (!g) {
      if (auto* e = std::get_if<tp::ErrorReply>(&msg)) throw Error("server error: " + e->text);
      log(std::string("ignoring unexpected ") + tp::message_type_name(tp::message_type(msg)) + " during a batch");
      return nullptr;
    }
    if (g->round != plan.round || g->batch != b || g->micro_batch < 0 || g->micro_batch >= static_cast<int>(micros))
      throw Error(detail::concat("gradient for round ", g->round, " batch ", g->batch, " micro-batch ", g->micro_batch,
                                 " while in round ", plan.round, " batch ", b));
    return g;
  }

  // Private labels: micro-batch `mid.micro_batch`'s middle output from the server through the tail
  // (last block) and the loss, scaled by 1/len as the server's would be; its gradient goes back up.
  void tail_micro(const tp::Plan& plan, int64_t b, int64_t len, const std::vector<int64_t>& sizes, const tp::Activation& mid,
                  const std::vector<Tensor>& labels, std::vector<char>& done, LossStats& stats) {
    const Shape4 want = model_->block_out_shape(model_->num_blocks() - 2);
    const Shape4 xs = mid.data.shape();
    if (mid.round != plan.round || mid.batch != b || mid.micro_batch < 0 || mid.micro_batch >= static_cast<int>(sizes.size()))
      throw Error(detail::concat("middle output for round ", mid.round, " batch ", mid.batch, " micro-batch ", mid.micro_batch,
                                 " while in round ", plan.round, " batch ", b));
    const size_t m = static_cast<size_t>(mid.micro_batch);
    if (done[m]) throw Error(detail::concat("middle output of micro-batch ", m, " of batch ", b, " came twice"));
    if (xs.n != sizes[m] || xs.c != want.c || xs.h != want.h || xs.w != want.w || mid.data.dtype() != DType::kF32)
      throw Error(detail::concat("middle output ", xs.str(), " of micro-batch ", m, " does not fit ", sizes[m], " samples of ", want.str()));
    const double t0 = now_seconds();
    ServerPart::Result r = tail_part_->train_micro(mid.data, labels[m], len);
    stats.loss_sum += r.stats.loss_sum;  // samples are counted per batch
    stats.correct += r.stats.correct;
    done[m] = 1;
    tp::Gradient g;
    g.round = plan.round, g.batch = static_cast<int32_t>(b), g.micro_batch = mid.micro_batch;
    g.device = o_.id, g.samples = static_cast<int32_t>(xs.n);
    g.data = r.grad;
    trace("tail", t0, now_seconds());
    link_->send(g);
  }

  // --- a light device (--replay) ------------------------------------------------------------------

  void setup_replay(const tp::Plan& plan) {
    if (!is_split_mode(cfg_.mode) || private_labels(cfg_))
      throw Error("--replay: a light device takes part in sl, sfl or pipar runs with shared labels, not --mode " + cfg_.mode +
                  (private_labels(cfg_) ? " --labels private" : ""));
    const Recording& r = *recording_;
    const auto it = std::find_if(plan.devices.begin(), plan.devices.end(), [&](const tp::DevicePlan& d) { return d.device == o_.id; });
    if (it == plan.devices.end() || it->samples < 1) throw Error(detail::concat("--replay: the plan holds no partition for device ", o_.id));
    replay_samples_ = it->samples;
    log(detail::concat("replaying ", r.x.shape().n, " recorded samples (split ", r.split, ") for a partition of ", replay_samples_));
  }

  // One round as a device would run it, with the recording's rows (in turn) as every micro-batch's
  // activations and labels, and the round's weights handed back untouched.
  void replay_round(const tp::Plan& plan) {
    const Recording& rec = *recording_;
    if (plan.split_point != rec.split)
      throw Error(detail::concat("--replay: the recording was made at split ", rec.split, " but the plan splits at ", plan.split_point,
                                 " (record at that split, or give the server --split ", rec.split, ")"));
    shape_link(plan);
    tp::Message m = next();
    auto* w = std::get_if<tp::Weights>(&m);
    if (!w) throw Error("expected the round's weights after the plan");
    tp::Weights out = std::move(*w);
    const Shape4 s = rec.x.shape();
    const int64_t n = replay_samples_, bs = cfg_.batch_size;
    int64_t count = 0;
    for (int64_t b = 0; b < batch_count(n, bs); ++b) {
      const int64_t len = batch_len(n, bs, b);
      const std::vector<int64_t> sizes = micro_batch_sizes(len, plan.micro_batches);
      for (size_t mi = 0; mi < sizes.size(); ++mi) {
        tp::Activation a;
        a.round = plan.round, a.batch = static_cast<int32_t>(b), a.micro_batch = static_cast<int32_t>(mi);
        a.device = o_.id, a.samples = static_cast<int32_t>(sizes[mi]);
        a.data = Tensor::empty({sizes[mi], s.c, s.h, s.w});
        a.labels = Tensor::empty({sizes[mi], 1, 1, 1}, Device::kCpu, DType::kI32);
        for (int64_t i = 0; i < sizes[mi]; ++i, replay_row_ = (replay_row_ + 1) % s.n) {
          const float* row = rec.x.data() + replay_row_ * s.per_sample();
          std::copy(row, row + s.per_sample(), a.data.data() + i * s.per_sample());
          a.labels.idata()[i] = rec.y.idata()[replay_row_];
        }
        link_->send(a);
      }
      for (size_t got = 0; got < sizes.size();) {
        tp::Message msg = next();
        const tp::Gradient* g = batch_gradient(msg, plan, b, sizes.size());
        if (!g) continue;
        if (g->data.shape().n != sizes[static_cast<size_t>(g->micro_batch)])
          throw Error(detail::concat("gradient ", g->data.shape().str(), " for micro-batch ", g->micro_batch, " of ",
                                     sizes[static_cast<size_t>(g->micro_batch)], " samples"));
        ++got;
      }
      count += len;
    }
    out.round = plan.round;
    out.device = o_.id;
    out.samples = n;
    link_->send(out);
    link_->flush(ms(600000));
    tp::RoundEnd end;
    end.round = plan.round;
    end.device = o_.id;
    end.samples = count;
    end.details = events_to_json({});
    link_->send(end);
  }

  void local_round(const tp::Plan& plan, LossStats& stats) {
    const int64_t n = static_cast<int64_t>(part_.size()), bs = cfg_.batch_size;
    const auto order = data::shuffled_indices(part_, hash64(cfg_.seed, 1000 + plan.round * 1000 + o_.id));
    const auto params = model_->params();
    Context ctx;
    ctx.seed = hash64(cfg_.seed, plan.round);
    Tensor dlogits;
    for (int64_t b = 0; b < batch_count(n, bs); ++b) {
      const int64_t len = batch_len(n, bs, b);
      data::gather_batch(train_, order, b * bs, len, images_, labels_);
      auto [x, y] = rows(0, len);
      const double t0 = now_seconds();
      Sgd::zero_grad(params);
      Tape tape;
      Tensor logits = model_->forward(x, &tape, ctx);
      stats += softmax_cross_entropy(logits, y, 1.0f / static_cast<float>(len), &dlogits);
      Context bctx = ctx;
      bctx.input_grad = false;
      model_->backward(dlogits, tape, bctx);
      local_opt_->params().lr = batch_lr(cfg_, plan.round, n, b);
      local_opt_->step(params);
      trace("train", t0, now_seconds());
    }
  }

  DeviceOptions o_;
  std::optional<Recording> recording_;  // --replay: what it sends (read before connecting)
  std::unique_ptr<tp::DeviceLink> link_;
  TrainConfig cfg_;
  data::Dataset train_;
  std::vector<int64_t> part_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<DevicePart> device_part_;
  std::unique_ptr<ServerPart> tail_part_;  // private labels: the last block and the loss
  // Differential privacy: the DP-SGD device part, the accountant, and the noise's secret seed (drawn on
  // the device: the server knows the config's seed and could regenerate, and subtract, seeded noise).
  // The activation noise of a round is seeded by dp_rounds_ (rounds accounted so far, which only grows)
  // and DP-SGD's by the count of parts built, so no noise is ever reused, not even by a round run again.
  std::unique_ptr<DpSgdPart> dp_part_;
  RdpAccountant privacy_;
  int64_t dp_rounds_ = 0;  // rounds of this device's data released, in the accountant
  static constexpr int64_t kMaxReplayedRounds = 1000000;
  uint64_t dp_parts_ = 0;
  uint64_t dp_secret_ = (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  // The optimizer state at the start of round snapshot_round_ (keep_or_restore_optimizer_state).
  std::vector<Tensor> snapshot_;
  int snapshot_round_ = -1;
  size_t device_part_split_ = 0;
  std::string profile_;
  bool recorded_ = false;                 // --record: written
  int64_t replay_samples_ = 0, replay_row_ = 0;
  std::unique_ptr<Sgd> local_opt_;
  kernels::SgdParams sgd_;
  size_t split_ = 0;
  Tensor images_, labels_;
  std::vector<TraceEvent> events_;
};

// --- server ----------------------------------------------------------------------------------------

struct DeviceSlot {
  uint32_t id = 0;
  bool connected = false;     // said hello (and not dropped since)
  bool in_round = false;      // takes part in the current round
  bool done = false;          // its weights and round end arrived
  int64_t samples = 0;        // partition size
  // Its split point P: it runs blocks [0, P) (and with private labels the last), the server the rest.
  // Per device in sfl and pipar (heterogeneous devices split where suits each); one for all in sl; fl:
  // the block count, the whole model.
  size_t split = 0;
  size_t part_split = 0;      // the split its replica's server part was built for (0: not built)
  std::unique_ptr<Model> replica;  // server part (sfl, pipar)
  std::unique_ptr<ServerPart> server_part;
  std::unique_ptr<MiddlePart> middle_part;  // private labels: the middle blocks, in place of server_part
  // --server-batching stack: the stack that trains its replica during a round (replica index
  // stack_slot), in place of server_part; `replica` holds its state between rounds.
  ReplicaStack* stack = nullptr;
  int stack_slot = -1;
  std::map<int64_t, std::vector<char>> micro_done;  // batch → each micro-batch's MicroState
  int rejected = 0;           // its messages rejected this round
  std::optional<tp::Weights> weights;
  std::optional<tp::RoundEnd> end;
  LossStats stats;            // server-side loss of its micro-batches
  double last_seen = 0;
  std::string profile;        // the device's measured profile (planner), JSON
  uint64_t bytes_up0 = 0;     // bytes received from it before the round
  double transfer_allowance_s = 0;  // extra silence allowed while its weights cross its links
  std::optional<planner::LinkSpec> probed;  // its link as the probe before the first round measured it
};

// A micro-batch's progress through the server. Shared labels: kNone → kQueued → kServed (forward, loss
// and backward at once). Private labels: kNone → kQueued → kForwarded (middle output sent) → kQueued →
// kServed (its gradient back-propagated). kQueued: admitted, waiting for its group (cross-device
// batching).
enum MicroState : char { kNone = 0, kForwarded = 1, kServed = 2, kQueued = 3 };

// A server step admitted, waiting for the group it will run in: a micro-batch's forward, loss and
// backward (shared labels), or with private labels its middle forward or middle backward.
struct Pending {
  enum Kind : char { kTrain, kMiddleForward, kMiddleBackward };
  DeviceSlot* slot = nullptr;
  int32_t batch = 0, micro = 0;
  int64_t batch_len = 0;
  Tensor activation, labels;  // kMiddleBackward: activation holds the middle output's gradient
  Kind kind = kTrain;
};

// Key of a middle part's forward: batch and micro-batch.
int64_t middle_key(int32_t batch, int32_t micro) { return (static_cast<int64_t>(batch) << 32) | static_cast<uint32_t>(micro); }

class ServerRunner {
 public:
  ServerRunner(const TrainConfig& cfg, const NetConfig& net, ProgressSink* progress)
      : cfg_(cfg), net_(net), progress_(progress), server_(net.listen, link_options()) {}

  // The replicas (and their parts' streams) go on their own GPUs.
  ~ServerRunner() {
    for (DeviceSlot& s : slots_) {
      try {
        kernels::ScopedCudaDevice on_gpu(gpu_of(s));
        s.server_part.reset();
        s.middle_part.reset();
        s.replica.reset();
      } catch (const std::exception&) {  // a GPU gone: freed wherever the driver lets it be
      }
    }
  }

  const std::string& endpoint() const { return server_.bound_endpoint(); }

  TrainResult run() {
    const double wall0 = now_seconds();
    validate();
    train_ = data::load_dataset(cfg_.dataset, cfg_.data_dir, true, cfg_.seed, cfg_.limit_train);
    test_ = data::load_dataset(cfg_.dataset, cfg_.data_dir, false, cfg_.seed, cfg_.limit_test);
    const auto parts = make_partition(cfg_, train_);
    model_ = build_model(cfg_.model, model_options(cfg_, train_));
    if (!cfg_.load_path.empty()) load();
    auto_plan_ = split_mode() && (cfg_.split < 0 || cfg_.micro_batches < 0);
    slots_.resize(static_cast<size_t>(cfg_.devices));
    for (size_t d = 0; d < slots_.size(); ++d) {
      slots_[d].id = static_cast<uint32_t>(d);
      slots_[d].samples = static_cast<int64_t>(parts[d].size());
      const int given = cfg_.device_splits.empty() ? cfg_.split : cfg_.device_splits[d];
      slots_[d].split = split_mode() ? static_cast<size_t>(std::max(1, given)) : model_->num_blocks();
      if (split_mode() && given >= 0) check_split(*model_, slots_[d].split);
      if (private_labels() && given > 0) check_private_split(*model_, slots_[d].split);
    }
    if (dp_accounting()) {
      privacy_rounds_.assign(slots_.size(), 0);
      try {
        const json counts = resume_.value("privacy_rounds", json::array());
        for (size_t d = 0; d < slots_.size() && d < counts.size(); ++d) privacy_rounds_[d] = counts.at(d).get<int64_t>();
      } catch (const json::exception& e) {
        throw IoError("checkpoint " + cfg_.load_path + ": bad privacy_rounds: " + e.what());
      }
      if (resumed_) read_privacy_journal();
    }
    if (resumed_ && split_mode() && !auto_plan_ &&
        (resume_.value("split", json(0)) != split_json() || resume_.value("micro_batches", json(0)) != json(cfg_.micro_batches)))
      say(detail::concat("the checkpoint's plan was split ", resume_.value("split", json(0)).dump(), ", ",
                         resume_.value("micro_batches", json(0)).dump(), " micro-batches; the one given applies"));
    result_.out_dir = prepare_out_dir(cfg_.out_dir);
    // A resumed run adds its rounds to those already recorded.
    if (first_round_ > 0) keep_earlier_rounds();
    metrics_.open(result_.out_dir + "/metrics.jsonl", first_round_ > 0 ? std::ios::app : std::ios::trunc);
    if (!metrics_) throw IoError("cannot write " + result_.out_dir + "/metrics.jsonl");
    say(detail::concat(cfg_.mode, " training: ", model_->name(), " (", model_->num_blocks(), " blocks",
                       !split_mode() ? std::string() : auto_plan_ ? std::string(", split chosen by the planner")
                                                                  : ", split after block " + split_json().dump(),
                       cfg_.mode == "pipar" && cfg_.micro_batches > 0 ? detail::concat(", ", cfg_.micro_batches, " micro-batches")
                                                                       : std::string(),
                       ") on ", train_.name, ", ", cfg_.devices, " devices, uplink ", net_.uplink_mbps, " Mbit/s, downlink ",
                       net_.downlink_mbps, " Mbit/s, server at ", endpoint()));
    wait_for_devices();
    prepare_devices();
    if (split_mode()) plan_first();
    if (split_mode()) build_replicas();
    restore_replicas();
    origin_ = now_seconds();
    for (int r = first_round_; r < cfg_.epochs && !stop_requested().load(); ++r) run_round(r);
    finish();
    result_.wall_seconds = now_seconds() - wall0;
    write_summary();
    return result_;
  }

 private:
  bool split_mode() const { return is_split_mode(cfg_.mode); }
  bool private_labels() const { return pipar::private_labels(cfg_); }
  // A device's part's blocks (private labels: with the last block). (fl: its split is the block
  // count, the whole model.)
  BlockRanges device_ranges(const DeviceSlot& s) const {
    return part_ranges(tp::WeightsPart::kDevice, *model_, s.split, private_labels());
  }
  // The devices' split points as metrics.jsonl, summary.json and the checkpoint record them: one
  // number when every device splits at the same block, else one per device.
  json split_json() const {
    if (!split_mode()) return 0;
    json all = json::array();
    for (const DeviceSlot& s : slots_) all.push_back(s.split);
    return std::all_of(all.begin(), all.end(), [&](const json& p) { return p == all.front(); }) ? all.front() : all;
  }
  size_t server_end() const { return private_labels() ? model_->num_blocks() - 1 : model_->num_blocks(); }
  // The slot whose server part serves s: its own, or in sl the one server part the devices use in turn.
  DeviceSlot& owner_of(DeviceSlot& s) { return shared_server() ? slots_[0] : s; }
  // One server part for all devices: sl's (in turn), or --server-model shared (in arrival order).
  bool shared_server() const { return cfg_.mode == "sl" || (split_mode() && cfg_.server_model == "shared"); }
  bool stacked() const { return cfg_.server_batching == "stack"; }
  // The most server parts one group may hold: a stack's micro-batches all at once, else one per lane.
  size_t group_capacity() const { return stacked() ? slots_.size() : static_cast<size_t>(lanes_->lanes()); }
  // Differential privacy is on: the devices account their releases, and this server counts, per device,
  // the rounds it began (checkpointed, and handed to the devices, so a restarted device's epsilon goes on
  // from its true total).
  bool dp_accounting() const { return dp_accounted(cfg_); }

  // --load (and --resume): the server's end-of-round checkpoint. The model (both parts' weights and
  // batch-norm statistics) and the round always; from a checkpoint of a run of the same mode also the
  // rest of what carries from one round to the next: every server-side replica's momentum
  // (restore_replicas), the plan in force with the re-planner's basis (plan_first) and the privacy
  // counts. The devices' own momentum stays on the devices (keep_or_restore_optimizer_state).
  void load() {
    const CheckpointMeta meta = load_checkpoint(cfg_.load_path, *model_, &resume_state_);
    first_round_ = meta.epoch;
    try {
      resume_ = json::parse(meta.extra_json);
    } catch (const json::exception&) {
      resume_ = json::object();
    }
    if (!resume_.is_object()) resume_ = json::object();
    const std::string mode = resume_.value("mode", "");
    resumed_ = mode == cfg_.mode;
    say(detail::concat("resuming from ", cfg_.load_path, " after round ", first_round_,
                       resumed_ ? std::string()
                                : " (written by " + (mode.empty() ? std::string("another kind of run") : "a --mode " + mode + " run") +
                                      ": its weights only; the optimizer, plan and privacy state start afresh)"));
    if (!resumed_) resume_ = json::object(), resume_state_.clear();
  }

  // Differential privacy: the rounds each device began, written (atomically) before a round's plans go
  // out, beside the checkpoint. A round the server did not finish is not in its last checkpoint, but
  // its devices' data left in it: a resume counts it from here, so that even devices restarted since
  // (whose own accountants are gone) compose it.
  std::string privacy_journal_path(const std::string& dir) const { return dir + "/privacy_rounds.json"; }

  // A resumed run (from round first_round_ on) reports the whole run: the rounds before it, from the
  // metrics.jsonl of the same output directory, count in summary.json and the returned result. Lines
  // of rounds from first_round_ on (recorded after the checkpoint, before the crash: they are run again)
  // and a line cut short by the crash are dropped from the file, so each round appears once.
  void keep_earlier_rounds() {
    const std::string path = result_.out_dir + "/metrics.jsonl";
    std::ifstream in(path);
    if (!in) return;  // a new output directory: this run's rounds only
    std::map<int, json> kept;
    for (std::string text; std::getline(in, text);) {
      const json line = json::parse(text, nullptr, false);
      if (line.is_discarded() || !line.is_object() || !line.contains("round") || !line["round"].is_number_integer()) continue;
      const int r = line["round"].get<int>();
      if (r >= 0 && r < first_round_) kept[r] = line;  // the last record of a round wins
    }
    in.close();
    // A record that does not fit the totals (another device count: the run was resumed with other
    // options; a field missing or of another type) stays in the file but is not totalled.
    const auto number = [](const json& line, const char* key) { return line.contains(key) && line[key].is_number(); };
    const auto per_device = [&](const json& line, const char* key) {
      return line.contains(key) && line[key].is_array() && line[key].size() == slots_.size() &&
             std::all_of(line[key].begin(), line[key].end(), [](const json& x) { return x.is_number(); });
    };
    std::string text;
    size_t totalled = 0;
    for (const auto& [r, line] : kept) {
      text += line.dump() + "\n";
      if (!per_device(line, "device_busy_seconds") || !per_device(line, "device_idle_seconds")) continue;
      bool fits = true;
      for (const char* key : {"round_seconds", "server_busy_seconds", "server_idle_seconds", "bytes_up", "bytes_down",
                              "pipeline_efficiency"})
        fits = fits && number(line, key);
      if (!fits) continue;
      EpochMetrics m;
      try {  // the figures that are not totalled: a default where absent, but the type must fit
        m.epoch = line.value("epoch", r + 1);
        m.train_loss = line.value("train_loss", 0.0), m.train_accuracy = line.value("train_accuracy", 0.0);
        m.test_loss = line.value("test_loss", 0.0), m.test_accuracy = line.value("test_accuracy", 0.0);
        m.train_seconds = line["round_seconds"].get<double>(), m.eval_seconds = line.value("eval_seconds", 0.0);
        m.samples = line.value("samples", int64_t{0});
      } catch (const json::exception&) {
        continue;
      }
      ++totalled;
      m.samples_per_second = m.train_seconds > 0 ? static_cast<double>(m.samples) / m.train_seconds : 0.0;
      result_.epochs.push_back(m);
      result_.train_seconds += m.train_seconds;
      result_.test_accuracy = m.test_accuracy;
      rounds_.push_back(line);
    }
    write_file_atomically(path, text, "metrics");
    if (totalled != static_cast<size_t>(first_round_))
      say(detail::concat("metrics.jsonl held ", totalled, " of the ", first_round_, " rounds before the resumed one for ",
                         slots_.size(), " devices: summary.json totals those"));
  }

  void write_privacy_journal(int r, const std::vector<DeviceSlot*>& active) {
    std::vector<int64_t> counts = privacy_rounds_;
    for (const DeviceSlot* s : active) ++counts[s->id];
    write_file_atomically(privacy_journal_path(result_.out_dir), json{{"round", r}, {"privacy_rounds", counts}}.dump() + "\n",
                          "privacy journal");
  }

  void read_privacy_journal() {
    const std::filesystem::path dir = std::filesystem::path(cfg_.load_path).parent_path();
    const std::string path = privacy_journal_path(dir.empty() ? "." : dir.string());
    std::ifstream f(path);
    if (!f) return;
    try {
      const json j = json::parse(f);
      if (j.at("round").get<int64_t>() < first_round_) return;  // begun before the checkpoint: counted there
      const json& counts = j.at("privacy_rounds");
      for (size_t d = 0; d < privacy_rounds_.size() && d < counts.size(); ++d)
        privacy_rounds_[d] = std::max(privacy_rounds_[d], counts[d].get<int64_t>());
      say(detail::concat("privacy: round ", j.at("round").get<int64_t>() + 1, " had begun when the server stopped; it counts as released"));
    } catch (const json::exception& e) {
      throw IoError(path + " is corrupt (" + e.what() + "); it records the rounds of each device's data released: "
                    "repair it or delete it to count only the checkpoint's");
    }
  }

  // Name of a replica's momentum in the checkpoint.
  static std::string replica_state_name(uint32_t device, const std::string& param) {
    return detail::concat("replica", device, "/", param, "/momentum");
  }

  void restore_replicas() {
    if (resume_state_.empty()) return;
    std::map<std::string, std::pair<Tensor*, int>> dst;  // the momentum tensor and its replica's GPU
    for (DeviceSlot& s : slots_)
      if (s.replica)
        for (Param* p : s.replica->params()) dst[replica_state_name(s.id, p->name)] = {&p->momentum, gpu_of(s)};
    size_t n = 0;
    for (const CheckpointState& st : resume_state_) {
      auto it = dst.find(st.name);
      if (it == dst.end()) continue;  // a replica this run does not have (fewer devices)
      Tensor& m = *it->second.first;
      if (!(m.shape() == st.value.shape()))
        throw IoError("checkpoint " + cfg_.load_path + ": state " + st.name + " has shape " + st.value.shape().str() +
                      ", the model's tensor " + m.shape().str());
      kernels::ScopedCudaDevice on_gpu(it->second.second);
      m = st.value.to(m.device());
      ++n;
    }
    resume_state_.clear();
    say(detail::concat("restored ", n, " momentum tensors of the server-side replicas"));
  }

  tp::LinkOptions link_options() {
    tp::LinkOptions lo;
    lo.shape = {net_.downlink_mbps, net_.latency_ms};
    lo.log = [this](const std::string& s) { say("transport: " + s); };
    lo.security = net_.security;
    return lo;
  }

  void say(const std::string& s) {
    if (progress_) progress_->on_message(s);
  }

  void validate() {
    if (cfg_.mode != "fl" && !split_mode()) throw Error("unknown mode '" + cfg_.mode + "'; use local, fl, sl, sfl or pipar");
    if (cfg_.devices < 1 || cfg_.devices > 1024) throw Error("--devices must be 1..1024");
    device_profiles_in_cpu_time(net_);  // an unknown clock fails here, before any device connects
    if (cfg_.batch_size < 2) throw Error("--batch-size must be at least 2");
    if (cfg_.micro_batches == 0 || cfg_.micro_batches < -1) throw Error("--micro-batches must be at least 1 (or auto)");
    if (cfg_.mode != "pipar") cfg_.micro_batches = 1;  // whole batches
    if (cfg_.split < -1) throw Error("--split must be a block number (or auto)");
    if (cfg_.server_model != "per-device" && cfg_.server_model != "shared")
      throw Error("--server-model must be per-device or shared, got '" + cfg_.server_model + "'");
    if (!(cfg_.server_memory_gb >= 0)) throw Error("--server-memory-gb must be 0 (this machine's available memory) or more");
    if (cfg_.server_lanes < 0) throw Error("--server-lanes must be 0 (as the cost model predicts faster) or more");
    if (!(net_.group_wait_ms >= 0) || net_.group_wait_ms > 10000) throw Error("--group-wait-ms must be 0..10000");
    if (cfg_.server_batching != "lanes" && cfg_.server_batching != "stack" && cfg_.server_batching != "auto")
      throw Error("--server-batching must be lanes, stack or auto, got '" + cfg_.server_batching + "'");
    if (cfg_.server_batching != "lanes") {
      std::string why = cfg_.mode != "sfl" && cfg_.mode != "pipar" ? "a replica per device: --mode sfl or pipar"
                        : cfg_.server_model != "per-device"         ? "a replica per device: --server-model per-device"
                        : cfg_.labels != "shared"                   ? "whole server steps: --labels shared"
                        : cfg_.gpus.size() > 1                      ? "the replicas on one GPU: at most one --gpus"
                        : cfg_.server_lanes > 1                     ? "no --server-lanes"
                                                                    : "";
      for (int p : cfg_.device_splits)
        if (why.empty() && p != cfg_.device_splits.front()) why = "one split point for every device, not --split P0,P1,...";
      if (!why.empty() && cfg_.server_batching == "stack") throw Error("--server-batching stack needs " + why);
      if (!why.empty()) {  // auto: stacks cannot serve this run
        if (split_mode()) say("server batching auto: lanes (stacks need " + why + ")");
        cfg_.server_batching = "lanes";
      }
      if (cfg_.server_batching == "stack") cfg_.one_split = true;  // the planner too
    }
    if (cfg_.server_model == "shared") {
      if (cfg_.mode == "fl")
        throw Error("--server-model shared applies to sfl and pipar: in fl the devices train whole models (and sl always "
                    "shares its one server part)");
      if (!cfg_.device_splits.empty())
        throw Error("--server-model shared: the one server-side model splits at one block; give one --split (or auto)");
      if (cfg_.labels == "private" && cfg_.mode != "sl")
        throw Error("--server-model shared with --labels private is not supported: use --server-model per-device");
    }
    if (!cfg_.device_splits.empty()) {
      if (cfg_.mode != "sfl" && cfg_.mode != "pipar")
        throw Error("a split point per device (--split P0,P1,...) needs --mode sfl or pipar: in " + cfg_.mode +
                    (cfg_.mode == "sl" ? " the devices take turns through one server part, which splits at one block"
                                       : " there is no split"));
      if (cfg_.device_splits.size() != static_cast<size_t>(cfg_.devices))
        throw Error(detail::concat("--split lists ", cfg_.device_splits.size(), " split points for ", cfg_.devices,
                                   " devices: give one per device, one for all, or auto"));
      if (cfg_.split < 0 || cfg_.micro_batches < 0)
        throw Error("--split P0,P1,... fixes the plan: give --micro-batches too (or --split auto to let the planner choose both)");
      for (int p : cfg_.device_splits)
        if (p < 1) throw Error(detail::concat("--split: split point ", p, " is not a block number"));
    }
    if (cfg_.labels != "shared" && cfg_.labels != "private")
      throw Error("--labels must be shared or private, got '" + cfg_.labels + "'");
    if (private_labels() && !split_mode())
      throw Error("--labels private needs a split mode (sl, sfl or pipar): in --mode " + cfg_.mode +
                  " the whole model and its labels stay on the devices anyway");
    if (private_labels() && cfg_.dp_sgd)
      throw Error("--dp-sgd with --labels private is not supported: DP-SGD covers the device's front blocks, not the "
                  "tail it would also train; use --dp-clip/--dp-sigma (activation noise) or --labels shared");
    // --backend names the server's: the server-side parts train there (the devices are CPU processes).
    // In fl the server trains nothing: it averages and evaluates on the host whatever the backend.
    // A backend that cannot run is refused in every mode (a typo or a missing GPU is an error anywhere).
    const Device backend = resolve_backend(cfg_.backend);
    server_device_ = split_mode() ? backend : Device::kCpu;
    if (cfg_.backend == "auto" && split_mode()) say("server backend auto: " + auto_backend_note(backend));
    if (!cfg_.gpus.empty()) {
      if (backend != Device::kCuda) throw Error("--gpus places the server-side replicas on GPUs: it needs --backend cuda");
      const int n = kernels::cuda_device_count();
      std::set<int> seen;
      for (int g : cfg_.gpus)
        if (g < 0 || g >= n || !seen.insert(g).second)
          throw Error(detail::concat("--gpus: GPU ", g, " is not one of this machine's ", n, " or is named twice"));
    }
    if (server_device_ == Device::kCuda) gpus_ = cfg_.gpus.empty() ? std::vector<int>{-1} : cfg_.gpus;
  }

  void wait_for_devices() {
    const double deadline = now_seconds() + net_.connect_timeout_s;
    size_t connected = 0;
    while (connected < slots_.size()) {
      check_launched();
      if (now_seconds() > deadline || stop_requested().load())
        throw Error(detail::concat("only ", connected, " of ", slots_.size(), " devices connected within ",
                                   net_.connect_timeout_s, " s"));
      auto r = server_.recv(ms(200));
      if (!r) continue;
      if (!r->message.ok()) continue;
      if (auto* h = std::get_if<tp::Hello>(&r->message.value())) {
        if (h->device >= slots_.size()) {
          server_.send(r->peer, tp::ErrorReply{tp::ErrorCode::kUnexpected, detail::concat("device id ", h->device, " outside 0..", slots_.size() - 1)});
          continue;
        }
        DeviceSlot& s = slots_[h->device];
        if (!s.connected) ++connected;
        s.connected = true;
        s.last_seen = now_seconds();
        say(detail::concat("device ", h->device, " connected (", h->capabilities, ")"));
      }
    }
  }

  // Sends the configuration (a plan for round -1) and waits until every device has loaded its data
  // and built its model (a second hello with its partition size).
  void prepare_devices() {
    std::set<uint32_t> ready;
    std::string mismatch;
    for (DeviceSlot& s : slots_) {
      server_.send(s.id, make_plan(-1, s));
      s.last_seen = now_seconds();
    }
    // Devices send heartbeats while they load, so silence means gone: such a device is left out
    // (it may rejoin later) and the others start.
    auto pending = [&] {
      size_t n = 0;
      for (const DeviceSlot& s : slots_) n += s.connected && !ready.count(s.id);
      return n;
    };
    while (pending() > 0) {
      check_launched();
      if (stop_requested().load()) throw Error("interrupted");
      auto r = server_.recv(ms(200));
      const double now = now_seconds();
      for (DeviceSlot& s : slots_)
        if (s.connected && !ready.count(s.id) && now - s.last_seen > net_.device_timeout_s) {
          say(detail::concat("device ", s.id, " did not get ready (silent for ", net_.device_timeout_s, " s); going on without it"));
          s.connected = false;
        }
      if (!r || !r->message.ok() || !r->device || *r->device >= slots_.size()) continue;
      slots_[*r->device].last_seen = now;
      auto* h = std::get_if<tp::Hello>(&r->message.value());
      if (!h || h->data_size <= 0 || h->device != *r->device) continue;
      if (h->data_size != slots_[h->device].samples) {  // left out, not fatal: one device must not stop the run
        const std::string why = detail::concat("device ", h->device, " holds ", h->data_size, " samples but its partition has ",
                                               slots_[h->device].samples, ": its data differ from the server's");
        server_.send(r->peer, tp::ErrorReply{tp::ErrorCode::kUnexpected, why});
        say(why + "; going on without it");
        slots_[h->device].connected = false;
        mismatch = why;
        continue;
      }
      ready.insert(h->device);
      slots_[h->device].profile = h->profile;
    }
    if (ready.empty()) throw Error("no device got ready" + (mismatch.empty() ? std::string() : " (last: " + mismatch + ")"));
  }

  // After every round, written atomically (temp file, fsync, rename) to <out>/server.ckpt, all that
  // this server carries into the next round: a server killed at any moment restarts with --load (or
  // --resume) from the last round and goes on as if never stopped. The averaged model; every
  // server-side replica's momentum (state records; tensors all zero are left out and read as zero);
  // in the metadata the plan of the next round (split, micro_batches), with an automatic plan the
  // re-planner's basis (planner), and with differential privacy the rounds each device began.
  void save_round(int r) {
    CheckpointMeta meta;
    meta.model = model_->name();
    meta.options = model_->options();
    meta.epoch = r + 1;
    json extra = {{"mode", cfg_.mode}, {"split", split_json()}, {"micro_batches", cfg_.micro_batches}};
    if (dp_accounting()) extra["privacy_rounds"] = privacy_rounds_;
    if (lanes_) extra["server_lanes"] = std::pair{lanes_->lanes(), lanes_->threads_per_lane()};  // a resumed run keeps them
    if (split_mode()) extra["server_batching"] = cfg_.server_batching;                               // (auto's choice too)
    if (auto_plan_ && predicted_) {
      json ps = cluster_basis(cluster_);
      ps["plan"] = json::parse(plan_.to_json());
      ps["first_plan"] = json::parse(first_plan_.to_json());
      ps["speed_replans"] = speed_replans_;
      if (trial_)
        ps["trial"] = {{"before", json::parse(trial_->before.to_json())}, {"basis", trial_->basis},
                       {"per_sample_s", trial_->per_sample_s}, {"up_mbps", trial_->up_mbps}};
      extra["planner"] = ps;
    }
    meta.extra_json = extra.dump();
    std::vector<CheckpointState> state;
    for (DeviceSlot& s : slots_) {
      if (!s.replica) continue;
      kernels::ScopedCudaDevice on_gpu(gpu_of(s));
      for (Param* p : s.replica->params()) {
        Tensor m = p->momentum.to(Device::kCpu);
        const float* v = m.data();
        if (std::any_of(v, v + m.numel(), [](float x) { return x != 0.0f; }))
          state.push_back({replica_state_name(s.id, p->name), m});  // no copy: written before anything trains
      }
    }
    save_checkpoint(result_.out_dir + "/server.ckpt", *model_, meta, state);
  }

  void check_launched() const {
    if (!net_.launched_devices_failed) return;
    const std::string why = net_.launched_devices_failed();
    if (!why.empty()) throw Error(why);
  }

  // Every device's server part at its split point (sl: one, used in turn), built anew where the split
  // moved since (the first round, a re-plan). The replica's weights there come from the averaged model;
  // the momentum stays in its Params.
  void build_replicas() {
    kernels::SgdParams sp;
    sp.lr = cfg_.lr, sp.momentum = cfg_.momentum, sp.weight_decay = cfg_.weight_decay;
    for (size_t d = 0; d < slots_.size(); ++d) {
      if (shared_server() && d > 0) break;  // one server part: sl's, used in turn, or --server-model shared
      DeviceSlot& s = slots_[d];
      if (s.part_split == s.split) continue;
      kernels::ScopedCudaDevice on_gpu(gpu_of(s));  // its tensors live on its GPU
      if (!s.replica) {
        s.replica = build_model(cfg_.model, model_options(cfg_, train_));
        s.replica->to(server_device_);  // on CUDA each part then trains on a stream of its own
      }
      load_state(*s.replica, copy_state(*model_, s.split), s.split);
      if (private_labels()) {
        s.middle_part.reset();  // the old part (and its stream) first
        s.middle_part = std::make_unique<MiddlePart>(*s.replica, s.split, server_end(), sp, server_device_, gpu_of(s));
        s.server_part.reset();
      } else {
        s.server_part.reset();
        s.server_part = std::make_unique<ServerPart>(*s.replica, s.split, sp, server_device_, gpu_of(s));
        if (server_device_ == Device::kCuda) s.server_part->set_graphs(cfg_.cuda_graphs);
        s.middle_part.reset();
      }
      s.part_split = s.split;
    }
    if (stacked()) build_stacks(sp);
    malloc_trim(0);  // the copies it made while loading K replicas: back to the system, not kept as free heap
  }

  // --server-batching stack: the replicas, in slot order, as stacks of up to kServerStackMax (one split, one
  // GPU: validate). Their state comes from the replicas at each round's start (load_stacks) and goes
  // back before the round's average (store_stacks), so that between rounds the replicas hold it, as
  // without stacks (FedAvg, checkpoints, re-plans read and write the replicas).
  void build_stacks(const kernels::SgdParams& sp) {
    for (DeviceSlot& s : slots_) s.stack = nullptr, s.stack_slot = -1;
    stacks_.clear();
    std::vector<DeviceSlot*> with_parts;
    for (DeviceSlot& s : slots_)
      if (s.server_part) with_parts.push_back(&s);
    for (size_t first = 0; first < with_parts.size(); first += kServerStackMax) {
      const int count = static_cast<int>(std::min<size_t>(kServerStackMax, with_parts.size() - first));
      DeviceSlot& lead = *with_parts[first];
      kernels::ScopedCudaDevice on_gpu(gpu_of(lead));
      stacks_.push_back(
          std::make_unique<ReplicaStack>(*lead.replica, lead.split, count, sp, server_device_, gpu_of(lead)));
      for (int r = 0; r < count; ++r) {
        DeviceSlot& s = *with_parts[first + static_cast<size_t>(r)];
        if (s.split != lead.split) throw Error("--server-batching stack: the devices' split points differ");
        s.stack = stacks_.back().get(), s.stack_slot = r;
      }
    }
  }

  void load_stacks() {
    for (DeviceSlot& s : slots_)
      if (s.stack) s.stack->load(s.stack_slot, *s.replica);
  }

  void store_stacks() {
    for (DeviceSlot& s : slots_)
      if (s.stack) s.stack->store(s.stack_slot, *s.replica);
  }

  // Cross-device batching (a replica per device): up to L replicas train side by side,
  // each on threads / L of the server's threads. The lanes are fixed for the run (the checkpoint keeps
  // them), never chosen by timing, so a run's arithmetic does not depend on which micro-batches happen
  // to share a group. The options, as (lanes, threads per lane): --server-lanes L: that; 0 (auto): one
  // at a time on all threads, or min(devices, threads) lanes, whichever the cost model predicts faster
  // (plan_first; side by side wins with many devices and small micro-batches, loses with few devices
  // and large ones, bench/RESULTS.md). One server-side model (sl, --server-model shared): one lane on
  // all threads. Private labels group middle forwards and backwards alike; the cost model does not
  // model their groups, so there only --server-lanes L forces lanes.
  //
  // On CUDA (ServerLanes::cuda_lanes) the lanes are host threads driving the replicas' streams, so that
  // one's copies and small kernels overlap another's. The GPU's arithmetic does not depend on the lanes
  // either. The cost model sees one server (the GPU runs their kernels in turn as far as it knows).
  std::vector<std::pair<int, int>> lane_options() const {
    const int threads = cfg_.threads > 0 ? cfg_.threads : kernels::num_threads();
    if (shared_server() || stacked()) return {{1, threads}};  // stacks: one call per layer on all threads
    const bool cuda = server_device_ != Device::kCpu;
    if (resumed_ && resume_.contains("server_lanes")) {
      try {
        const auto lanes = resume_.at("server_lanes").get<std::pair<int, int>>();
        if (lanes.first >= 1 && lanes.second >= 1) return {lanes};
      } catch (const json::exception&) {
      }
      throw IoError("checkpoint " + cfg_.load_path + ": bad server_lanes");
    }
    if (cuda) return {ServerLanes::cuda_lanes(cfg_.devices, cfg_.server_lanes)};
    if (private_labels() && cfg_.server_lanes == 0) return {{1, threads}};
    // Devices on the server's own cores (pipar train, --shared-cores): lanes only where asked for. The
    // cost model credits them with gains they never showed beside the devices on a 2-core test bed
    // (bench/RESULTS.md: VGG16, predicted 10%, measured 3-6% slower; VGG11 at 50 Mbit/s, predicted
    // 18%, 2-lane runs 3.90-4.66 s against one lane's 3.43-3.92), though alone they gain 1.11-1.15x.
    if (cfg_.server_lanes == 0 && devices_share_cores(net_)) return {{1, threads}};
    return ServerLanes::options(cfg_.devices, threads, cfg_.server_lanes);
  }

  void start_lanes(std::pair<int, int> lanes) {
    lanes_ = std::make_unique<ServerLanes>(lanes.first, lanes.second);
    if (server_device_ != Device::kCpu)
      say(detail::concat("server on ", device_name(server_device_), " (kernels ", kernels::cuda_kernels(), "): a stream per server-side part, ",
                         lanes.first, " host thread", lanes.first > 1 ? "s" : "", " driving them"));
    else if (lanes.first > 1)
      say(detail::concat("cross-device batching: up to ", lanes.first, " server-side replicas train side by side, ",
                         lanes.second, " thread", lanes.second > 1 ? "s" : "", " each"));
  }

  // Before the first plan, every device's link is measured by round trips of probe messages (all
  // devices at once, each over its own link): three with no payload (latency), then a payload down,
  // then one asked back up, each grown from 64 KiB (x4, up to 4 MiB) until its transfer takes 20 ms,
  // then timed twice more; the best of each (planner::link_from_probes). Through the links as they
  // are: shaped (--uplink-mbps, emulation) or not (a real network). At most 4 MiB of probe payload is
  // in flight at once (so 256 devices on fast links take turns, and the server's memory does not grow
  // with them). A device that does not answer within 5 s keeps the configured link. The cost model
  // then plans with the measured links.
  void probe_links() {
    constexpr int64_t kStartBytes = int64_t{64} << 10, kMaxBytes = int64_t{4} << 20;
    constexpr double kEnough = 0.02, kAnswerWithin = 5.0;
    struct State {
      int phase = 0;  // 0: empty both ways, 1: payload down, 2: payload up, 3: done (or given up)
      int64_t bytes = 0;
      int reps = 0;
      uint32_t seq = 0;
      double sent = -1;  // the outstanding probe's send time (< 0: none)
      double rtt0 = 1e30, best = 1e30, rtt_down = 0, rtt_up = 0;
      int64_t down_bytes = 0, up_bytes = 0;
      int64_t flight = 0;  // the outstanding probe's payload bytes (either way)
    };
    int64_t in_flight = 0;
    std::map<uint32_t, State> st;
    for (const DeviceSlot& s : slots_)
      if (s.connected) st[s.id] = State{};
    std::map<int64_t, Tensor> payloads;
    auto payload = [&](int64_t bytes) -> const Tensor& {
      auto it = payloads.find(bytes);
      if (it == payloads.end()) it = payloads.emplace(bytes, Tensor::zeros({bytes / 4, 1, 1, 1})).first;
      return it->second;
    };
    const double t_start = now_seconds();
    auto open = [&] {
      size_t n = 0;
      for (const auto& [id, x] : st) n += x.phase < 3;
      return n;
    };
    while (open() > 0) {
      if (stop_requested().load()) throw Error("interrupted");
      const double now = now_seconds();
      for (auto& [id, x] : st) {
        if (x.phase == 3) continue;
        if (x.sent >= 0 && now - x.sent > kAnswerWithin) {
          say(detail::concat("device ", id, " did not answer the link probe within ", kAnswerWithin, " s: its link is taken as configured"));
          x.phase = 3;
          in_flight -= x.flight;
          continue;
        }
        if (x.sent >= 0) continue;
        x.flight = x.phase == 0 ? 0 : x.bytes;
        if (in_flight > 0 && in_flight + x.flight > kMaxBytes) continue;  // its turn comes
        in_flight += x.flight;
        tp::Probe p;
        p.device = id;
        p.seq = ++x.seq;
        if (x.phase == 1) p.payload = payload(x.bytes);
        if (x.phase == 2) p.reply_bytes = x.bytes;
        x.sent = now_seconds();
        server_.send(id, p);
      }
      auto r = server_.recv(ms(50));
      if (!r || !r->message.ok() || !r->device || *r->device >= slots_.size()) continue;
      slots_[*r->device].last_seen = now_seconds();
      const auto* p = std::get_if<tp::Probe>(&r->message.value());
      auto it = st.find(*r->device);
      if (!p || it == st.end() || it->second.sent < 0 || p->seq != it->second.seq) continue;
      State& x = it->second;
      const double rtt = now_seconds() - x.sent;
      x.sent = -1;
      in_flight -= x.flight;
      if (x.phase == 0) {
        x.rtt0 = std::min(x.rtt0, rtt);
        if (++x.reps == 3) x.phase = 1, x.bytes = kStartBytes, x.reps = 0, x.best = 1e30;
        continue;
      }
      if (rtt - x.rtt0 < kEnough && x.bytes < kMaxBytes && x.reps == 0) {  // too quick to time well: larger
        x.bytes *= 4;
        continue;
      }
      x.best = std::min(x.best, rtt);
      if (++x.reps < 3) continue;
      if (x.phase == 1) {
        x.rtt_down = x.best, x.down_bytes = x.bytes;
        x.phase = 2, x.bytes = kStartBytes, x.reps = 0, x.best = 1e30;
        continue;
      }
      x.rtt_up = x.best, x.up_bytes = p->payload.defined() ? static_cast<int64_t>(p->payload.bytes()) : 0;
      x.phase = 3;
      planner::LinkSpec l = planner::link_from_probes(x.rtt0, static_cast<double>(x.down_bytes), x.rtt_down,
                                                      static_cast<double>(x.up_bytes), x.rtt_up);
      slots_[*r->device].probed = l;
      say(detail::concat("device ", *r->device, " link probe: up ", l.up_mbps, " Mbit/s, down ", l.down_mbps,
                         " Mbit/s, latency ", l.latency_s * 1e3, " ms (configured: up ", uplink_for_round(0), ", down ",
                         net_.downlink_mbps, ", latency ", net_.latency_ms, "; 0 = unshaped)"));
    }
    probe_s_ = now_seconds() - t_start;
  }

  // The profiles the plan is made from, for `pipar plan --profile` and for reading the plan's
  // predictions: profile_server.json and one profile_deviceD.json per device that sent one.
  void save_profiles() {
    if (result_.out_dir.empty()) return;
    try {
      if (cluster_.server_profile) cluster_.server_profile->save(result_.out_dir + "/profile_server.json");
      for (size_t d = 0; d < slots_.size(); ++d)
        if (slots_[d].connected && !slots_[d].profile.empty())
          cluster_.device_profiles.at(cluster_.devices.at(d).profile).save(detail::concat(result_.out_dir, "/profile_device", d, ".json"));
    } catch (const Error& e) {
      say(std::string("the profiles were not saved: ") + e.what());
    }
  }

  // The cluster the cost model sees, with this server's profile measured on `lanes`' threads per lane.
  planner::Cluster make_cluster(const std::vector<planner::Profile>& profiles, const planner::Profile& server_profile,
                                std::pair<int, int> lanes) const {
    planner::Cluster c = planner::make_cluster(profiles[0], slots_.size(),
                                               {net_.uplink_mbps, net_.downlink_mbps, net_.latency_ms / 1e3, 0}, cfg_.batch_size);
    c.device_profiles = profiles;
    size_t k = 0;
    for (size_t d = 0; d < slots_.size(); ++d) {
      c.devices[d].samples = slots_[d].samples;
      c.devices[d].profile = slots_[d].connected && !slots_[d].profile.empty() ? k++ : 0;
      if (slots_[d].probed) c.devices[d].link = *slots_[d].probed;
    }
    c.server_profile = server_profile;
    c.server_per_micro_batch_s = planner::kServerPerMicroBatchS;
    const bool cuda = server_device_ != Device::kCpu;
    c.server_lanes = cuda ? 1 : lanes.first;  // a GPU: one server, its streams' overlap not credited
    if (devices_share_cores(net_)) {  // pipar train: devices and server on one machine
      c.host_cores = net_.shared_cores > 0 ? net_.shared_cores : kernels::hardware_threads();
      c.host_device_threads = net_.launched_device_threads;
      // Each device's speed alone where every profile was timed by its CPU time (the devices profile
      // at once; see NetConfig::device_profile_clock).
      c.host_device_profiles_alone = std::all_of(profiles.begin(), profiles.end(), [](const planner::Profile& p) {
        return p.cpu_time && p.cpu_quota_cores == 0 && p.threads == 1;
      });
      c.host_server_threads = cuda ? 0 : lanes.first * lanes.second;  // a GPU server's kernels take no host core
    }
    c.private_labels = private_labels();  // the extra hop, and split points that leave the device the tail
    c.shared_server_model = shared_server();
    return c;
  }

  // The predicted round time of the plan this run would use on cluster c: the search's best, or the
  // fixed plan's score (infinity where the cost model cannot score it).
  double predicted_round_s(const planner::Cluster& c) { return predicted_round_s(c, search_options_); }
  double predicted_round_s(const planner::Cluster& c, const planner::SearchOptions& so) {
    try {
      if (auto_plan_) return planner::search(planner::CostModel(c), so).best.round_s;
      return planner::evaluate_plan(planner::CostModel(c), so.mode, slot_splits(), cfg_.micro_batches).round_s;
    } catch (const Error&) {
      return std::numeric_limits<double>::infinity();
    }
  }

  // --server-batching stack (or auto, weighing it): the stacks' own profiles into c (a call computes
  // every replica of its stack, so its time follows the stack's size), measured on c's server profile's
  // threads, from the split point the run keeps or from block 1 for the planner to choose. Returns the
  // seconds the measuring took.
  double add_stack_profiles(planner::Cluster& c, const planner::ProfileOptions& po) {
    const size_t from = cfg_.split > 0 ? static_cast<size_t>(cfg_.split) : 1;
    kernels::ScopedCudaDevice on_gpu(gpus_.empty() ? -1 : gpus_.front());
    planner::profile_stacks(c, cfg_.model, model_->options(), from, kServerStackMax, po);
    double seconds = 0;
    std::string sizes;
    for (const auto& [k, p] : c.stack_profiles) {
      seconds += p.seconds;
      sizes += detail::concat(sizes.empty() ? "" : ", ", k);
    }
    say(detail::concat("measured the stacked server (stacks of ", sizes, " replicas, from split point ", from, ")"));
    return seconds;
  }

  // The first round's plan and its predicted round time, from the devices' measured profiles, this
  // server's own and the configured links. --split auto / --micro-batches auto: the planner's best
  // plan (in sfl and pipar a split point per device, unless --one-split). A fixed plan is kept and only scored by the same
  // cost model, so metrics.jsonl holds predicted_round_seconds beside round_seconds either way.
  void plan_first() {
    const double t0 = now_seconds();
    std::vector<planner::Profile> profiles;
    double device_profile_s = 0;
    for (const DeviceSlot& s : slots_)
      if (s.connected && !s.profile.empty()) {
        profiles.push_back(planner::Profile::from_json(s.profile));
        device_profile_s = std::max(device_profile_s, profiles.back().seconds);
      }
    if (cfg_.server_batching == "auto" && resumed_ && resume_.contains("server_batching")) {  // as the first run chose
      const json& b = resume_.at("server_batching");
      if (!b.is_string() || (b != "lanes" && b != "stack")) throw IoError("checkpoint " + cfg_.load_path + ": bad server_batching");
      cfg_.server_batching = b.get<std::string>();
      if (stacked()) cfg_.one_split = true;
    }
    const std::vector<std::pair<int, int>> lane_choices = lane_options();
    if (!profiles.empty()) probe_links();
    if (profiles.empty()) {
      if (cfg_.server_batching == "auto") {
        say("server batching auto: lanes (no device profile to predict by)");
        cfg_.server_batching = "lanes";
      }
      if (auto_plan_) throw Error("--split auto: no device sent a profile");
      say("no device sent a profile: the fixed plan's round time is not predicted");
      start_lanes(lane_choices.front());  // nothing to choose by: one at a time unless --server-lanes says otherwise
      return;
    }
    search_options_.mode = planner::parse_mode(cfg_.mode);
    // One server part (sl's, or --server-model shared) splits at one block for every device.
    search_options_.per_device_split = !shared_server() && !cfg_.one_split;
    search_options_.micro_batch_margin = cfg_.plan_margin;
    search_options_.server_memory_limit = server_memory_limit();
    if (auto_plan_) {
      if (cfg_.split > 0) search_options_.splits = {cfg_.split};
      if (cfg_.micro_batches > 0) search_options_.micro_batches = {cfg_.micro_batches};
    }
    // This server's profile for each lane option (a micro-batch runs on one lane's share of the
    // threads), and the option whose plan the cost model predicts faster.
    planner::ProfileOptions po;
    po.sizes = {1, 4, 16, std::max<int64_t>(16, cfg_.batch_size)};
    po.device = server_device_;
    double server_profile_s = 0, best_s = std::numeric_limits<double>::infinity();
    std::pair<int, int> chosen;
    std::string lane_note;
    for (const auto& lanes : lane_choices) {
      po.threads = lanes.second;
      // A model of its own: profiling takes SGD steps, which must not move the weights training starts from.
      // On CUDA, on the first GPU the replicas use.
      kernels::ScopedCudaDevice on_gpu(gpus_.empty() ? -1 : gpus_.front());
      const planner::Profile server_profile = planner::profile_model(cfg_.model, model_->options(), po);
      server_profile_s += server_profile.seconds;
      planner::Cluster c = make_cluster(profiles, server_profile, lanes);
      const double predicted = lane_choices.size() > 1 ? predicted_round_s(c) : 0.0;
      if (lane_choices.size() > 1)
        lane_note += detail::concat(lane_note.empty() ? "" : ", ", lanes.first, " lane", lanes.first > 1 ? "s" : "", " of ",
                                    lanes.second, " thread", lanes.second > 1 ? "s" : "", ": round ", predicted, " s");
      // More lanes (more concurrency, like more micro-batches) only for a gain beyond the plan margin:
      // measured, 2 lanes picked for a 0.5% predicted gain ran 10% slower than sfl (bench/RESULTS.md).
      if (&lanes == &lane_choices.front() ||
          planner::gains_beyond(predicted, best_s, lanes.first > chosen.first ? cfg_.plan_margin : 0.0)) {
        best_s = predicted;
        cluster_ = std::move(c);
        chosen = lanes;
      }
    }
    if (!lane_note.empty()) say("cross-device batching, predicted: " + lane_note);
    if (stacked()) {
      server_profile_s += add_stack_profiles(cluster_, po);
    } else if (cfg_.server_batching == "auto") {
      // Stacks against the lanes' best: the plan each allows (stacks: one split point), predicted.
      const int threads = cfg_.threads > 0 ? cfg_.threads : kernels::num_threads();
      planner::Cluster sc;
      if (chosen.first == 1 || server_device_ != Device::kCpu) {
        sc = cluster_;
      } else {  // the server's profile on all its threads, as the stacks run
        kernels::ScopedCudaDevice on_gpu(gpus_.empty() ? -1 : gpus_.front());
        po.threads = threads;
        const planner::Profile whole = planner::profile_model(cfg_.model, model_->options(), po);
        server_profile_s += whole.seconds;
        sc = make_cluster(profiles, whole, {1, threads});
      }
      server_profile_s += add_stack_profiles(sc, po);  // sc has one lane, as make_cluster gives it
      planner::SearchOptions one = search_options_;
      one.per_device_split = false;
      const double lanes_s = predicted_round_s(cluster_, search_options_), stack_s = predicted_round_s(sc, one);
      const bool stack = stack_s < lanes_s;
      say(detail::concat("server batching auto, predicted: ", chosen.first, " lane", chosen.first > 1 ? "s" : "", " round ",
                         lanes_s, " s, stacked round ", stack_s, " s: ", stack ? "stacked" : "lanes"));
      cfg_.server_batching = stack ? "stack" : "lanes";
      if (stack) {
        cluster_ = std::move(sc);
        chosen = {1, threads};
        cfg_.one_split = true;
        search_options_.per_device_split = false;
      }
    }
    start_lanes(chosen);
    save_profiles();
    const std::string profiling = detail::concat("profiling: devices ", device_profile_s, " s at set-up, server ",
                                                 server_profile_s, " s");
    if (cluster_.host_cores > 0)
      say(detail::concat("planning for devices that share this machine's ", cluster_.host_cores, " cores with the server (",
                         cluster_.host_device_threads, " thread(s) each; their profiles ",
                         cluster_.host_device_profiles_alone ? "alone, in CPU time)" : "all at once)"));
    if (auto_plan_) {
      if (restore_plan()) return;
      // Micro-batches of one sample break batch-norm on models whose maps shrink to 1x1.
      const planner::SearchResult r = planner::search(planner::CostModel(cluster_), search_options_);
      plan_ = r.best;
      apply_plan(plan_);
      say(detail::concat("planner (", now_seconds() - t0, " s, ", r.evaluated, " plans scored; ", profiling, "): ",
                         plan_.describe()));
      if (!r.margin_note.empty()) say("  " + r.margin_note);
      for (size_t i = 1; i < r.ranked.size() && i < 4; ++i) say("  runner-up: " + r.ranked[i].describe());
    } else {
      // The plan as given (exactly the score the search gives it); the runtime never re-plans it.
      try {
        plan_ = planner::evaluate_plan(planner::CostModel(cluster_), search_options_.mode, slot_splits(), cfg_.micro_batches);
      } catch (const Error& e) {
        say(std::string("the cost model cannot score the fixed plan (") + e.what() + "): its round time is not predicted");
        return;
      }
      say(detail::concat("fixed plan scored by the cost model (", now_seconds() - t0, " s; ", profiling,
                         "): ", plan_.describe()));
      if (static_cast<double>(plan_.server_memory_bytes) > search_options_.server_memory_limit)
        throw Error(detail::concat("the plan needs ", mib(static_cast<double>(plan_.server_memory_bytes)), " on the server for ",
                                   slots_.size(), " devices (server-side weights, gradients and momentum, queued activations, "
                                   "tapes) but ", mib(search_options_.server_memory_limit),
                                   " are available (--server-memory-gb); options: ",
                                   planner::memory_options(cluster_, search_options_.mode)));
    }
    predicted_round_s_ = plan_.round_s;
    first_plan_ = plan_;
    predicted_ = true;
  }

  // A resumed run with an automatic plan goes on with the plan the checkpoint holds, and the
  // re-planner's basis (the link rates and speed factors measured so far; the profiles are this
  // start's), instead of searching afresh: it plans as the uninterrupted run would have.
  bool restore_plan() {
    if (!resume_.contains("planner")) return false;
    try {
      const json& ps = resume_.at("planner");
      const planner::Plan p = planner::Plan::from_json(ps.at("plan").dump());
      const json& devices = ps.at("devices");
      const bool split_fits = std::all_of(p.split.begin(), p.split.end(), [&](int q) { return cfg_.split <= 0 || q == cfg_.split; }) &&
                              (search_options_.per_device_split || p.shared_split());
      if (p.mode != search_options_.mode || p.split.size() != slots_.size() || devices.size() != slots_.size() || !split_fits ||
          (cfg_.micro_batches > 0 && p.micro_batches != cfg_.micro_batches)) {
        say("the checkpoint's plan (" + p.describe() + ") does not fit this run's options: planning afresh");
        return false;
      }
      load_cluster_basis(ps);
      plan_ = p;
      first_plan_ = planner::Plan::from_json(ps.at("first_plan").dump());
      speed_replans_ = ps.value("speed_replans", true);
      if (ps.contains("trial")) {
        const json& t = ps.at("trial");
        trial_ = ReplanTrial{planner::Plan::from_json(t.at("before").dump()), t.at("basis"), t.at("per_sample_s").get<double>(),
                             t.at("up_mbps").get<std::vector<double>>()};
        if (trial_->before.split.size() != slots_.size() || trial_->basis.at("devices").size() != slots_.size() ||
            !trial_->basis.at("server_time_scale").is_number())
          throw Error("the re-plan on trial is for another device count");
      }
    } catch (const json::exception& e) {
      throw IoError("checkpoint " + cfg_.load_path + ": bad planner state: " + e.what());
    } catch (const Error& e) {
      throw IoError("checkpoint " + cfg_.load_path + ": bad planner state: " + e.what());
    }
    apply_plan(plan_);
    predicted_round_s_ = plan_.round_s;
    predicted_ = true;
    say("plan as the checkpoint left it: " + plan_.describe());
    return true;
  }

  // "12.3 MiB" (three significant digits at least, in MiB).
  static std::string mib(double bytes) {
    std::ostringstream os;
    os.setf(std::ios::fixed);
    os.precision(bytes >= 100 * (1 << 20) ? 0 : 3);
    os << bytes / (1 << 20) << " MiB";
    return os.str();
  }

  // The memory a plan may use on this server: --server-memory-gb, else this machine's available
  // memory (MemAvailable; the CPU backend keeps the server-side parts in host memory; on CUDA the GPU's
  // free memory, where the replicas and their tapes live).
  double server_memory_limit() const {
    if (cfg_.server_memory_gb > 0) return cfg_.server_memory_gb * (1 << 30);
    if (server_device_ == Device::kCuda) {  // summed over the GPUs the replicas are dealt over
      double free_bytes = 0;
      for (int g : gpus_) {
        kernels::ScopedCudaDevice on_gpu(g);
        free_bytes += static_cast<double>(std::max<int64_t>(0, kernels::cuda_memory_free()));
      }
      if (free_bytes > 0) return free_bytes;
    }
    std::ifstream f("/proc/meminfo");
    for (std::string key; f >> key;) {
      double kib = 0;
      f >> kib;
      if (key == "MemAvailable:" && kib > 0) return kib * 1024;
      f.ignore(1 << 10, '\n');
    }
    return std::numeric_limits<double>::infinity();
  }

  std::vector<int> slot_splits() const {
    std::vector<int> out;
    for (const DeviceSlot& s : slots_) out.push_back(static_cast<int>(s.split));
    return out;
  }

  void apply_plan(const planner::Plan& p) {
    if (p.split.size() != slots_.size())
      throw Error(detail::concat("a plan of ", p.split.size(), " split points for ", slots_.size(), " devices"));
    for (size_t d = 0; d < slots_.size(); ++d) {
      const size_t split = static_cast<size_t>(p.split[d]);
      check_split(*model_, split);
      if (private_labels()) check_private_split(*model_, split);
      slots_[d].split = split;
    }
    cfg_.micro_batches = cfg_.mode == "pipar" ? p.micro_batches : 1;
  }

  // The cluster's measured part (link rates, speed factors) as the checkpoint holds it.
  static json cluster_basis(const planner::Cluster& c) {
    json devices = json::array();
    for (const planner::DeviceSpec& d : c.devices)
      devices.push_back({{"up_mbps", d.link.up_mbps}, {"down_mbps", d.link.down_mbps}, {"time_scale", d.time_scale}});
    return {{"devices", devices},
            {"server_time_scale", c.server_time_scale},
            {"server_per_micro_batch_s", c.server_per_micro_batch_s},
            {"aggregation_s", c.aggregation_s}};
  }
  void load_cluster_basis(const json& basis) {
    const json& devices = basis.at("devices");
    if (devices.size() != cluster_.devices.size()) throw Error(detail::concat("planner state for ", devices.size(), " devices"));
    for (size_t d = 0; d < cluster_.devices.size(); ++d) {
      planner::DeviceSpec& ds = cluster_.devices[d];
      ds.link.up_mbps = devices[d].at("up_mbps").get<double>();
      ds.link.down_mbps = devices[d].at("down_mbps").get<double>();
      ds.time_scale = devices[d].at("time_scale").get<double>();
    }
    cluster_.server_time_scale = basis.at("server_time_scale").get<double>();
    cluster_.server_per_micro_batch_s = basis.value("server_per_micro_batch_s", planner::kServerPerMicroBatchS);
    cluster_.aggregation_s = basis.value("aggregation_s", 0.0);
  }

  // A re-plan is a prediction; the round after it is the measurement. The plan before a change, with
  // its basis, its last round's time per sample and the uplink rates then measured, until the first
  // round under the new plan has been timed (undo_replan_if_worse).
  struct ReplanTrial {
    planner::Plan before;
    json basis;
    double per_sample_s = 0;
    std::vector<double> up_mbps;
  };

  // The first round under a re-planned plan took longer per sample than the last round under the old
  // one (by more than planner::judge_replan's margin), on the same uplinks (within the drift): the cost
  // model misjudged the new plan on this machine. Back to the old plan and its basis, and from then on
  // only drifting links re-plan, not measured speeds (the measurement that misled it). Slower by less:
  // kept, but speeds no longer re-plan either. Returns whether it undid.
  bool undo_replan_if_worse(int r, double per_sample_s, const std::vector<double>& up) {
    if (!trial_) return false;
    const ReplanTrial t = std::move(*trial_);
    trial_.reset();
    bool same_links = up.size() == t.up_mbps.size();
    for (size_t d = 0; same_links && d < up.size(); ++d)
      if (up[d] > 0 && t.up_mbps[d] > 0) same_links = std::abs(up[d] / t.up_mbps[d] - 1) <= 0.2;
    const planner::ReplanVerdict verdict = planner::judge_replan(t.per_sample_s, per_sample_s, same_links);
    if (!verdict.stop_speed_replans) return false;
    const std::string why = detail::concat("round ", r + 1, " under ", plan_.describe(), " took ", per_sample_s * 1e3, " ms per sample, ",
                                           t.per_sample_s * 1e3, " ms under the plan before");
    if (!verdict.undo) {
      if (speed_replans_) say("re-plan kept: " + why + "; from now on only drifting links re-plan");
      speed_replans_ = false;
      return false;
    }
    say("re-plan undone: " + why + " → back to " + t.before.describe() + "; from now on only drifting links re-plan");
    load_cluster_basis(t.basis);
    apply_plan(t.before);
    build_replicas();
    plan_ = t.before;
    predicted_round_s_ = plan_.round_s;
    speed_replans_ = false;
    replans_.push_back({{"after_round", r + 1}, {"reasons", {"undone: " + why}}, {"changed", true}, {"plan", json::parse(plan_.to_json())}});
    return true;
  }

  // At a round boundary: measured link rates and speeds against the plan's; a drift beyond 20%
  // triggers a new search, and a better plan takes effect from the next round (and is undone if that
  // round measures slower than the last under the old plan).
  // A fixed plan is never changed, but its predicted round is re-scored under the measurements, as a
  // re-plan would score it, so that metrics.jsonl's predictions after the first round use them.
  // server_busy_s: the server's kernels and steps in [t0, t_agg) (the aggregation after it).
  void maybe_replan(int r, double t0, double t_agg, double t1, int64_t samples, double server_busy_s) {
    if (!net_.replan || (!auto_plan_ && plan_.split.empty())) return;  // (a fixed plan the cost model could not score)
    // Link rates from the round's paced transfers, where links are shaped (emulated): unshaped, a
    // sender sees only its hand-off to the socket, and the probe before the first round stands.
    std::vector<double> busy(slots_.size(), 0.0), up(slots_.size(), 0.0), down(slots_.size(), 0.0);
    for (size_t d = 0; d < slots_.size(); ++d) {
      const std::string dn = "device " + std::to_string(d);
      busy[d] = trace_.busy_seconds(dn, t0, t1);
      const double up_busy = trace_.busy_seconds(dn + " uplink", t0, t1);
      const uint64_t bytes = server_.stats(tp::routing_id(slots_[d].id)).bytes_received - slots_[d].bytes_up0;
      if (up_busy > 0 && bytes > 0 && net_.uplink_mbps > 0) up[d] = bytes * 8.0 / up_busy / 1e6;
      if (net_.downlink_mbps > 0 && d < down_transfers_.size()) down[d] = planner::measured_mbps(down_transfers_[d]);
    }
    const double per_sample_s = samples > 0 ? (t1 - t0) / static_cast<double>(samples) : 0;
    if (auto_plan_ && undo_replan_if_worse(r, per_sample_s, up)) return;
    planner::Measurement m =
        planner::measurement_from_round(cluster_, plan_, busy, server_busy_s, up, down, 0.1,
                                        cluster_.host_cores > 0 ? 0.0 : std::max(server_overhead_s_, 1e-6));
    m.aggregation_s = std::max(t1 - t_agg, 1e-6);  // averaging the round's weights, measured
    if (!speed_replans_)  // links only (undo_replan_if_worse)
      m.device_time_scale.clear(), m.server_time_scale = 0, m.server_per_micro_batch_s = 0, m.aggregation_s = 0;
    planner::ReplanOptions ro;
    ro.search = search_options_;
    ro.search_plans = auto_plan_;
    const json basis = cluster_basis(cluster_);
    const planner::ReplanDecision d = planner::replan(cluster_, plan_, m, ro);
    cluster_ = d.cluster;
    std::string why;
    for (const auto& reason : d.reasons) why += (why.empty() ? "" : "; ") + reason;
    if (!auto_plan_) {
      if (d.drifted) say(detail::concat("measured: ", why, " → the fixed plan's round predicted ", d.plan.round_s, " s"));
      plan_ = d.plan;
      predicted_round_s_ = plan_.round_s;
      return;
    }
    if (d.drifted) {
      say("re-plan: " + why + (d.changed ? " → " + d.plan.describe() : std::string(" → plan kept")));
      replans_.push_back({{"after_round", r + 1}, {"reasons", d.reasons}, {"changed", d.changed}, {"plan", json::parse(d.plan.to_json())}});
    }
    if (d.changed) {
      if (per_sample_s > 0) trial_ = ReplanTrial{plan_, basis, per_sample_s, up};
      apply_plan(d.plan);
      build_replicas();  // those whose split moved
    }
    plan_ = d.plan;
    predicted_round_s_ = plan_.round_s;
  }

  // The plan for device s (its own split point); round -1: the set-up before the first round.
  tp::Plan make_plan(int r, const DeviceSlot& s) const {
    tp::Plan p;
    p.round = r;
    p.epoch = r;
    p.mode = cfg_.mode;
    p.split_point = static_cast<int32_t>(s.split);
    p.micro_batches = cfg_.micro_batches;
    p.batch_size = cfg_.batch_size;
    p.learning_rate = cfg_.lr;
    p.seed = cfg_.seed;
    json config = config_to_json(cfg_, net_);
    if (dp_accounting()) config["privacy_rounds"] = privacy_rounds_;  // per device, rounds begun before this one
    p.config = config.dump();
    for (const DeviceSlot& o : slots_)
      p.devices.push_back({o.id, o.samples, static_cast<int32_t>(batch_count(o.samples, cfg_.batch_size)),
                           uplink_for_round(r), net_.downlink_mbps});
    return p;
  }

  // --uplink-schedule: the link rate in force from a given round on (emulates a changing network).
  double uplink_for_round(int r) const {
    double rate = net_.uplink_mbps;
    for (const auto& [from, mbps] : net_.uplink_schedule)
      if (r >= from) rate = mbps;
    return rate;
  }

  void start_device(DeviceSlot& s, int r) {
    s.bytes_up0 = server_.stats(tp::routing_id(s.id)).bytes_received;
    s.in_round = true;
    s.done = false;
    s.weights.reset();
    s.end.reset();
    s.stats = {};
    s.micro_done.clear();
    s.rejected = 0;
    s.last_seen = now_seconds();
    // Gradients of a batch a device left unfinished in an earlier round (it was dropped) never reach the
    // next round's first step.
    DeviceSlot& owner = owner_of(s);
    if (owner.replica) Sgd::zero_grad(owner.replica->params());
    if (owner.middle_part) owner.middle_part->reset();
    server_.send(s.id, make_plan(r, s));
    if (dp_accounting()) ++privacy_rounds_[s.id];  // its data leave from now on
    tp::Weights w;
    w.round = r;
    w.part = split_mode() ? tp::WeightsPart::kDevice : tp::WeightsPart::kWhole;
    w.tensors = named_state(*model_, device_ranges(s));
    // A device is silent while its part's weights cross a slow link (its heartbeats queue behind
    // them): down now, up at the round's end. Its silence allowance grows by their time at the
    // round's rates (1.5x), on top of --device-timeout: 44 MB of ResNet18 take 70 s at 5 Mbit/s.
    double bytes = 0;
    for (const tp::NamedTensor& t : w.tensors) bytes += static_cast<double>(t.tensor.bytes());
    const double up = uplink_for_round(r), down = net_.downlink_mbps;
    s.transfer_allowance_s = 1.5 * ((up > 0 ? bytes * 8 / (up * 1e6) : 0) + (down > 0 ? bytes * 8 / (down * 1e6) : 0));
    server_.send(s.id, w);
  }

  // Seconds of silence after which a device in its round is dropped.
  double silence_limit(const DeviceSlot& s) const { return net_.device_timeout_s + s.transfer_allowance_s; }

  // Serves messages until every device in the round is done (or dropped).
  void serve_round(int r) {
    while (true) {
      bool waiting = false;
      for (const DeviceSlot& s : slots_) waiting |= s.in_round && !s.done;
      if (!waiting) return;
      if (stop_requested().load()) throw Error("interrupted");
      heartbeat();
      auto rec = server_.recv(ms(100));
      const double now = now_seconds();
      if (!rec) {
        for (DeviceSlot& s : slots_)
          if (s.in_round && !s.done && now - s.last_seen > silence_limit(s)) drop(s, "silent for too long");
        continue;
      }
      // The loop's own time for a micro-batch (checking, queuing, grouping, sending; its kernels and
      // steps are the trace's "server" spans within): from its message's arrival to the queue's end.
      const bool serves = rec->message.ok() && (std::holds_alternative<tp::Activation>(rec->message.value()) ||
                                                std::holds_alternative<tp::Gradient>(rec->message.value()));
      dispatch(*rec, r, now);
      while (!pending_.empty()) {
        fill_group(r);
        serve_group(r);
      }
      if (serves) serving_s_ += now_seconds() - now;
    }
  }

  // Cross-device batching: whatever else has already arrived joins the next group (no waiting beyond
  // --group-wait-ms, so a slow device never holds the others back). A device's micro-batches arrive
  // back to back: the queue is read until the lanes have a device each, however many of one device's
  // come first (at most kMaxDrain messages; then it trains what it has).
  static constexpr size_t kMaxDrain = 4096;
  void fill_group(int r) {
    const size_t lanes = group_capacity();
    if (lanes < 2) return;
    // Distinct server parts among the queued steps (the largest group they can form now), kept up to
    // date as each message read adds at most one step at the queue's end.
    std::set<const DeviceSlot*> owners;
    for (Pending& p : pending_) owners.insert(&owner_of(*p.slot));
    const double wait_until = now_seconds() + net_.group_wait_ms / 1e3;
    for (size_t taken = 0; taken < kMaxDrain && owners.size() < lanes; ++taken) {
      const double left = wait_until - now_seconds();
      auto more = server_.recv(ms(left > 0 ? static_cast<int64_t>(std::ceil(left * 1e3)) : 0));
      if (!more) break;
      const size_t queued = pending_.size();
      dispatch(*more, r, now_seconds());
      if (pending_.size() > queued) owners.insert(&owner_of(*pending_.back().slot));
    }
  }

  // Trains one group of queued micro-batches: the first of each server part, in arrival order, up to
  // one per lane (a part's later micro-batches, and parts beyond the lanes, wait for the next group);
  // sends each its gradient and steps each part whose batch is complete.
  void serve_group(int r) {
    std::vector<Pending> group;
    std::deque<Pending> later;
    std::set<const DeviceSlot*> owners;
    const size_t lanes = group_capacity();
    for (Pending& p : pending_) {
      if (!p.slot->in_round || p.slot->done) continue;  // dropped while it waited
      const bool joins = owners.size() < lanes && owners.insert(&owner_of(*p.slot)).second;
      (joins ? group.push_back(std::move(p)) : later.push_back(std::move(p)));
    }
    pending_ = std::move(later);
    if (group.empty()) return;
    std::vector<ServerLanes::Item> items(group.size());
    std::vector<Tensor> middle_out(group.size());  // private labels: each middle step's output
    for (size_t i = 0; i < group.size(); ++i) {
      Pending& p = group[i];
      DeviceSlot& owner = owner_of(*p.slot);
      if (p.kind == Pending::kTrain) {
        items[i].part = owner.server_part.get();
        items[i].activation = std::move(p.activation);
        items[i].labels = std::move(p.labels);
        items[i].batch_size = p.batch_len;
        continue;
      }
      MiddlePart* mid = owner.middle_part.get();
      const int64_t key = middle_key(p.batch, p.micro);
      Tensor* out = &middle_out[i];
      const Tensor* in = &p.activation;
      items[i].owner = mid;
      if (p.kind == Pending::kMiddleForward) items[i].work = [mid, key, in, out] { *out = mid->forward(key, *in); };
      else items[i].work = [mid, key, in, out] { *out = mid->backward(key, *in); };
    }
    const double t0 = now_seconds();
    if (stacked()) train_stacked(group, items);
    else lanes_->train(items);
    const double t1 = now_seconds();
    ++groups_;
    grouped_micros_ += group.size();
    for (const ServerLanes::Item& it : items)
      if (it.error) std::rethrow_exception(it.error);  // as a step on the server's own thread would throw
    const std::string of_group = group.size() > 1 ? detail::concat(" (group of ", group.size(), ")") : std::string();
    for (size_t i = 0; i < group.size(); ++i) {
      const Pending& p = group[i];
      DeviceSlot& s = *p.slot;
      if (p.kind == Pending::kMiddleForward) {  // the middle output goes down to the device's tail
        tp::Activation out;
        out.round = r, out.batch = p.batch, out.micro_batch = p.micro, out.device = s.id;
        out.samples = static_cast<int32_t>(middle_out[i].shape().n);
        out.data = std::move(middle_out[i]);
        s.micro_done[p.batch][static_cast<size_t>(p.micro)] = kForwarded;
        trace_.add("server", detail::concat("d", s.id, " b", p.batch, " m", p.micro, " forward", of_group), t0, t1);
        server_.send(s.id, out);
        continue;
      }
      tp::Gradient g;
      g.round = r, g.batch = p.batch, g.micro_batch = p.micro, g.device = s.id;
      if (p.kind == Pending::kTrain) {
        s.stats += items[i].result.stats;
        g.data = std::move(items[i].result.grad);
      } else {
        g.data = std::move(middle_out[i]);  // the cut activation's gradient, from the middle backward
      }
      g.samples = static_cast<int32_t>(g.data.shape().n);
      serve_done(s, owner_of(s), r, g.batch, g.micro_batch, s.micro_done[g.batch]);
      trace_.add("server", detail::concat("d", s.id, " b", g.batch, " m", g.micro_batch,
                                          p.kind == Pending::kTrain ? "" : " backward", of_group), t0, t1);
      server_.send(s.id, g);
    }
  }

  // --server-batching stack: the group's micro-batches (whole server steps, one per replica) by stack,
  // size and batch (a stack's call takes one size and one batch size), each such set in one call.
  void train_stacked(const std::vector<Pending>& group, std::vector<ServerLanes::Item>& items) {
    std::map<std::tuple<ReplicaStack*, int64_t, int64_t>, std::vector<size_t>> sets;
    for (size_t i = 0; i < group.size(); ++i)
      sets[{owner_of(*group[i].slot).stack, items[i].activation.shape().n, items[i].batch_size}].push_back(i);
    for (const auto& [key, members] : sets) {
      ReplicaStack* stack = std::get<0>(key);
      std::vector<ReplicaStack::Item> in;
      for (size_t i : members) in.push_back({owner_of(*group[i].slot).stack_slot, items[i].activation, items[i].labels});
      try {
        std::vector<ServerPart::Result> out = stack->train_micro(in, std::get<2>(key));
        for (size_t j = 0; j < members.size(); ++j) items[members[j]].result = std::move(out[j]);
      } catch (...) {
        for (size_t i : members) items[i].error = std::current_exception();
      }
    }
  }

  void dispatch(tp::Received& rec, int r, double now) {
    if (!rec.message.ok()) {
      ++bad_messages_;
      return;  // the link logged it and answered with an error
    }
    const std::optional<uint32_t> dev = rec.device;
    if (!dev || *dev >= slots_.size()) {
      server_.send(rec.peer, tp::ErrorReply{tp::ErrorCode::kUnexpected, "unknown device"});
      return;
    }
    DeviceSlot& s = slots_[*dev];
    s.last_seen = now;
    std::visit([&](auto& m) { handle(s, r, m, rec.peer); }, rec.message.value());
  }

  // Every connected device hears from the server at least every 2 s, even while it waits for its
  // turn (sl) or for other devices, so a device can tell a slow round from a vanished server.
  void heartbeat() {
    const double now = now_seconds();
    if (now - last_heartbeat_ < 2.0) return;
    last_heartbeat_ = now;
    tp::Heartbeat hb;
    hb.time_ns = static_cast<int64_t>(now * 1e9);
    for (const DeviceSlot& s : slots_)
      if (s.connected) {
        hb.device = s.id;
        server_.send(s.id, hb);
      }
  }

  // Answers a message that breaks the protocol with an error. A device whose messages are rejected
  // more than kMaxRejects times in a round is dropped from it (it may rejoin the next): otherwise a
  // broken or hostile device that keeps talking would hold the round open for ever.
  static constexpr int kMaxRejects = 8;
  void reject(DeviceSlot& s, const tp::PeerId& peer, const std::string& why) {
    ++bad_messages_;
    say("rejected a message from " + peer + ": " + why);
    server_.send(peer, tp::ErrorReply{tp::ErrorCode::kUnexpected, why});
    if (s.in_round && ++s.rejected > kMaxRejects) drop(s, detail::concat(s.rejected, " of its messages rejected"));
  }

  void handle(DeviceSlot& s, int, tp::Hello&, const tp::PeerId&) {
    if (s.in_round && !s.done) {
      // A hello in the middle of its round: the device restarted (or lost this server and found it
      // again), and what it had of this round is gone. It leaves the round now, not after a time-out
      // (its new process's heartbeats would keep it from ever timing out), and rejoins at the next.
      say(detail::concat("device ", s.id, " restarted in the middle of the round; it takes part from the next round"));
      s.in_round = false;
    } else if (!s.connected) {
      say(detail::concat("device ", s.id, " rejoined; it takes part from the next round"));
    }
    s.connected = true;
  }

  void handle(DeviceSlot& s, int r, tp::Activation& a, const tp::PeerId& peer) {
    if (a.labels.defined()) ++labelled_activations_;
    if (!split_mode() || !s.in_round || s.done || a.round != r) return reject(s, peer, detail::concat("unexpected activation for round ", a.round));
    if (a.batch < 0 || a.batch >= batch_count(s.samples, cfg_.batch_size)) return reject(s, peer, detail::concat("batch ", a.batch, " out of range"));
    const int64_t len = batch_len(s.samples, cfg_.batch_size, a.batch);
    const int micros = static_cast<int>(std::min<int64_t>(len, cfg_.micro_batches));
    const Shape4 cut = model_->block_out_shape(s.split - 1);
    const Shape4 xs = a.data.shape();
    if (private_labels() && a.labels.defined())
      return reject(s, peer, detail::concat("activation of batch ", a.batch, " micro-batch ", a.micro_batch,
                                            " carries labels in a --labels private run: labels stay on the device"));
    if (a.micro_batch < 0 || a.micro_batch >= micros || a.samples != xs.n || xs.n < 1 || xs.n > len || xs.c != cut.c ||
        xs.h != cut.h || xs.w != cut.w || a.data.dtype() != DType::kF32 ||
        (!private_labels() && (!a.labels.defined() || a.labels.dtype() != DType::kI32 || a.labels.numel() != xs.n)))
      return reject(s, peer, detail::concat("activation ", xs.str(), " does not fit the cut ", cut.str(), " of batch ", a.batch));
    if (!private_labels())
      for (int32_t y : a.labels.to_ivector())
        if (y < 0 || y >= model_->options().num_classes) return reject(s, peer, detail::concat("label ", y, " out of range"));
    std::vector<char>& state = s.micro_done[a.batch];
    state.resize(static_cast<size_t>(micros), kNone);
    if (state[static_cast<size_t>(a.micro_batch)] != kNone)
      return reject(s, peer, detail::concat("micro-batch ", a.micro_batch, " of batch ", a.batch, " sent twice"));
    // Trained by serve_group, alone or with other devices' micro-batches. Private labels: the middle
    // blocks' output goes down to the device, whose tail computes the loss; the tape stays here until
    // the output's gradient comes back (handle(Gradient)).
    state[static_cast<size_t>(a.micro_batch)] = kQueued;
    if (private_labels())
      pending_.push_back({&s, a.batch, a.micro_batch, len, std::move(a.data), Tensor(), Pending::kMiddleForward});
    else
      pending_.push_back({&s, a.batch, a.micro_batch, len, std::move(a.data), a.labels.reshape({xs.n, 1, 1, 1}), Pending::kTrain});
  }

  // A micro-batch finished on the server; the server part steps once all of its batch's have.
  void serve_done(DeviceSlot& s, DeviceSlot& owner, int r, int32_t batch, int32_t micro, std::vector<char>& state) {
    state[static_cast<size_t>(micro)] = kServed;
    if (std::count(state.begin(), state.end(), kServed) != static_cast<std::ptrdiff_t>(state.size())) return;
    float lr = batch_lr(cfg_, r, s.samples, batch);
    // --server-model shared: the one server-side model steps after every device's batch, K times as
    // often as a per-device replica; at 1/K the rate a round moves it about as far as the K replicas'
    // average would move (measured: at the full rate, 16 devices, train loss 6.5 and 33% test accuracy
    // after 2 epochs, against 1.8 and 52% with replicas).
    if (shared_server() && cfg_.mode != "sl") lr /= static_cast<float>(std::max<size_t>(1, round_devices_));
    const double t0 = now_seconds();
    if (owner.middle_part) owner.middle_part->set_lr(lr), owner.middle_part->step();
    else if (owner.stack) owner.stack->set_lr(lr), owner.stack->step(owner.stack_slot);
    else owner.server_part->set_lr(lr), owner.server_part->step();
    trace_.add("server", detail::concat("d", s.id, " b", batch, " step"), t0, now_seconds());
  }

  // Private labels: the gradient of a middle output, from the device's tail. Back through the middle
  // blocks with the forward's tape; the cut activation's gradient goes down to the device.
  void handle(DeviceSlot& s, int r, tp::Gradient& g, const tp::PeerId& peer) {
    if (!private_labels()) return reject(s, peer, "unexpected message type");
    if (!s.in_round || s.done || g.round != r) return reject(s, peer, detail::concat("unexpected gradient for round ", g.round));
    auto it = s.micro_done.find(g.batch);
    if (it == s.micro_done.end() || g.micro_batch < 0 || g.micro_batch >= static_cast<int>(it->second.size()) ||
        it->second[static_cast<size_t>(g.micro_batch)] != kForwarded)
      return reject(s, peer, detail::concat("gradient for batch ", g.batch, " micro-batch ", g.micro_batch,
                                            ", whose middle output is not awaiting one"));
    DeviceSlot& owner = owner_of(s);
    const int64_t key = middle_key(g.batch, g.micro_batch);
    const Shape4* want = owner.middle_part->pending(key);
    if (!want) return reject(s, peer, detail::concat("gradient for batch ", g.batch, " micro-batch ", g.micro_batch, " that is not in flight"));
    if (!(g.data.shape() == *want) || g.data.dtype() != DType::kF32 || g.samples != want->n)
      return reject(s, peer, detail::concat("gradient ", g.data.shape().str(), " of batch ", g.batch, " micro-batch ",
                                            g.micro_batch, " does not fit the middle output ", want->str()));
    it->second[static_cast<size_t>(g.micro_batch)] = kQueued;  // its backward runs in serve_group
    pending_.push_back({&s, g.batch, g.micro_batch, 0, std::move(g.data), Tensor(), Pending::kMiddleBackward});
  }

  void handle(DeviceSlot& s, int r, tp::Weights& w, const tp::PeerId& peer) {
    const tp::WeightsPart want = split_mode() ? tp::WeightsPart::kDevice : tp::WeightsPart::kWhole;
    if (!s.in_round || w.round != r || w.part != want) return reject(s, peer, "unexpected weights");
    try {
      unpack_state(*model_, device_ranges(s), w);
    } catch (const Error& e) {
      return reject(s, peer, e.what());
    }
    s.weights = std::move(w);
    s.done = s.weights && s.end;
  }

  void handle(DeviceSlot& s, int r, tp::RoundEnd& e, const tp::PeerId& peer) {
    if (!s.in_round || e.round != r) return reject(s, peer, "unexpected round end");
    s.end = std::move(e);
    s.done = s.weights && s.end;
  }

  template <class M>
  void handle(DeviceSlot& s, int, M&, const tp::PeerId& peer) {
    if constexpr (!std::is_same_v<M, tp::Heartbeat>) reject(s, peer, "unexpected message type");
  }

  void drop(DeviceSlot& s, const std::string& why) {
    say(detail::concat("device ", s.id, " dropped from this round: ", why, "; the round goes on without it"));
    s.in_round = false;
    s.connected = false;
    s.done = false;
  }

  void run_round(int r) {
    const double t0 = now_seconds();
    const auto stats0 = server_.total_stats();
    std::vector<DeviceSlot*> active;
    for (DeviceSlot& s : slots_) s.in_round = false;
    // What came between rounds first (a device restarted meanwhile says hello), so that a hello is never
    // taken for one from the middle of the round it is about to get.
    while (auto rec = server_.recv(ms(0))) dispatch(*rec, r, now_seconds());
    for (DeviceSlot& s : slots_)
      if (s.connected) active.push_back(&s);
    if (active.empty()) throw Error("no device is connected");
    if (dp_accounting()) write_privacy_journal(r, active);
    round_devices_ = active.size();
    groups_ = grouped_micros_ = 0;
    serving_s_ = 0;
    if (cfg_.mode == "sl") {
      // Devices take turns; each starts from the device part its predecessor trained. (Private labels:
      // the tail's weights pass on too, but its momentum stays with each device, as the front's does,
      // where shared labels keep one momentum on the one server part: equal runs need --momentum 0.)
      for (DeviceSlot* s : active) {
        start_device(*s, r);
        serve_round(r);
        if (s->done) load_state(*model_, unpack_state(*model_, device_ranges(*s), *s->weights), device_ranges(*s));
        s->in_round = s->done;  // keep it in this round's statistics
      }
    } else {
      for (DeviceSlot* s : active) start_device(*s, r);
      if (stacked()) load_stacks();  // after start_device has zeroed what a dropped device left
      serve_round(r);
      if (stacked()) store_stacks();
    }
    const double t_agg = now_seconds();
    const double server_busy_s = trace_.busy_seconds("server", t0, t_agg);  // its kernels and steps this round
    // The server's time per micro-batch beyond its kernels and steps, measured: from the next plan on,
    // the cost model's Cluster::server_per_micro_batch_s, in place of the prior kServerPerMicroBatchS.
    // Not where the devices share the server's cores (pipar train): there a micro-batch costs the host
    // the messaging threads of every process too, which this loop's time does not see (VGG5 at 50
    // Mbit/s, 4 devices on 2 cores: with the loop's 0.1 ms the planner picked N=64 at 1.16x the best
    // grid point; with the prior's 1.5 ms, 1.02x).
    server_overhead_s_ = grouped_micros_ == 0 ? 0.0
                                              : std::max(0.0, serving_s_ - server_busy_s) /
                                                    static_cast<double>(grouped_micros_);
    aggregate();
    const double t1 = now_seconds();
    trace_.add("server", "aggregate", t_agg, t1);
    collect_traces();
    const RoundPlan used{split_json(), cfg_.micro_batches, predicted_round_s_};  // this round's, for its metrics line
    int64_t samples = 0;
    for (const DeviceSlot& s : slots_)
      if (s.in_round && s.done && s.end) samples += s.end->samples;
    maybe_replan(r, t0, t_agg, t1, samples, server_busy_s);  // the next round's plan, part of the checkpoint
    save_round(r);  // before the metrics line: a line then always has its checkpoint, and a resume never redoes a round
    record_round(r, t0, t1, stats0, used);
  }

  struct RoundPlan {
    json split;
    int micro_batches;
    double predicted_s;
  };

  // The round's downlink transfers (seen here) and the devices' compute and uplink (their reports) into
  // the trace, for the metrics and the re-planner.
  void collect_traces() {
    down_transfers_.assign(slots_.size(), {});
    for (const auto& t : server_.take_transfers())
      if (t.ok && t.type != tp::MessageType::kHeartbeat) {
        const uint32_t d = tp::device_of(t.peer).value_or(999);
        trace_.add("device " + std::to_string(d) + " downlink", tp::message_type_name(t.type), seconds_of(t.started),
                   seconds_of(t.finished));
        if (d < down_transfers_.size())
          down_transfers_[d].push_back({static_cast<double>(t.bytes), seconds_of(t.finished) - seconds_of(t.started)});
      }
    for (DeviceSlot& s : slots_)
      if (s.in_round && s.done && s.end) trace_.add_all(events_from_json(s.end->details));
  }

  // The state of the whole model (as copy_state orders it) that device s trained this round: its device
  // part from its weights message, the rest from its server-side replica. The device part goes into the
  // replica's copies of those blocks, which its server part never touches.
  std::vector<Tensor> trained_state(DeviceSlot& s) {
    std::vector<Tensor> dev = unpack_state(*model_, device_ranges(s), *s.weights);
    if (!split_mode()) return dev;  // fl: the whole model
    Model& replica = *owner_of(s).replica;
    kernels::ScopedCudaDevice on_gpu(gpu_of(owner_of(s)));
    load_state(replica, dev, device_ranges(s));
    return copy_state(replica);
  }

  // The GPU of slot s's replica: -1 (the current one) on the CPU or with one GPU unnamed; with --gpus,
  // the devices' replicas dealt round-robin over the GPUs named.
  int gpu_of(const DeviceSlot& s) const { return gpus_.empty() ? -1 : gpus_[rank_of(s)]; }
  size_t rank_of(const DeviceSlot& s) const {  // its GPU's place in gpus_ (its NCCL rank)
    return static_cast<size_t>(&s - slots_.data()) % std::max<size_t>(1, gpus_.size());
  }

  // FedAvg on the GPUs (NCCL) applies where every replica holds the same blocks: per-device replicas
  // (sfl, pipar) cut at one split point, on CUDA with NCCL built.
  bool gpu_average() {
    if (server_device_ != Device::kCuda || shared_server() || !split_mode()) return false;
    for (const DeviceSlot& s : slots_)
      if (!s.replica || s.split != slots_[0].split) return false;
    if (!gpu_group_ && gpu_group_error_.empty()) {
      std::vector<int> gpus;
      for (int g : gpus_) gpus.push_back(g >= 0 ? g : 0);
      try {
        gpu_group_ = std::make_unique<kernels::GpuGroup>(gpus);
        say(detail::concat("FedAvg of the server-side blocks on the GPU", gpus.size() > 1 ? "s" : "", " through NCCL (",
                           gpus.size(), " rank", gpus.size() > 1 ? "s" : "", ")"));
      } catch (const Error& e) {
        gpu_group_error_ = e.what();
        say("FedAvg on the host: " + gpu_group_error_);
      }
    }
    return gpu_group_ != nullptr;
  }

  // The server-side blocks [P, server_end()) averaged on the GPUs in place (every replica, those of
  // devices that missed the round too, gets the average), the device-side blocks on the host from the
  // weights messages; the averaged model gathers both, and every replica the device-side average.
  void aggregate_on_gpus(double total) {
    const size_t p = slots_[0].split, e = server_end();
    FedAvg dev(total);
    for (DeviceSlot& s : slots_)
      if (s.in_round && s.done) {
        dev.add(unpack_state(*model_, device_ranges(s), *s.weights), static_cast<double>(s.samples));
        s.weights.reset();
      }
    const std::vector<Tensor> dev_avg = dev.result();
    std::vector<std::vector<std::vector<Tensor*>>> replicas(gpu_group_->gpus().size());
    std::vector<std::vector<double>> weights(replicas.size());
    for (DeviceSlot& s : slots_) {
      replicas[rank_of(s)].push_back(state_tensors(*s.replica, p, e));
      weights[rank_of(s)].push_back(s.in_round && s.done ? static_cast<double>(s.samples) : 0.0);
    }
    fedavg_on_gpus(*gpu_group_, replicas, weights);
    load_state(*model_, dev_avg, device_ranges(slots_[0]));
    {
      kernels::ScopedCudaDevice on_gpu(gpu_of(slots_[0]));
      load_state(*model_, copy_state(*slots_[0].replica, p, e), p, e);
    }
    for (DeviceSlot& s : slots_) {
      kernels::ScopedCudaDevice on_gpu(gpu_of(s));
      load_state(*s.replica, dev_avg, device_ranges(s));
    }
  }

  // FedAvg, block by block over the whole model, weighted by sample counts: each device's block comes
  // from wherever that device trained it (its device part or its server-side replica), so devices that
  // split at different blocks average alike. Every replica then starts the next round from the average.
  // One device's state at a time (FedAvg): the server never holds all K.
  void aggregate() {
    double total = 0;
    for (const DeviceSlot& s : slots_)
      if (s.in_round && s.done) total += static_cast<double>(s.samples);
    if (!(total > 0)) throw Error("no device finished the round");
    const size_t blocks = model_->num_blocks();
    if (cfg_.mode == "sl") {  // the devices' part was handed on in turn (run_round); the one server part
      DeviceSlot& s = slots_[0];
      kernels::ScopedCudaDevice on_gpu(gpu_of(s));
      load_state(*model_, copy_state(*s.replica, s.split, server_end()), s.split, server_end());
      return;
    }
    // Private labels: the device part includes the last block, so the model evaluated and saved here
    // has the devices' averaged tail; the replicas' copies of it are never trained.
    if (gpu_average()) {
      aggregate_on_gpus(total);
      malloc_trim(0);
      return;
    }
    FedAvg acc(total);
    for (DeviceSlot& s : slots_)
      if (s.in_round && s.done) {
        acc.add(trained_state(s), static_cast<double>(s.samples));
        s.weights.reset();  // its message is spent
      }
    const std::vector<Tensor> avg = acc.result();
    load_state(*model_, avg, 0, blocks);
    for (DeviceSlot& s : slots_)
      if (s.replica) {
        kernels::ScopedCudaDevice on_gpu(gpu_of(s));
        load_state(*s.replica, avg, 0, blocks);
      }
    malloc_trim(0);  // K states' copies and the replaced tensors: back to the system
  }

  void record_round(int r, double t0, double t1, const tp::LinkStats& stats0, const RoundPlan& used) {
    LossStats train;
    double epsilon = -1;  // differential privacy: the largest epsilon a device reports
    json dev_busy = json::array(), dev_idle = json::array();
    std::vector<std::string> resources = {"server"};
    for (DeviceSlot& s : slots_) {
      const std::string dn = "device " + std::to_string(s.id);
      if (s.in_round && s.done && s.end) {
        // Private labels: only the devices see the loss; they report it with their round's end.
        train += split_mode() && !private_labels() ? s.stats : LossStats{s.end->loss_sum, s.end->correct, s.end->samples};
        if (auto e = s.end->stats.find("epsilon"); e != s.end->stats.end()) epsilon = std::max(epsilon, e->second);
      }
      const double busy = trace_.busy_seconds(dn, t0, t1);
      dev_busy.push_back(busy);
      dev_idle.push_back(std::max(0.0, (t1 - t0) - busy));
      for (const char* suffix : {"", " uplink", " downlink"}) resources.push_back(dn + suffix);
    }
    const double round_s = t1 - t0;
    const double server_busy = trace_.busy_seconds("server", t0, t1);
    double busiest = 0;
    std::string bottleneck;
    for (const auto& res : resources) {
      const double b = trace_.busy_seconds(res, t0, t1);
      if (b > busiest) busiest = b, bottleneck = res;
    }
    const auto stats1 = server_.total_stats();
    const double e0 = now_seconds();
    Context ctx;
    const LossStats ev = evaluate(*model_, test_, cfg_.batch_size, ctx);
    const EpochMetrics m = epoch_metrics(r + 1, train, ev, round_s, now_seconds() - e0);
    result_.epochs.push_back(m);
    result_.train_seconds += round_s;
    result_.test_accuracy = m.test_accuracy;
    json line = {{"epoch", m.epoch},
                 {"round", r},
                 {"train_loss", m.train_loss},
                 {"train_accuracy", m.train_accuracy},
                 {"test_loss", m.test_loss},
                 {"test_accuracy", m.test_accuracy},
                 {"round_seconds", round_s},
                 {"eval_seconds", m.eval_seconds},
                 {"samples", m.samples},
                 {"server_busy_seconds", server_busy},
                 {"server_idle_seconds", std::max(0.0, round_s - server_busy)},
                 {"device_busy_seconds", dev_busy},
                 {"device_idle_seconds", dev_idle},
                 {"bytes_up", stats1.bytes_received - stats0.bytes_received},
                 {"bytes_down", stats1.bytes_sent - stats0.bytes_sent},
                 {"pipeline_efficiency", round_s > 0 ? busiest / round_s : 0.0},
                 {"bottleneck", bottleneck},
                 {"bad_messages", bad_messages_}};
    if (split_mode()) {
      line["labels"] = cfg_.labels;
      line["labelled_activations"] = labelled_activations_;  // received over the run; private: must stay 0
      line["split"] = used.split;
      line["micro_batches"] = used.micro_batches;
      line["uplink_mbps"] = uplink_for_round(r);
      line["server_overhead_seconds_per_micro_batch"] = server_overhead_s_;  // beyond its kernels and steps
      if (lanes_) {  // cross-device batching: groups trained and their mean size
        line["server_lanes"] = lanes_->lanes();
        line["server_groups"] = groups_;
        line["mean_group_size"] = groups_ ? static_cast<double>(grouped_micros_) / static_cast<double>(groups_) : 0.0;
      }
      if (server_device_ == Device::kCuda) {  // CUDA graphs, over the run: captured, replayed, or why off
        int64_t captures = 0, replays = 0;
        std::string off;
        for (const DeviceSlot& s : slots_)
          if (s.server_part) {
            const ServerPart::GraphStats& g = s.server_part->graph_stats();
            captures += g.captures, replays += g.replays;
            if (off.empty()) off = g.off_reason;
          }
        line["graph_captures"] = captures;
        line["graph_replays"] = replays;
        if (cfg_.cuda_graphs && !off.empty()) {
          line["graphs_off"] = off;
          if (!graphs_off_said_) say("CUDA graphs off: " + off), graphs_off_said_ = true;
        }
      }
    }
    if (predicted_) line["predicted_round_seconds"] = used.predicted_s;  // the cost model's, for this round's plan
    if (epsilon >= 0) line["epsilon"] = epsilon;
    int finished = 0;
    for (const DeviceSlot& s : slots_) finished += s.in_round && s.done;
    line["devices_finished"] = finished;
    metrics_ << line.dump() << "\n";
    metrics_.flush();
    rounds_.push_back(line);
    if (progress_) progress_->on_epoch(m, cfg_.epochs);
    say(detail::concat("  round ", r + 1, ": ", round_s, " s, server busy ", server_busy, " s, pipeline efficiency ",
                       line["pipeline_efficiency"].get<double>(), " (bottleneck: ", bottleneck, "), up ",
                       line["bytes_up"].get<uint64_t>() / 1e6, " MB, down ", line["bytes_down"].get<uint64_t>() / 1e6, " MB"));
  }

  // Tells every device that training is over and waits, at most kGoodbyeS, for each connected one's
  // goodbye (a heartbeat marked kGoodbye; its link's periodic heartbeats may come before). ZeroMQ
  // sends from threads that die with this process: a server that exited at once could take the last
  // messages to its devices with it, and they would wait out their time-outs and report an error.
  static constexpr double kGoodbyeS = 5.0;
  void finish() {
    tp::Plan done;
    done.finished = true;
    done.config = config_to_json(cfg_, net_).dump();
    std::set<uint32_t> waiting;
    for (DeviceSlot& s : slots_) {
      server_.send(s.id, done);
      if (s.connected) waiting.insert(s.id);
    }
    server_.flush(ms(5000));
    const double deadline = now_seconds() + kGoodbyeS;
    while (!waiting.empty() && now_seconds() < deadline) {
      auto rec = server_.recv(ms(50));
      if (!rec || !rec->message.ok() || !rec->device) continue;
      if (const auto* hb = std::get_if<tp::Heartbeat>(&rec->message.value()); hb && hb->time_ns == tp::Heartbeat::kGoodbye)
        waiting.erase(*rec->device);
    }
    trace_.write_chrome_json(result_.out_dir + "/trace.json", origin_);
  }

  void write_summary() {
    json s = config_to_json(cfg_, net_);
    s.erase("data_dir");
    s["dataset"] = train_.name;
    s["model"] = model_->name();
    s["split"] = split_json();
    s["uplink_mbps"] = net_.uplink_mbps;
    s["downlink_mbps"] = net_.downlink_mbps;
    s["test_accuracy"] = result_.test_accuracy;
    s["train_seconds"] = result_.train_seconds;
    s["wall_seconds"] = result_.wall_seconds;
    double sb = 0, si = 0, up = 0, down = 0, eff = 0;
    std::vector<double> db(slots_.size(), 0), di(slots_.size(), 0);
    for (const json& r : rounds_) {
      sb += r["server_busy_seconds"].get<double>();
      si += r["server_idle_seconds"].get<double>();
      up += r["bytes_up"].get<double>();
      down += r["bytes_down"].get<double>();
      eff += r["pipeline_efficiency"].get<double>() * r["round_seconds"].get<double>();
      for (size_t d = 0; d < slots_.size(); ++d) {
        db[d] += r["device_busy_seconds"][d].get<double>();
        di[d] += r["device_idle_seconds"][d].get<double>();
      }
    }
    s["server_busy_seconds"] = sb;
    s["server_idle_seconds"] = si;
    s["device_busy_seconds"] = db;
    s["device_idle_seconds"] = di;
    s["bytes_up"] = up;
    s["bytes_down"] = down;
    s["pipeline_efficiency"] = result_.train_seconds > 0 ? eff / result_.train_seconds : 0.0;
    json per = json::array();
    for (const auto& m : result_.epochs) per.push_back(m.train_seconds);
    s["epoch_seconds"] = per;
    s["epochs_completed"] = result_.epochs.size();
    s["threads"] = kernels::num_threads();
    s["server_backend"] = device_name(server_device_);
    if (server_device_ == Device::kCuda) s["kernels"] = cfg_.kernels;
    s["params"] = model_->param_count();
    if (const int64_t peak = peak_rss_bytes(); peak > 0) s["server_peak_rss_bytes"] = peak;  // this process's, so far
    if (predicted_) {  // the first round's plan as the cost model scored it (chosen or fixed)
      s["predicted_round_seconds"] = first_plan_.round_s;
      s["predicted_plan"] = json::parse(first_plan_.to_json());
    }
    json links = json::array();  // the links as the probe before the first round measured them
    for (const DeviceSlot& d : slots_)
      if (d.probed)
        links.push_back({{"device", d.id}, {"up_mbps", d.probed->up_mbps}, {"down_mbps", d.probed->down_mbps},
                         {"latency_ms", d.probed->latency_s * 1e3}});
    if (!links.empty()) s["link_probe"] = {{"seconds", probe_s_}, {"links", links}};
    if (split_mode() && !shared_server()) s["server_batching"] = cfg_.server_batching;  // lanes or stack (auto's choice)
    if (auto_plan_) {
      s["plan"] = json::parse(plan_.to_json());
      s["replans"] = replans_;
    }
    std::ofstream f(result_.out_dir + "/summary.json");
    f << s.dump(2) << "\n";
  }

  TrainConfig cfg_;
  NetConfig net_;
  ProgressSink* progress_;
  tp::Server server_;
  data::Dataset train_, test_;
  std::unique_ptr<Model> model_;
  std::vector<DeviceSlot> slots_;
  Trace trace_;
  double origin_ = 0;
  std::ofstream metrics_;
  std::vector<json> rounds_;
  uint64_t bad_messages_ = 0;
  uint64_t labelled_activations_ = 0;  // activations that arrived carrying labels (accepted or not)
  TrainResult result_;
  bool auto_plan_ = false;
  double last_heartbeat_ = 0;
  int first_round_ = 0;
  planner::Cluster cluster_;
  planner::Plan plan_;
  planner::Plan first_plan_;  // the first round's, as predicted
  bool predicted_ = false;    // plan_ has a predicted round time (split modes with device profiles)
  planner::SearchOptions search_options_;
  double predicted_round_s_ = 0;
  std::vector<json> replans_;
  std::optional<ReplanTrial> trial_;  // a re-plan awaiting its first round's time
  size_t round_devices_ = 1;          // devices that began the current round
  bool speed_replans_ = true;         // measured speeds may re-plan (false once such a re-plan was undone)
  // --load: the checkpoint's metadata "extra" and state records (cleared once used); resumed_: it was
  // written by a run of this mode, so its optimizer, plan and privacy state apply.
  json resume_ = json::object();
  std::vector<CheckpointState> resume_state_;
  bool resumed_ = false;
  std::vector<int64_t> privacy_rounds_;  // differential privacy: per device, rounds begun (dp_accounting)
  // Cross-device batching: the lanes that train queued micro-batches side by side (checkpointed), the
  // queue, and the groups trained (and their micro-batches) in the current round.
  std::unique_ptr<ServerLanes> lanes_;
  Device server_device_ = Device::kCpu;  // where the server-side parts train (--backend)
  std::vector<int> gpus_;                // CUDA: the GPUs the replicas are dealt over ({-1}: the current one)
  std::unique_ptr<kernels::GpuGroup> gpu_group_;  // NCCL FedAvg of the server-side blocks, once set up
  std::string gpu_group_error_;                   // why FedAvg stays on the host (NCCL could not start)
  bool graphs_off_said_ = false;         // the reason CUDA graphs went off was logged
  std::deque<Pending> pending_;
  uint64_t groups_ = 0, grouped_micros_ = 0;
  // This round: the loop's time on the micro-batches it served (serve_round; with --group-wait-ms, the
  // waits for a group to fill count too).
  double serving_s_ = 0;
  double probe_s_ = 0;  // how long the link probe took before the first round
  std::vector<std::vector<std::pair<double, double>>> down_transfers_;  // this round's, per device: (bytes, seconds)
  double server_overhead_s_ = 0;  // the last round's: that time less the kernels' and steps', per micro-batch
  // --server-batching stack: the replicas in stacks of up to kServerStackMax, in slot order.
  std::vector<std::unique_ptr<ReplicaStack>> stacks_;
};

}  // namespace

TrainResult run_server(const TrainConfig& cfg, const NetConfig& net, ProgressSink* progress,
                       const std::function<void(const std::string&)>& on_bound) {
  scheduled_lr(cfg, 0, 1);  // an unknown learning-rate schedule fails before devices are waited for
  ServerRunner runner(cfg, net, progress);
  if (on_bound) on_bound(runner.endpoint());
  return runner.run();
}

int run_device(const DeviceOptions& options) {
  try {
    DeviceRunner runner(options);
    return runner.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "device %u: error: %s\n", options.id, e.what());
    return 1;
  }
}

TrainResult train_distributed(const TrainConfig& cfg, const NetConfig& net, ProgressSink* progress,
                              const std::string& self_exe, int device_threads) {
  std::vector<pid_t> children;
  auto spawn = [&](const std::string& endpoint) {
    for (int d = 0; d < cfg.devices; ++d) {
      // Loopback children: plain links, said explicitly; their server lives and dies with this process,
      // so they do not wait for it to come back, and die with it.
      std::vector<std::string> args = {self_exe, "device", "--connect", endpoint, "--id", std::to_string(d),
                                       "--threads", std::to_string(device_threads), "--insecure", "--reconnect", "0"};
      const pid_t pid = fork();
      if (pid < 0) throw Error(std::string("fork failed: ") + std::strerror(errno));
      if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        execv(self_exe.c_str(), argv.data());
        std::fprintf(stderr, "exec %s failed: %s\n", self_exe.c_str(), std::strerror(errno));
        _exit(127);
      }
      children.push_back(pid);
    }
  };
  auto reap = [&](bool kill_them) {
    for (pid_t pid : children) {
      if (pid <= 0) continue;
      int status = 0;
      for (int i = 0; i < 100 && waitpid(pid, &status, WNOHANG) == 0; ++i) {
        if (kill_them || i == 50) kill(pid, SIGTERM);
        std::this_thread::sleep_for(ms(50));
      }
      if (waitpid(pid, &status, WNOHANG) == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
      }
    }
    children.clear();
  };
  NetConfig n = net;
  n.launched_device_threads = device_threads > 0 ? device_threads : kernels::hardware_threads();
  n.launched_devices_failed = [&]() -> std::string {
    for (size_t d = 0; d < children.size(); ++d) {
      int status = 0;
      if (children[d] > 0 && waitpid(children[d], &status, WNOHANG) == children[d]) {
        children[d] = -1;  // reaped
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
          return detail::concat("device process ", d, " exited early (",
                                WIFEXITED(status) ? "code " + std::to_string(WEXITSTATUS(status))
                                                  : "signal " + std::to_string(WTERMSIG(status)),
                                "); its error is printed above");
      }
    }
    return "";
  };
  try {
    TrainResult r = run_server(cfg, n, progress, spawn);
    reap(false);
    return r;
  } catch (...) {
    reap(true);
    throw;
  }
}

}  // namespace pipar
