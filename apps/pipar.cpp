// pipar: the command-line program. `pipar train` trains (local mode now; the distributed modes come
// with the transport), `pipar models` lists the model zoo with split points, `pipar devices` the
// backends found.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <optional>
#include <sstream>

#include "kernels/device.h"
#include "kernels/parallel.h"
#include "planner/search.h"
#include "runtime/lanes.h"
#include "runtime/replica_stack.h"
#include "runtime/modes/distributed.h"
#include "runtime/trainer.h"

using namespace pipar;

namespace {

// --- progress on stderr: a redrawn bar on a terminal, plain lines otherwise -------------------------
class ProgressBar : public ProgressSink {
 public:
  ProgressBar() : tty_(isatty(STDERR_FILENO) != 0) {}
  void on_start(const std::string& d) override { std::fprintf(stderr, "%s\n", d.c_str()); }
  void on_batch(int epoch, int epochs, int64_t batch, int64_t batches, int64_t samples, double seconds, double loss,
                double acc) override {
    const double rate = seconds > 0 ? samples / seconds : 0;
    const double eta = batch > 0 ? seconds / batch * (batches - batch) : 0;
    if (tty_) {
      const int width = 30;
      const int filled = static_cast<int>(width * batch / std::max<int64_t>(1, batches));
      std::string bar(filled, '#');
      bar.resize(width, '.');
      std::fprintf(stderr, "\repoch %d/%d [%s] %3d%% %6.0f samples/s  loss %.4f  acc %5.2f%%  ETA %4.0fs ", epoch, epochs,
                   bar.c_str(), static_cast<int>(100 * batch / std::max<int64_t>(1, batches)), rate, loss, 100 * acc, eta);
      std::fflush(stderr);
      return;
    }
    // Not a terminal: a line every 10% of an epoch.
    const int64_t step = std::max<int64_t>(1, batches / 10);
    if (batch % step == 0 || batch == batches)
      std::fprintf(stderr, "epoch %d/%d batch %lld/%lld  %.0f samples/s  loss %.4f  acc %.2f%%  ETA %.0fs\n", epoch,
                   epochs, static_cast<long long>(batch), static_cast<long long>(batches), rate, loss, 100 * acc, eta);
  }
  void on_epoch(const EpochMetrics& m, int epochs) override {
    if (tty_) std::fprintf(stderr, "\n");
    std::fprintf(stderr,
                 "epoch %d/%d done: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%% | %.1f s (%.0f samples/s), "
                 "eval %.1f s\n",
                 m.epoch, epochs, m.train_loss, 100 * m.train_accuracy, m.test_loss, 100 * m.test_accuracy,
                 m.train_seconds, m.samples_per_second, m.eval_seconds);
  }
  void on_message(const std::string& line) override {
    if (tty_) std::fprintf(stderr, "\n");
    std::fprintf(stderr, "%s\n", line.c_str());
  }

