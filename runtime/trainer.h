// The trainer: configuration, per-epoch metrics, run outputs (metrics.jsonl, summary.json,
// checkpoints) and the `local` mode (whole model, one process, one backend).
#pragma once
#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "runtime/data.h"
#include "runtime/loss.h"
#include "runtime/model.h"

namespace pipar {

struct TrainConfig {
  std::string mode = "local";
  std::string model = "vgg5";
  std::string dataset = "fmnist";
  std::string data_dir;  // "" = the data set's default directory
  std::string norm = "batch";  // VGG: batch | none
  int epochs = 2;
  int batch_size = 100;
  float lr = 0.01f;
  // Learning rate over the run: "cosine" (lr * (1 + cos(pi t / T)) / 2 at step t of T, every mode
  // alike: one step per batch) or "constant" (lr at every step, the paper's recipe). Cosine by default:
  // VGG5 on Fashion-MNIST reaches 90.9-91.1% in 2 epochs with it, 88.6-90.2% without (bench/RESULTS.md).
  std::string lr_schedule = "cosine";
  float momentum = 0.9f;
  float weight_decay = 0.0f;
  int threads = 0;  // 0 = all cores
  // sfl, pipar (per-device server-side replicas, shared labels): replicas the server trains side by
  // side, each on threads / lanes cores (cross-device batching, runtime/lanes.h); 0 = one at a time or
  // min(devices, threads) lanes, as the cost model predicts faster (one at a time where the devices
  // share the server's cores); 1 = one micro-batch at a time on all threads.
  int server_lanes = 0;
  // sfl, pipar (per-device replicas, shared labels, one split): "lanes" (above), or "stack": up to 64
  // replicas stacked as one part (runtime/replica_stack.h), a group of same-size micro-batches trained
  // by one call per layer and pass; the micro-batches that arrive together (--group-wait-ms) form it.
  // Each replica's state is then held twice (its model between rounds, its stack slice during one).
  // The server profiles its stacks as such at set-up, and the planner models their calls and memory.
  // "auto": both profiled, the one whose plan the cost model predicts faster kept (lanes where stacks
  // cannot serve the run).
  std::string server_batching = "lanes";
  std::string backend = "cpu";  // cpu | cuda | auto
  std::string kernels = "auto";  // CUDA: handwritten | vendor | auto (kernels/cuda/autotune.h)
  // CUDA server: replay each server-side part's micro-batch steps as CUDA graphs (ServerPart::set_graphs).
  bool cuda_graphs = true;
  // CUDA server: the GPUs the server-side replicas are dealt over, round-robin (empty: the current GPU);
  // their FedAvg runs through NCCL (kernels::GpuGroup) where it is built.
  std::vector<int> gpus;
  uint64_t seed = 1;
  int64_t limit_train = 0, limit_test = 0;  // > 0: use only the first samples
  int devices = 1, split = 0, micro_batches = 1;  // recorded; the distributed modes use them
  // (sfl, pipar) a fixed split point per device (--split P0,P1,...): one entry per device; empty: split
  // applies to every device. split is then the first entry.
  std::vector<int> device_splits;
  // With --split auto: one split point for every device; otherwise (sfl, pipar) the planner may give
  // each device its own, e.g. an earlier one to a slower device.
  bool one_split = false;
  // More micro-batches (pipar, --micro-batches auto; planner::SearchOptions::micro_batch_margin) or
  // more server lanes only where predicted faster than fewer by more than this fraction.
  double plan_margin = 0.02;
  // sfl and pipar: "per-device" (a server-side replica per device, averaged after each round) or
  // "shared" (one server-side model that every device's micro-batches train in arrival order, stepped
  // at the end of each device's batch: SplitFed v2; its memory does not grow with the devices).
  std::string server_model = "per-device";
  // Server memory the plan must fit (GiB): 0 = this machine's available memory.
  double server_memory_gb = 0;
  std::string partition = "iid";
  double dirichlet_alpha = 0.5;
  std::string out_dir;     // "" = runs/<timestamp>
  std::string save_path;   // checkpoint written after every epoch (and on interrupt or error)
  std::string load_path;   // resume from a checkpoint
  bool augment = true;     // CIFAR-10: random crop and flip
  // --- differential privacy (runtime/privacy.h; split modes, device side) ---
  float dp_clip = 0;       // > 0: per-sample clip of the cut activation (and DP-SGD's clip); 0 = off
  float dp_sigma = 0;      // noise multiplier: Gaussian noise of sd dp_sigma * dp_clip
  bool dp_sgd = false;     // DP-SGD on the device-side weights (needs --norm none and dp_clip > 0)
  double dp_delta = 1e-5;  // delta of the reported (epsilon, delta)
  // "shared": labels travel with the cut activation and the server computes the loss; "private" (split
  // modes): a U-shaped split, the device keeps the last block and the loss, labels never leave it.
  std::string labels = "shared";
};

struct EpochMetrics {
  int epoch = 0;  // 1-based
  double train_loss = 0, train_accuracy = 0, test_loss = 0, test_accuracy = 0;
  double train_seconds = 0, eval_seconds = 0, samples_per_second = 0;
  int64_t samples = 0;
};

// One epoch's figures from its training and test statistics and times.
EpochMetrics epoch_metrics(int epoch, const LossStats& train, const LossStats& test, double train_seconds,
                           double eval_seconds);

// Progress callbacks (the CLI draws a bar on stderr); all optional.
struct ProgressSink {
  virtual ~ProgressSink() = default;
  virtual void on_start(const std::string& description) { (void)description; }
  virtual void on_batch(int epoch, int epochs, int64_t batch, int64_t batches, int64_t samples, double seconds,
                        double loss, double accuracy) {
    (void)epoch, (void)epochs, (void)batch, (void)batches, (void)samples, (void)seconds, (void)loss, (void)accuracy;
  }
  virtual void on_epoch(const EpochMetrics& m, int epochs) { (void)m, (void)epochs; }
  virtual void on_message(const std::string& line) { (void)line; }
};

struct TrainResult {
  std::vector<EpochMetrics> epochs;
  double test_accuracy = 0, train_seconds = 0, wall_seconds = 0;
  bool interrupted = false;
  std::string out_dir;
};

// Set by SIGINT/SIGTERM handlers: the trainer stops after the current batch, saves and reports.
std::atomic<bool>& stop_requested();

// Evaluates a model (inference mode) on a whole data set in batches.
LossStats evaluate(Model& model, const data::Dataset& ds, int batch_size, const Context& ctx);

// The learning rate of optimizer step `step` (0-based) of `total_steps` under c.lr_schedule; an
// unknown schedule is an error naming it.
float scheduled_lr(const TrainConfig& c, int64_t step, int64_t total_steps);

// Resolves "auto"/"cpu"/"cuda" against this build and machine; a clear error for cuda where none is.
// auto: CUDA where a GPU is usable and passes a start-up check (one training step of a small VGG5
// matching the CPU backend's), else the CPU.
Device resolve_backend(const std::string& backend);
// One SGD step of m on batch (x, y) on ctx's device and stream: gradients zeroed, forward, the batch's
// mean loss, backward, the step (the gradients stay in the parameters); the loss statistics.
LossStats train_step(Model& m, const Tensor& x, const Tensor& y, const Context& ctx, kernels::SgdParams sgd);
// Why --backend auto means the CPU here ("" where it means CUDA).
std::string auto_backend_reason();
// "CUDA (the GPU passed ...)" or "the CPU (why)": what auto resolved to, for the logs.
std::string auto_backend_note(Device chosen);

// `pipar train --mode local`: trains, evaluates every epoch, writes <out>/metrics.jsonl and
// <out>/summary.json, and a checkpoint after each epoch when save_path is set.
TrainResult train_local(const TrainConfig& cfg, ProgressSink* progress = nullptr);

// Creates the output directory (default runs/<timestamp>) and returns it.
std::string prepare_out_dir(const std::string& out_dir);

}  // namespace pipar