 private:
  bool tty_;
};

void on_signal(int) { stop_requested() = true; }

std::string human_bytes(double b) {
  char buf[32];
  if (b >= 1 << 20) std::snprintf(buf, sizeof buf, "%.2f MiB", b / (1 << 20));
  else if (b >= 1 << 10) std::snprintf(buf, sizeof buf, "%.1f KiB", b / (1 << 10));
  else std::snprintf(buf, sizeof buf, "%.0f B", b);
  return buf;
}

Shape4 dataset_input(const std::string& ds) {
  if (ds == "cifar10" || ds == "synthetic-cifar") return {1, 3, 32, 32};
  if (ds == "fmnist" || ds == "fashion-mnist" || ds == "mnist" || ds == "synthetic") return {1, 1, 28, 28};
  throw Error("unknown data set '" + ds + "' (fmnist, mnist, cifar10, synthetic, synthetic-cifar)");
}

int cmd_models(const std::string& only, const std::string& dataset, const std::string& norm, int batch) {
  ModelOptions o;
  o.input = dataset_input(dataset);
  o.batch_norm = norm != "none";
  for (const std::string& name : model_names()) {
    if (!only.empty() && only != name) continue;
    auto m = build_model(name, o);
    std::printf("%s — %zu blocks, %lld parameters, input %s, %.1f MFLOP forward per sample\n", name.c_str(),
                m->num_blocks(), static_cast<long long>(m->param_count()), o.input.str().c_str(),
                m->forward_flops() / 1e6);
    std::printf("  %-5s %-10s %-16s %12s %14s %14s  %s\n", "block", "kind", "output", "params", "cut activation",
                ("x batch " + std::to_string(batch)).c_str(), "layers");
    int64_t cumulative = 0;
    for (size_t i = 0; i < m->num_blocks(); ++i) {
      const Shape4 s = m->block_out_shape(i);
      const int64_t p = m->param_count(i, i + 1);
      cumulative += p;
      const std::string cut = i + 1 < m->num_blocks() ? human_bytes(s.numel() * 4.0) : "-";
      const std::string cutb = i + 1 < m->num_blocks() ? human_bytes(s.numel() * 4.0 * batch) : "-";
      std::ostringstream shape;
      shape << s.c << "x" << s.h << "x" << s.w;
      std::printf("  %-5zu %-10s %-16s %12lld %14s %14s  %s\n", i + 1, m->block(i).kind.c_str(), shape.str().c_str(),
                  static_cast<long long>(p), cut.c_str(), cutb.c_str(), m->block(i).body->describe().c_str());
    }
    std::printf("  (split point P cuts after block P: the device runs blocks 1..P and sends the cut activation)\n\n");
  }
  if (!only.empty()) {
    bool found = false;
    for (const auto& n : model_names()) found |= n == only;
    if (!found) build_model(only, o);  // throws the list of known models
  }
  return 0;
}

int cmd_devices() {
  std::printf("CPU: %d hardware threads, vector ISA %s\n", kernels::hardware_threads(),
              kernels::isa_name(kernels::cpu_isa()));
  if (!kernels::cuda_built()) {
    std::printf("CUDA: not built (%s)\n", kernels::cuda_unavailable_reason().c_str());
    return 0;
  }
  const std::string why = kernels::cuda_unavailable_reason();
  if (!why.empty()) std::printf("CUDA: built, %s\n", why.c_str());
  else std::printf("CUDA: %d device(s)%s\n", kernels::cuda_device_count(), kernels::cuda_ops_built() ? "" : " (CUDA kernels not built yet)");
  for (const std::string& d : kernels::cuda_devices()) std::printf("  %s\n", d.c_str());
  const std::string nccl = kernels::nccl_version();
  std::printf("NCCL: %s\n", nccl.empty() ? "not built (a multi-GPU server averages on the host)" : nccl.c_str());
  if (!why.empty()) return 0;
  const std::string path = kernels::cuda_kernel_cache_path();
  const std::vector<std::string> chosen = kernels::cuda_kernel_choices();
  std::printf("kernels: %s (--kernels / PIPAR_KERNELS); cache %s: %zu choice(s) for this GPU\n",
              kernels::cuda_kernels().c_str(), path.empty() ? "in memory only" : path.c_str(), chosen.size());
  for (const std::string& c : chosen) std::printf("  %s\n", c.c_str());
  return 0;
}

// A whole number of at least 1 (split point, micro-batch count), or a clear error naming the option.
int parse_count(const char* option, const std::string& text) {
  size_t used = 0;
  int v = 0;
  try {
    v = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || v < 1)
    throw Error(std::string(option) + ": expected a whole number of at least 1 (or auto), got '" + text + "'");
  return v;
}

std::vector<std::pair<int, double>> parse_schedule(const std::string& text) {
  std::vector<std::pair<int, double>> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto colon = item.find(':');
    if (colon == std::string::npos) throw Error("--uplink-schedule: expected ROUND:MBPS, got '" + item + "'");
    out.emplace_back(std::stoi(item.substr(0, colon)), std::stod(item.substr(colon + 1)));
  }
  return out;
}

struct SecurityArgs {
  std::string keys, allow, server_key;
  bool insecure = false;
};

// Outside `pipar train`'s loopback runs, links are CURVE-encrypted and authenticated unless the
// user asks for plain links in so many words.
std::optional<transport::Security> server_security(const SecurityArgs& a) {
  if (a.insecure) {
    std::fprintf(stderr, "%s\n", transport::plain_warning());
    return std::nullopt;
  }
  if (a.keys.empty() || a.allow.empty())
    throw Error("pipar server needs --keys SERVER.key and --allow DEVICES.txt (make keys with pipar keygen), or --insecure");
  transport::Security s;
  s.keys = transport::read_keypair(a.keys);
  s.allow = transport::read_allow_list(a.allow);
  return s;
}

std::optional<transport::Security> device_security(const SecurityArgs& a, const std::string& endpoint) {
  if (a.insecure) {
    // `pipar train` runs its devices on loopback with plain links: no warning for those.
    const bool loopback = endpoint.rfind("tcp://127.", 0) == 0 || endpoint.rfind("tcp://localhost:", 0) == 0 ||
                          endpoint.rfind("ipc://", 0) == 0 || endpoint.rfind("inproc://", 0) == 0;
    if (!loopback) std::fprintf(stderr, "%s\n", transport::plain_warning());
    return std::nullopt;
  }
  if (a.keys.empty() || a.server_key.empty())
    throw Error("pipar device needs --keys DEVICE.key and --server-key SERVER.pub (make keys with pipar keygen), or --insecure");
  transport::Security s;
  s.keys = transport::read_keypair(a.keys);
  s.server_public_z85 = transport::read_public_key(a.server_key);
  return s;
}

struct PlanArgs {
  std::string mode = "pipar", profile, server_profile, save_profile;
  int64_t samples = 15000;
  int device_threads = 1;
  bool per_device = false;
  std::string device_speeds;  // per device: its compute time over the profile's (2: twice as slow)
  double server_memory_gb = 0, device_memory_gb = 0;  // 0: no limit
  std::string server_model = "per-device";
  int server_lanes = 0;  // 0: as the server chooses (one at a time, or min(devices, threads) lanes)
  size_t top = 8;
};

int cmd_plan(const TrainConfig& cfg, const NetConfig& net, const PlanArgs& a) {
  // A CUDA server (--backend cuda): its profile measured on this GPU, one server as its cost model sees
  // it (the replicas' streams overlap, which the model does not credit). Checked first: an error, not
  // a device profile measured in vain.
  const Device server_device = resolve_backend(cfg.backend);
  ModelOptions o;
  o.input = dataset_input(cfg.dataset);
  o.batch_norm = cfg.norm != "none";
  o.seed = cfg.seed;
  auto model = build_model(cfg.model, o);
  planner::ProfileOptions po;
  po.sizes = {1, 4, 16, std::max<int64_t>(16, cfg.batch_size)};
  planner::Profile dev;
  if (!a.profile.empty()) {
    dev = planner::Profile::load(a.profile);
  } else {
    po.threads = a.device_threads;
    std::string note;
    dev = planner::profile_this_process(*model, po, &note);
    if (!note.empty()) std::fprintf(stderr, "%s\n", note.c_str());
    std::fprintf(stderr, "measured the device profile here (%d thread(s), %.1f s)\n", a.device_threads, dev.seconds);
  }
  if (!a.save_profile.empty()) dev.save(a.save_profile);
  if (a.server_lanes < 0) throw Error("--server-lanes must be 0 (as the server chooses) or more");
  if (a.server_model == "shared" && a.server_lanes > 1)
    throw Error("--server-lanes: one shared server-side model trains one micro-batch at a time");
  // Server lanes to consider, as (lanes, threads per lane), as the server weighs them: one shared
  // server-side model, and private labels (whose groups the cost model does not model), one at a time;
  // a given --server-profile is of one lane configuration, so it cannot be weighed against another.
  const int threads = kernels::num_threads();
  const bool stacked = cfg.server_batching == "stack";
  if (stacked && (a.server_model != "per-device" || cfg.labels != "shared" || a.server_lanes > 1 ||
                  (a.mode != "sfl" && a.mode != "pipar")))
    throw Error("--server-batching stack needs --mode sfl or pipar, --server-model per-device, --labels shared and no --server-lanes");
  const bool weigh = server_device == Device::kCpu && a.server_model != "shared" && cfg.labels != "private" && !stacked &&
                     (a.server_lanes > 0 || a.server_profile.empty());
  const std::vector<std::pair<int, int>> lane_choices =
      weigh ? ServerLanes::options(cfg.devices, threads, a.server_lanes) : std::vector<std::pair<int, int>>{{1, threads}};
  planner::Cluster c = planner::make_cluster(dev, static_cast<size_t>(cfg.devices),
                                             {net.uplink_mbps, net.downlink_mbps, net.latency_ms / 1e3, 0}, cfg.batch_size,
                                             a.samples);
  if (!a.device_speeds.empty()) {
    std::vector<double> scales;
    std::stringstream ss(a.device_speeds);
    for (std::string item; std::getline(ss, item, ',');) {
      char* end = nullptr;
      const double v = std::strtod(item.c_str(), &end);
      if (item.empty() || *end != '\0' || !(v > 0) || v > 1e6)
        throw Error("--device-slowdown: expected positive numbers, one per device, got '" + item + "'");
      scales.push_back(v);
    }
    if (scales.size() != c.devices.size())
      throw Error(detail::concat("--device-slowdown lists ", scales.size(), " values for ", c.devices.size(), " devices"));
    for (size_t d = 0; d < scales.size(); ++d) c.devices[d].time_scale = scales[d];
  }
  c.server_per_micro_batch_s = planner::kServerPerMicroBatchS;  // as the server's own planner
  c.private_labels = cfg.labels == "private";
  if (a.server_model != "per-device" && a.server_model != "shared")
    throw Error("--server-model must be per-device or shared, got '" + a.server_model + "'");
  c.shared_server_model = a.server_model == "shared";
  planner::SearchOptions so;
  if (a.server_memory_gb > 0) so.server_memory_limit = a.server_memory_gb * (1 << 30);
  if (a.device_memory_gb > 0) so.device_memory_limit = a.device_memory_gb * (1 << 30);
  so.mode = planner::parse_mode(a.mode);
  so.per_device_split = a.per_device && !c.shared_server_model;  // one server-side model splits at one block
  so.runners_up = a.top;
  so.micro_batch_margin = cfg.plan_margin;
  // The server's profile for each lane option (measured here on one lane's threads, unless given),
  // and the option whose best plan is predicted faster.
  std::optional<planner::CostModel> cm;
  std::optional<planner::SearchResult> r;
  for (const auto& [lanes, per_lane] : lane_choices) {
    planner::Cluster cl = c;
    if (!a.server_profile.empty()) {
      cl.server_profile = planner::Profile::load(a.server_profile);
    } else if (server_device != Device::kCpu) {
      planner::ProfileOptions gpo = po;
      gpo.device = server_device;
      cl.server_profile = planner::profile_model(cfg.model, o, gpo);
      std::fprintf(stderr, "measured the server profile on this machine's %s (%.1f s)\n", device_name(server_device),
                   cl.server_profile->seconds);
    } else {
      po.threads = per_lane;
      cl.server_profile = planner::profile_model(*model, po);
      std::fprintf(stderr, "measured the server profile here (%d thread(s)%s, %.1f s)\n", per_lane, lanes > 1 ? " per lane" : "",
                   cl.server_profile->seconds);
    }
    cl.server_lanes = lanes;
    if (stacked) {  // the stacks measured here, on this backend, from block 1 (or the one --split)
      planner::ProfileOptions spo = po;
      spo.device = server_device;
      planner::profile_stacks(cl, cfg.model, o, cfg.split > 0 ? static_cast<size_t>(cfg.split) : 1, kServerStackMax, spo);
      for (const auto& [k, p] : cl.stack_profiles)
        std::fprintf(stderr, "measured a stack of %d replicas on this machine's %s (%.1f s)\n", k, device_name(server_device), p.seconds);
    }
    planner::CostModel m(cl);
    planner::SearchResult res = planner::search(m, so);
    if (lane_choices.size() > 1)
      std::fprintf(stderr, "%d server lane(s) of %d thread(s): best round %.4f s\n", lanes, per_lane, res.best.round_s);
    // More lanes only for a gain beyond the plan margin, as the server chooses them.
    if (!r || planner::gains_beyond(res.best.round_s, r->best.round_s, lanes > cm->cluster().server_lanes ? cfg.plan_margin : 0.0))
      cm.emplace(std::move(m)), r = std::move(res);
  }
  c = cm->cluster();
  std::printf("%s, %d devices, batch %d, %lld samples per device, uplink %.1f Mbit/s, downlink %.1f Mbit/s, latency %.1f ms, "
              "labels %s%s\n",
              model->name().c_str(), cfg.devices, cfg.batch_size, static_cast<long long>(a.samples), net.uplink_mbps,
              net.downlink_mbps, net.latency_ms, cfg.labels.c_str(),
              c.server_lanes > 1  ? detail::concat(", ", c.server_lanes, " server lanes").c_str()
              : c.server_stack > 0 ? detail::concat(", server replicas in stacks of up to ", c.server_stack).c_str()
                                   : "");
  std::printf("searched %d plans in %.3f s\n", r->evaluated, r->seconds);
  for (size_t i = 0; i < r->ranked.size(); ++i) std::printf("%2zu. %s\n", i + 1, r->ranked[i].describe().c_str());
  if (!r->margin_note.empty()) std::printf("    (%s)\n", r->margin_note.c_str());
  std::printf("best plan of each mode:\n");
  for (const planner::Plan& p : planner::compare_modes(*cm, so)) std::printf("    %s\n", p.describe().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Distributed runs put several processes on the same cores; OpenMP's default spin-waiting then
  // burns the time slices others need (measured: server busy time 3.8 s → 0.7 s per round with 4
  // devices on 2 cores). The wait policy is read when libgomp loads, so re-exec with it set.
  if (argc > 1 && !std::getenv("OMP_WAIT_POLICY")) {
    bool distributed = std::strcmp(argv[1], "server") == 0 || std::strcmp(argv[1], "device") == 0;
    for (int i = 2; i + 1 < argc; ++i)
      if (std::strcmp(argv[i], "--mode") == 0 && std::strcmp(argv[i + 1], "local") != 0) distributed = true;
    if (distributed) {
      setenv("OMP_WAIT_POLICY", "passive", 1);
      execv("/proc/self/exe", argv);  // only returns on failure: then go on as we are
    }
  }
  CLI::App app{"PiPar: pipelined split learning across CPU edge devices and a GPU server"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "pipar 0.1.0");

  TrainConfig cfg;
  std::string split_arg = "auto", micro_arg = "auto";
  auto add_plan_margin = [&](CLI::App* a) {
    a->add_option("--plan-margin", cfg.plan_margin,
                  "More micro-batches (pipar) or more server lanes only where predicted faster than fewer by more than "
                  "this fraction (0: the fastest predicted)")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 0.99));
  };
  auto* train = app.add_subcommand("train", "Train a model (writes metrics.jsonl and summary.json under --out)");
  auto add_train_options = [&](CLI::App* a) {
    a->add_option("--mode", cfg.mode,
                  "local (whole model, one process), fl (federated averaging), sl (split learning, devices in turn), "
                  "sfl (SplitFed), pipar (SplitFed with micro-batch pipelining)")
        ->capture_default_str();
    a->add_option("--model", cfg.model, "Model: vgg5, vgg11, vgg16, resnet18, resnet50, mobilenetv3-small, mobilenetv3-large")
        ->capture_default_str();
    a->add_option("--dataset", cfg.dataset, "fmnist, mnist, cifar10, synthetic, synthetic-cifar")->capture_default_str();
    a->add_option("--data-dir", cfg.data_dir, "Directory of the data files (default: the data set's standard place)");
    a->add_option("--norm", cfg.norm, "VGG normalization: batch or none")->capture_default_str();
    a->add_option("--dp-clip", cfg.dp_clip,
                  "Differential privacy: per-sample L2 clip of the cut activation and of DP-SGD's per-sample gradients (0 = off)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    a->add_option("--dp-sigma", cfg.dp_sigma, "Differential privacy: noise multiplier (Gaussian sd = sigma * clip)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    a->add_flag("--dp-sgd", cfg.dp_sgd, "DP-SGD on the device-side weights (needs --dp-clip > 0 and a VGG with --norm none)");
    a->add_option("--dp-delta", cfg.dp_delta, "Differential privacy: delta of the reported epsilon")
        ->capture_default_str()
        ->check(CLI::Range(1e-12, 0.5));
    a->add_option("--labels", cfg.labels,
                  "shared (labels go to the server with the activations) or private (split modes: the device keeps the "
                  "last block and the loss, labels never leave it; one more round trip per micro-batch)")
        ->capture_default_str()
        ->check(CLI::IsMember({"shared", "private"}));
    a->add_option("--epochs", cfg.epochs, "Epochs")->capture_default_str()->check(CLI::PositiveNumber);
    a->add_option("--batch-size", cfg.batch_size, "Batch size")->capture_default_str()->check(CLI::Range(2, 1 << 20));
    a->add_option("--lr", cfg.lr, "SGD learning rate")->capture_default_str();
    a->add_option("--lr-schedule", cfg.lr_schedule, "Learning rate over the run: constant, or cosine (decays to 0 at the last step)")
        ->capture_default_str()
        ->check(CLI::IsMember({"constant", "cosine"}));
    a->add_option("--momentum", cfg.momentum, "SGD momentum")->capture_default_str();
    a->add_option("--weight-decay", cfg.weight_decay, "SGD weight decay")->capture_default_str();
    a->add_option("--threads", cfg.threads, "CPU threads of this process: local trainer or server (0: all cores)")->capture_default_str();
    a->add_option("--backend", cfg.backend,
                  "cpu, cuda or auto (a GPU that passes a start-up check against the CPU, else the CPU): the local trainer's, or in the distributed "
                  "modes the server's (devices run on their CPUs)")
        ->capture_default_str();
    a->add_option("--kernels", cfg.kernels,
                  "CUDA conv/linear implementations: handwritten, vendor (cuDNN, cuBLAS) or auto (fastest per layer, "
                  "timed once and cached)")
        ->capture_default_str();
    a->add_option("--gpus", cfg.gpus,
                  "CUDA server: GPUs the server-side replicas are dealt over, e.g. 0,1 (default: the current GPU); "
                  "their averaging runs through NCCL")
        ->delimiter(',');
    a->add_option("--cuda-graphs", cfg.cuda_graphs,
                  "CUDA server: replay the server-side parts' micro-batch steps as CUDA graphs (on or off)")
        ->capture_default_str();
    a->add_option("--seed", cfg.seed, "Seed: initialization, shuffling, augmentation")->capture_default_str();
    a->add_option("--limit-train", cfg.limit_train, "Use only the first N training samples (0: all)");
    a->add_option("--limit-test", cfg.limit_test, "Use only the first N test samples (0: all)");
    a->add_option("--devices", cfg.devices, "Devices (distributed modes)")->capture_default_str();
    a->add_option("--split", split_arg,
                  "Split point P: the device runs blocks 1..P (split modes); P0,P1,... one per device (sfl, pipar); or auto "
                  "(planner: in sfl and pipar a split point per device, unless --one-split)")
        ->capture_default_str();
    a->add_flag("--one-split", cfg.one_split, "With --split auto: one split point for every device");
    add_plan_margin(a);
    a->add_option("--server-model", cfg.server_model,
                  "sfl, pipar: per-device (a server-side replica per device, averaged each round) or shared (one "
                  "server-side model trained by every device's micro-batches in turn, SplitFed v2)")
        ->capture_default_str();
    a->add_option("--server-lanes", cfg.server_lanes,
                  "sfl, pipar: server-side replicas trained side by side, each on a share of the server's threads "
                  "(cross-device batching; 0: one at a time or min(devices, threads) lanes, as the cost model predicts faster, "
                  "one at a time where the devices share the server's cores; 1: one micro-batch at a time)")
        ->capture_default_str();
    a->add_option("--server-batching", cfg.server_batching,
                  "sfl, pipar: lanes (replicas side by side, --server-lanes), stack (up to 64 replicas stacked: one "
                  "call per layer for a group of same-size micro-batches; one split for every device), or auto (the "
                  "server profiles both and keeps what the cost model predicts faster)")
        ->capture_default_str();
    a->add_option("--server-memory-gb", cfg.server_memory_gb,
                  "Server memory the plan must fit, GiB (0: this machine's available memory)")
        ->capture_default_str();
    a->add_option("--micro-batches", micro_arg, "Micro-batches per batch (pipar mode), or auto (planner)")
        ->capture_default_str();
    a->add_option("--partition", cfg.partition, "iid or dirichlet (distributed modes)")->capture_default_str();
    a->add_option("--dirichlet-alpha", cfg.dirichlet_alpha, "Label skew of --partition dirichlet")->capture_default_str();
    a->add_option("--out", cfg.out_dir, "Output directory (default runs/<timestamp>)");
    a->add_option("--save", cfg.save_path, "Checkpoint written after every epoch");
    a->add_option("--load", cfg.load_path, "Resume from a checkpoint");
    a->add_flag("!--no-augment", cfg.augment, "CIFAR-10: no random crop and flip");
  };
  add_train_options(train);

  NetConfig net;
  int device_threads = 1;
  std::string uplink_schedule;
  auto add_net = [&](CLI::App* a) {
    a->add_option("--uplink-mbps", net.uplink_mbps, "Every device's uplink rate, Mbit/s (0: unshaped)")->capture_default_str();
    a->add_option("--downlink-mbps", net.downlink_mbps, "Every device's downlink rate, Mbit/s (0: unshaped)")->capture_default_str();
    a->add_option("--latency-ms", net.latency_ms, "One-way link latency, ms")->capture_default_str();
    a->add_option("--device-timeout", net.device_timeout_s, "Seconds of silence after which a device leaves its round")
        ->capture_default_str();
    a->add_option("--uplink-schedule", uplink_schedule, "Change every uplink's rate at run time: ROUND:MBPS,... (0-based rounds)");
    a->add_flag("!--no-replan", net.replan, "Keep the first automatic plan even when links or speeds drift");
    a->add_option("--group-wait-ms", net.group_wait_ms,
                  "Cross-device batching: how long a micro-batch waits for other devices' to join its group (0: none)")
        ->capture_default_str();
  };
  add_net(train);
  auto add_profile_clock = [&](CLI::App* a) {
    a->add_option("--device-profile-clock", net.device_profile_clock,
                  "What times the devices' set-up profiles: wall, cpu (CPU time, one-thread devices), or auto (CPU time "
                  "where one-thread devices share this machine's cores)")
        ->check(CLI::IsMember({"auto", "wall", "cpu"}))
        ->capture_default_str();
  };
  add_profile_clock(train);
  train->add_option("--device-threads", device_threads, "CPU threads of each device process (distributed modes)")
      ->capture_default_str();
  train->add_option("--shared-cores", net.shared_cores,
                    "Cores the device processes share with the server, for the planner (-1: this machine's; 0: plan as if "
                    "each had its own machine)")
      ->check(CLI::Range(-1, 1 << 20))
      ->capture_default_str();

  auto* server = app.add_subcommand("server", "Run the server of a distributed run (devices connect with `pipar device`)");
  server->add_option("--listen", net.listen, "Endpoint to bind, e.g. tcp://0.0.0.0:5555")->capture_default_str();
  SecurityArgs server_sec, device_sec;
  server->add_option("--keys", server_sec.keys, "The server's CURVE key pair (NAME.key from pipar keygen)");
  server->add_option("--allow", server_sec.allow, "Allow-list: one device public key per line (optionally its id)");
  server->add_flag("--insecure", server_sec.insecure, "Plain links: no authentication, no encryption");
  add_train_options(server);
  add_net(server);
  add_profile_clock(server);
  int server_shared_cores = 0, server_shared_device_threads = 1;
  server->add_option("--shared-cores", server_shared_cores,
                     "The devices run on this machine, sharing this many cores with the server, for the planner (as pipar "
                     "train's devices do; 0: each device on a machine of its own)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  server->add_option("--shared-device-threads", server_shared_device_threads,
                     "With --shared-cores: the CPU threads of each device process")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  bool resume = false;
  server->add_flag("--resume", resume,
                   "Go on from --out's server.ckpt (written after every round) when there is one: restart a killed server "
                   "with the same options and --resume; its devices reconnect by themselves");

  DeviceOptions dev_opts;
  auto* device = app.add_subcommand("device", "Run one device of a distributed run");
  device->add_option("--connect", dev_opts.connect, "Server endpoint, e.g. tcp://server:5555")->required();
  device->add_option("--id", dev_opts.id, "Device id, 0..devices-1")->required();
  device->add_option("--threads", dev_opts.threads, "CPU threads")->capture_default_str();
  device->add_option("--data-dir", dev_opts.data_dir, "Data directory on this device");
  device->add_option("--record", dev_opts.record, "Write the first batch's activations and labels here (for --replay)");
  device->add_option("--replay", dev_opts.replay,
                     "A light device: send this recording's activations and labels instead of computing (tests, benchmarks "
                     "of many devices)");
  device->add_option("--timeout", dev_opts.timeout_s, "Seconds of server silence before it counts as gone")->capture_default_str();
  device->add_option("--reconnect", dev_opts.reconnect_s,
                     "Seconds to keep looking for a gone server (back-off 1, 2, 4 .. 30 s) before giving up; 0: give up at once")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  device->add_option("--keys", device_sec.keys, "This device's CURVE key pair (NAME.key from pipar keygen)");
  device->add_option("--server-key", device_sec.server_key, "The server's public key (its NAME.pub, or the key itself)");
  device->add_flag("--insecure", device_sec.insecure, "Plain links: no authentication, no encryption");

  std::string keygen_out;
  auto* keygen = app.add_subcommand("keygen", "Write a CURVE key pair: NAME.key (secret, mode 0600) and NAME.pub");
  keygen->add_option("--out", keygen_out, "Path prefix or directory")->required();

  std::string models_only, models_dataset = "fmnist", models_norm = "batch";
  int models_batch = 100;
  auto* models = app.add_subcommand("models", "List the models: blocks, parameters and the activation at every cut");
  models->add_option("--model", models_only, "Only this model");
  models->add_option("--dataset", models_dataset, "Input shape of this data set")->capture_default_str();
  models->add_option("--norm", models_norm, "batch or none")->capture_default_str();
  models->add_option("--batch-size", models_batch, "Batch size for the per-batch cut size")->capture_default_str();

  auto* devices = app.add_subcommand("devices", "Show the CPU and the CUDA devices found");

  PlanArgs plan_args;
  auto* plan = app.add_subcommand("plan", "Rank split points and micro-batch counts by predicted batch time");
  plan->add_option("--model", cfg.model, "Model")->capture_default_str();
  plan->add_option("--dataset", cfg.dataset, "Input shape of this data set")->capture_default_str();
  plan->add_option("--norm", cfg.norm, "batch or none")->capture_default_str();
  plan->add_option("--mode", plan_args.mode, "pipar, sfl, sl or fl")->capture_default_str();
  plan->add_option("--devices", cfg.devices, "Devices")->capture_default_str();
  plan->add_option("--batch-size", cfg.batch_size, "Batch size")->capture_default_str();
  plan->add_option("--samples-per-device", plan_args.samples, "Training samples per device (round time)")->capture_default_str();
  plan->add_option("--profile", plan_args.profile, "Device profile (JSON from --save-profile); default: measure here");
  plan->add_option("--server-profile", plan_args.server_profile, "Server profile (JSON); default: measure here");
  plan->add_option("--save-profile", plan_args.save_profile, "Write the device profile measured here");
  plan->add_option("--device-threads", plan_args.device_threads, "Threads of a device when measuring its profile")->capture_default_str();
  plan->add_flag("--per-device", plan_args.per_device, "Let devices split at different blocks");
  plan->add_option("--server-memory-gb", plan_args.server_memory_gb, "Server memory a plan must fit, GiB (0: no limit)");
  plan->add_option("--device-memory-gb", plan_args.device_memory_gb, "Device memory a plan must fit, GiB (0: no limit)");
  plan->add_option("--server-model", plan_args.server_model, "per-device or shared (one server-side model for all devices)")
      ->capture_default_str();
  plan->add_option("--server-lanes", plan_args.server_lanes,
                   "Server-side replicas trained side by side (cross-device batching; the server profile is then one lane's)")
      ->capture_default_str();
  plan->add_option("--server-batching", cfg.server_batching,
                   "lanes, or stack (up to 64 replicas stacked, one call per layer: profiled here as such stacks)")
      ->capture_default_str()
      ->check(CLI::IsMember({"lanes", "stack"}));
  plan->add_option("--device-slowdown", plan_args.device_speeds,
                   "Per device, its compute time over the measured profile's: S0,S1,... (2: twice as slow; heterogeneous devices)");
  plan->add_option("--labels", cfg.labels, "shared, or private (the device keeps the last block and the loss)")
      ->capture_default_str()
      ->check(CLI::IsMember({"shared", "private"}));
  plan->add_option("--top", plan_args.top, "Candidates to print")->capture_default_str();
  add_plan_margin(plan);
  plan->add_option("--backend", cfg.backend, "The server's backend, for its profile: cpu, cuda (measured on this GPU) or auto")
      ->capture_default_str();
  plan->add_option("--threads", cfg.threads, "The server's CPU threads, for its profile and lanes (0: all cores)")
      ->capture_default_str();
  add_net(plan);

  CLI11_PARSE(app, argc, argv);
  try {
    if (split_arg == "auto") {
      cfg.split = -1;
    } else {
      for (size_t at = 0; at <= split_arg.size();) {
        const size_t comma = std::min(split_arg.find(',', at), split_arg.size());
        cfg.device_splits.push_back(parse_count("--split", split_arg.substr(at, comma - at)));
        at = comma + 1;
      }
      cfg.split = cfg.device_splits.front();
      if (cfg.device_splits.size() == 1) cfg.device_splits.clear();  // one for every device
    }
    cfg.micro_batches = micro_arg == "auto" ? -1 : parse_count("--micro-batches", micro_arg);
    net.uplink_schedule = parse_schedule(uplink_schedule);
    if (*plan) {
      kernels::set_num_threads(cfg.threads);
      return cmd_plan(cfg, net, plan_args);
    }
    if (*models) return cmd_models(models_only, models_dataset, models_norm, models_batch);
    if (*devices) return cmd_devices();
    if (*keygen) {
      const std::string key = transport::write_keypair(keygen_out, transport::generate_keypair());
      const std::string pub = key.substr(0, key.size() - 4) + ".pub";
      std::printf("secret key: %s\npublic key: %s (%s)\n", key.c_str(), pub.c_str(), transport::read_public_key(pub).c_str());
      return 0;
    }
    if (*device) {
      dev_opts.security = device_security(device_sec, dev_opts.connect);
      return run_device(dev_opts);
    }
    if (*server) {
      net.security = server_security(server_sec);
      net.shared_cores = server_shared_cores;
      net.launched_device_threads = server_shared_cores > 0 ? server_shared_device_threads : 0;
    }
    if (*server && resume) {
      if (cfg.out_dir.empty()) throw Error("--resume needs --out: the directory whose server.ckpt to go on from");
      if (!cfg.load_path.empty()) throw Error("--resume and --load both name a checkpoint: give one");
      const std::string ckpt = cfg.out_dir + "/server.ckpt";
      if (std::filesystem::exists(ckpt)) cfg.load_path = ckpt;
      else std::fprintf(stderr, "--resume: no %s yet (no round finished): starting from the first round\n", ckpt.c_str());
    }
    if ((cfg.dp_clip > 0 || cfg.dp_sgd) && cfg.mode != "sl" && cfg.mode != "sfl" && cfg.mode != "pipar")
      throw Error("--dp-clip/--dp-sgd apply to --mode sl, sfl or pipar");
    if (cfg.labels == "private" && cfg.mode != "sl" && cfg.mode != "sfl" && cfg.mode != "pipar")
      throw Error("--labels private applies to --mode sl, sfl or pipar (in --mode " + cfg.mode +
                  " there is no split: labels never leave the process that holds the data)");
    if (cfg.dp_sgd && (cfg.dp_clip <= 0 || cfg.norm != "none" || cfg.model.rfind("vgg", 0) != 0))
      throw Error("--dp-sgd needs --dp-clip > 0 and a VGG with --norm none (per-sample gradients)");
    kernels::set_cuda_kernels(cfg.kernels);  // --kernels checked in every mode
    if (*train || *server) {
      std::signal(SIGINT, on_signal);
      std::signal(SIGTERM, on_signal);
      ProgressBar bar;
      TrainResult r;
      if (*server) {
        kernels::set_num_threads(cfg.threads);  // evaluation and averaging too, not only the lanes' steps
        r = run_server(cfg, net, &bar, [](const std::string& ep) { std::fprintf(stderr, "listening on %s\n", ep.c_str()); });
      } else if (cfg.mode == "local") {
        r = train_local(cfg, &bar);
      } else {
        kernels::set_num_threads(cfg.threads);
        r = train_distributed(cfg, net, &bar, "/proc/self/exe", device_threads);
      }
      if (r.epochs.empty())
        std::printf("interrupted before the first epoch ended (%.1f s training); outputs in %s\n", r.train_seconds,
                    r.out_dir.c_str());
      else
        std::printf("%s: test accuracy %.2f%% after %zu epoch(s), %.1f s training (%.1f s wall); outputs in %s\n",
                    r.interrupted ? "interrupted" : "done", 100 * r.test_accuracy, r.epochs.size(), r.train_seconds,
                    r.wall_seconds, r.out_dir.c_str());
      return r.interrupted ? 130 : 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipar: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
