// The local training mode and the run outputs every mode shares.
#include "runtime/trainer.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kernels/device.h"
#include "kernels/parallel.h"
#include "kernels/rng.h"
#include "runtime/checkpoint.h"

namespace pipar {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::atomic<bool>& stop_requested() {
  static std::atomic<bool> flag{false};
  return flag;
}

LossStats train_step(Model& m, const Tensor& x, const Tensor& y, const Context& ctx, kernels::SgdParams sgd) {
  std::vector<Param*> params = m.params();
  Sgd opt(sgd);
  Sgd::zero_grad(params);
  Tape tape;
  Tensor logits = m.forward(x.to(ctx.device), &tape, ctx);
  Tensor dlogits;
  const LossStats st = softmax_cross_entropy(logits, y.to(ctx.device), 1.0f / static_cast<float>(x.shape().n), &dlogits, ctx.stream);
  Context b = ctx;
  b.input_grad = false;
  m.backward(dlogits, tape, b);
  opt.step(params, ctx.stream);
  return st;
}

namespace {

// --backend auto's gate for the GPU: one training step of a small VGG5 (conv, batch-norm, pooling,
// dense layers) on the same weights and batch on both backends; the loss within 1e-4 and every weight
// within 2e-3 relative (TrainingCuda.StepMatchesCpuForEveryModelFamily's bounds). "" where it
// passes, else why not. Run once per process (about 0.1 s).
std::string cuda_self_check() {
  static const std::string result = []() -> std::string {
    try {
      ModelOptions o;
      o.width = 0.25f;
      o.seed = 7;
      auto cpu = build_model("vgg5", o), gpu = build_model("vgg5", o);
      const int64_t n = 13;
      std::vector<float> xs(static_cast<size_t>(n * 28 * 28));
      uint64_t r = 12345;
      for (float& v : xs) r = r * 6364136223846793005ull + 1442695040888963407ull, v = static_cast<float>(r >> 40) / 8388608.0f - 1.0f;
      std::vector<int32_t> ys(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) ys[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7) % 10);
      const Tensor x = Tensor::from_vector(xs, {n, 1, 28, 28}), y = Tensor::from_vector(ys, {n, 1, 1, 1});
      kernels::SgdParams sp;
      sp.lr = 0.05f, sp.momentum = 0.9f;
      const double lc = train_step(*cpu, x, y, Context{}, sp).loss_sum;
      double lg = 0;
      std::vector<std::vector<float>> gw;
      {
        kernels::DeviceStream s(Device::kCuda);
        kernels::ScopedStream on(s.ref());
        gpu->to(Device::kCuda);
        Context ctx;
        ctx.device = Device::kCuda;
        ctx.stream = s.ref();
        lg = train_step(*gpu, x, y, ctx, sp).loss_sum;
        for (Param* p : gpu->params()) gw.push_back(p->value.to_vector());
        gpu.reset();  // its memory back to the pool on the stream, while it is current
      }
      if (!(std::fabs(lg - lc) <= 1e-4 * std::max(1.0, std::fabs(lc))))
        return detail::concat("the GPU's loss ", lg, " differs from the CPU's ", lc);
      const std::vector<Param*> pc = cpu->params();
      for (size_t i = 0; i < pc.size(); ++i)
        if (const double e = relative_error(gw.at(i), pc[i]->value.to_vector()); !(e < 2e-3))
          return detail::concat("weight ", pc[i]->name, " after a GPU step is ", e, " (relative) off the CPU's");
      return "";
    } catch (const std::exception& e) {
      return std::string("the check failed: ") + e.what();
    }
  }();
  return result;
}
}  // namespace

std::string auto_backend_reason() {
  if (!kernels::cuda_ops_built()) return "this build has no CUDA backend";
  if (const std::string why = kernels::cuda_unavailable_reason(); !why.empty()) return why;
  if (const std::string why = cuda_self_check(); !why.empty()) return "the GPU failed the start-up check against the CPU: " + why;
  return "";
}

std::string auto_backend_note(Device chosen) {
  return chosen == Device::kCuda ? "CUDA (the GPU passed the start-up check against the CPU)"
                                 : "the CPU (" + auto_backend_reason() + ")";
}

Device resolve_backend(const std::string& backend) {
  if (backend == "cpu") return Device::kCpu;
  // auto: CUDA where a GPU is usable and one training step on it matches the CPU backend (checked
  // once at start-up); else the CPU. auto_backend_reason() says which and why.
  if (backend == "auto") return auto_backend_reason().empty() ? Device::kCuda : Device::kCpu;
  if (backend == "cuda") {
    if (!kernels::cuda_ops_built())
      throw Unsupported("--backend cuda: this build has no CUDA backend (configure with -DPIPAR_CUDA=ON where nvcc is)");
    const std::string why = kernels::cuda_unavailable_reason();
    if (!why.empty()) throw Unsupported("--backend cuda: " + why);
    return Device::kCuda;
  }
  throw Error("unknown backend '" + backend + "'; use cpu, cuda or auto");
}

std::string prepare_out_dir(const std::string& out_dir) {
  std::string dir = out_dir;
  if (dir.empty()) {
    const std::time_t t = std::time(nullptr);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y%m%d-%H%M%S", std::localtime(&t));
    dir = std::string("runs/") + buf;
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError("cannot create output directory " + dir + ": " + ec.message());
  return dir;
}

namespace {
// The first n rows of a batch buffer: the buffers themselves when full, exact-size copies otherwise.
std::pair<Tensor, Tensor> first_rows(const Tensor& images, const Tensor& labels, int64_t n) {
  if (n == images.shape().n) return {images, labels};
  const Shape4 s = images.shape();
  Tensor x = Tensor::empty({n, s.c, s.h, s.w});
  std::copy(images.data(), images.data() + x.numel(), x.data());
  Tensor y = Tensor::empty({n, 1, 1, 1}, Device::kCpu, DType::kI32);
  std::copy(labels.idata(), labels.idata() + n, y.idata());
  return {x, y};
}
}  // namespace

EpochMetrics epoch_metrics(int epoch, const LossStats& train, const LossStats& test, double train_seconds,
                           double eval_seconds) {
  EpochMetrics m;
  m.epoch = epoch;
  m.train_loss = train.mean_loss();
  m.train_accuracy = train.accuracy();
  m.test_loss = test.mean_loss();
  m.test_accuracy = test.accuracy();
  m.train_seconds = train_seconds;
  m.eval_seconds = eval_seconds;
  m.samples = train.count;
  m.samples_per_second = train_seconds > 0 ? train.count / train_seconds : 0;
  return m;
}

LossStats evaluate(Model& model, const data::Dataset& ds, int batch_size, const Context& ctx_in) {
  Context ctx = ctx_in;
  ctx.training = false;
  LossStats total;
  std::vector<int64_t> order(static_cast<size_t>(ds.size()));
  for (int64_t i = 0; i < ds.size(); ++i) order[static_cast<size_t>(i)] = i;
  const Shape4 ss = ds.sample_shape();
  Tensor images = Tensor::empty({batch_size, ss.c, ss.h, ss.w});
  Tensor labels = Tensor::empty({batch_size, 1, 1, 1}, Device::kCpu, DType::kI32);
  for (int64_t b = 0; b < ds.size(); b += batch_size) {
    const int64_t n = std::min<int64_t>(batch_size, ds.size() - b);
    data::gather_batch(ds, order, b, n, images, labels);
    auto [x, y] = first_rows(images, labels, n);
    Tensor logits = model.forward(x.to(ctx.device), nullptr, ctx);
    total += softmax_cross_entropy(logits, y.to(ctx.device), 1.0f, nullptr, ctx.stream);
  }
  return total;
}

float scheduled_lr(const TrainConfig& c, int64_t step, int64_t total_steps) {
  if (c.lr_schedule == "constant") return c.lr;
  if (c.lr_schedule == "cosine") {
    const double t = total_steps > 0 ? std::clamp(static_cast<double>(step) / static_cast<double>(total_steps), 0.0, 1.0) : 0.0;
    return static_cast<float>(c.lr * 0.5 * (1.0 + std::cos(std::numbers::pi * t)));
  }
  throw Error("unknown learning-rate schedule '" + c.lr_schedule + "' (constant or cosine)");
}

namespace {

nlohmann::json epoch_json(const EpochMetrics& m) {
  return {{"epoch", m.epoch},
          {"train_loss", m.train_loss},
          {"train_accuracy", m.train_accuracy},
          {"test_loss", m.test_loss},
          {"test_accuracy", m.test_accuracy},
          {"train_seconds", m.train_seconds},
          {"eval_seconds", m.eval_seconds},
          {"samples", m.samples},
          {"samples_per_second", m.samples_per_second}};
}

nlohmann::json config_json(const TrainConfig& c) {
  return {{"mode", c.mode},       {"model", c.model},       {"dataset", c.dataset},
          {"norm", c.norm},       {"epochs", c.epochs},     {"batch_size", c.batch_size},
          {"lr", c.lr},           {"lr_schedule", c.lr_schedule}, {"momentum", c.momentum}, {"weight_decay", c.weight_decay},
          {"seed", c.seed},       {"devices", c.devices},   {"split", c.split},
          {"micro_batches", c.micro_batches}};
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    if (!f) throw IoError("cannot write " + tmp);
    f << j.dump(2) << "\n";
  }
  fs::rename(tmp, path);
}

}  // namespace

TrainResult train_local(const TrainConfig& cfg, ProgressSink* progress) {
  const auto wall_start = Clock::now();
  if (cfg.epochs < 1) throw Error("--epochs must be at least 1");
  if (cfg.batch_size < 2) throw Error("--batch-size must be at least 2 (batch-norm needs two samples)");
  if (cfg.norm != "batch" && cfg.norm != "none") throw Error("--norm must be batch or none, got '" + cfg.norm + "'");
  scheduled_lr(cfg, 0, 1);  // an unknown schedule fails here, before any work
  kernels::set_num_threads(cfg.threads);
  const Device device = resolve_backend(cfg.backend);
  if (cfg.backend == "auto" && progress) progress->on_message("backend auto: " + auto_backend_note(device));
  kernels::set_cuda_kernels(cfg.kernels);  // checked on every backend: a typo is an error anywhere
  // On CUDA one stream carries the whole run: every op, allocation and host read of this thread is
  // ordered on it (declared before the model, so the model's memory goes back to it first).
  kernels::DeviceStream stream(device);
  kernels::ScopedStream on_stream(stream.ref());
  {
    bool known = false;
    for (const auto& n : model_names()) known |= n == cfg.model;
    if (!known) build_model(cfg.model, ModelOptions{});  // throws the list of known models, before loading data
  }

  data::Dataset train = data::load_dataset(cfg.dataset, cfg.data_dir, true, cfg.seed, cfg.limit_train);
  data::Dataset test = data::load_dataset(cfg.dataset, cfg.data_dir, false, cfg.seed, cfg.limit_test);

  ModelOptions mo;
  mo.input = train.sample_shape();
  mo.num_classes = train.num_classes;
  mo.batch_norm = cfg.norm == "batch";
  mo.seed = cfg.seed;
  int start_epoch = 0;
  std::unique_ptr<Model> model;
  if (!cfg.load_path.empty()) {
    const CheckpointMeta meta = read_checkpoint_meta(cfg.load_path);
    if (meta.model != cfg.model)
      throw Error("checkpoint " + cfg.load_path + " holds " + meta.model + ", but --model is " + cfg.model);
    if (!(meta.options.input == mo.input) || meta.options.num_classes != mo.num_classes)
      throw Error("checkpoint " + cfg.load_path + " was trained on inputs " + meta.options.input.str() + " with " +
                  std::to_string(meta.options.num_classes) + " classes; data set " + cfg.dataset + " has " +
                  mo.input.str());
    model = build_model(cfg.model, meta.options);
    start_epoch = load_checkpoint(cfg.load_path, *model).epoch;
  } else {
    model = build_model(cfg.model, mo);
  }
  model->to(device);

  TrainResult result;
  result.out_dir = prepare_out_dir(cfg.out_dir);
  const std::string metrics_path = result.out_dir + "/metrics.jsonl";
  std::ofstream metrics(metrics_path, start_epoch > 0 ? std::ios::app : std::ios::trunc);
  if (!metrics) throw IoError("cannot write " + metrics_path);

  if (progress)
    progress->on_start(detail::concat("local training: ", model->name(), " (", model->param_count(), " params, ",
                                      model->num_blocks(), " blocks) on ", train.name, " (", train.size(), " train, ",
                                      test.size(), " test), ", device_name(device), " backend, ",
                                      kernels::num_threads(), " threads, ", kernels::isa_name(kernels::cpu_isa()),
                                      ", batch ", cfg.batch_size, ", lr ", cfg.lr, ", momentum ", cfg.momentum));

  kernels::SgdParams sp;
  sp.lr = cfg.lr;
  sp.momentum = cfg.momentum;
  sp.weight_decay = cfg.weight_decay;
  Sgd opt(sp);
  const std::vector<Param*> params = model->params();
  Context ctx;
  ctx.device = device;
  ctx.stream = stream.ref();
  ctx.training = true;

  const Shape4 ss = train.sample_shape();
  const int64_t bs = cfg.batch_size;
  const bool augment = cfg.augment && train.name.find("cifar") != std::string::npos && ss.h == 32;
  data::Augment aug;
  aug.random_crop = aug.hflip = true;
  // A final batch of one sample is dropped: batch-norm cannot normalize one value per channel.
  const int64_t batches = train.size() / bs + (train.size() % bs >= 2 ? 1 : 0);

  // Writes a checkpoint of the model as it is now; `suffix` keeps partial states beside the last
  // complete one ("" after a finished epoch, ".interrupted" or ".error" otherwise).
  auto save = [&](int epochs_done, const std::string& suffix, const char* why) {
    if (cfg.save_path.empty()) return;
    CheckpointMeta meta;
    meta.model = model->name();
    meta.options = model->options();
    meta.epoch = epochs_done;
    nlohmann::json extra = config_json(cfg);
    extra["state"] = why;
    meta.extra_json = extra.dump();
    save_checkpoint(cfg.save_path + suffix, *model, meta);
    if (progress)
      progress->on_message(detail::concat("checkpoint (", why, ", ", epochs_done, " epochs complete) → ", cfg.save_path, suffix));
  };

  int epochs_done = start_epoch;
  try {
    // Host staging of each batch; page-locked on CUDA, where it is copied to the GPU every batch.
    const bool pinned = device == Device::kCuda;
    Tensor images = Tensor::empty_host({bs, ss.c, ss.h, ss.w}, DType::kF32, pinned);
    Tensor labels = Tensor::empty_host({bs, 1, 1, 1}, DType::kI32, pinned);
    Tensor dlogits;
    for (int epoch = start_epoch; epoch < cfg.epochs && !result.interrupted; ++epoch) {
      const std::vector<int64_t> order = data::shuffled_indices(train.size(), hash64(cfg.seed, 1000 + epoch));
      ctx.seed = hash64(cfg.seed, 2000 + epoch);
      LossStats running;
      const auto t0 = Clock::now();
      int64_t b = 0;
      for (; b < batches; ++b) {
        if (stop_requested().load()) {
          result.interrupted = true;
          break;
        }
        const int64_t n = std::min(bs, train.size() - b * bs);
        data::gather_batch(train, order, b * bs, n, images, labels, augment ? &aug : nullptr, ctx.seed);
        auto [x, y] = first_rows(images, labels, n);
        Sgd::zero_grad(params);
        Tape tape;
        Tensor logits = model->forward(x.to(device), &tape, ctx);
        running += softmax_cross_entropy(logits, y.to(device), 1.0f / static_cast<float>(n), &dlogits, ctx.stream);
        Context bctx = ctx;
        bctx.input_grad = false;  // nothing consumes the gradient of the images
        model->backward(dlogits, tape, bctx);
        opt.params().lr = scheduled_lr(cfg, epoch * batches + b, cfg.epochs * batches);
        opt.step(params, ctx.stream);
        if (progress)
          progress->on_batch(epoch + 1, cfg.epochs, b + 1, batches, running.count,
                             std::chrono::duration<double>(Clock::now() - t0).count(), running.mean_loss(),
                             running.accuracy());
      }
      const double train_s = std::chrono::duration<double>(Clock::now() - t0).count();
      if (result.interrupted) {  // stop at once: a partial epoch is saved, not evaluated
        nlohmann::json line = {{"epoch", epoch + 1}, {"complete", false}, {"train_loss", running.mean_loss()},
                               {"train_accuracy", running.accuracy()}, {"samples", running.count}, {"train_seconds", train_s}};
        metrics << line.dump() << "\n";
        result.train_seconds += train_s;
        break;
      }
      const auto e0 = Clock::now();
      const LossStats ev = evaluate(*model, test, cfg.batch_size, ctx);
      const EpochMetrics m =
          epoch_metrics(epoch + 1, running, ev, train_s, std::chrono::duration<double>(Clock::now() - e0).count());
      result.epochs.push_back(m);
      result.train_seconds += train_s;
      result.test_accuracy = m.test_accuracy;
      nlohmann::json line = epoch_json(m);
      line["complete"] = true;
      metrics << line.dump() << "\n";
      metrics.flush();
      if (progress) progress->on_epoch(m, cfg.epochs);
      epochs_done = epoch + 1;
      save(epochs_done, "", "end of epoch");
    }
    if (result.interrupted) {
      // The partly trained weights go beside the last complete checkpoint, never over it.
      if (cfg.save_path.empty() && progress) progress->on_message("interrupted (pass --save PATH to keep the weights)");
      save(epochs_done, ".interrupted", "interrupted");
    }
  } catch (const std::exception&) {
    // Nothing already trained is lost: keep the weights of the last finished step.
    try {
      save(epochs_done, ".error", "error");
    } catch (...) {
    }
    throw;
  }

  result.wall_seconds = std::chrono::duration<double>(Clock::now() - wall_start).count();
  nlohmann::json summary = config_json(cfg);
  summary["dataset"] = train.name;
  summary["model"] = model->name();
  summary["devices"] = 1;  // the whole model in this process
  summary["split"] = 0;
  summary["micro_batches"] = 1;
  summary["test_accuracy"] = result.test_accuracy;
  summary["test_loss"] = result.epochs.empty() ? 0.0 : result.epochs.back().test_loss;
  summary["train_accuracy"] = result.epochs.empty() ? 0.0 : result.epochs.back().train_accuracy;
  summary["train_loss"] = result.epochs.empty() ? 0.0 : result.epochs.back().train_loss;
  summary["train_seconds"] = result.train_seconds;
  summary["wall_seconds"] = result.wall_seconds;
  nlohmann::json per_epoch = nlohmann::json::array();
  for (const auto& m : result.epochs) per_epoch.push_back(m.train_seconds);
  summary["epoch_seconds"] = per_epoch;
  summary["epochs_completed"] = epochs_done;
  summary["interrupted"] = result.interrupted;
  summary["backend"] = device_name(device);
  if (device == Device::kCuda) summary["kernels"] = cfg.kernels;
  summary["threads"] = kernels::num_threads();
  summary["isa"] = kernels::isa_name(kernels::cpu_isa());
  summary["params"] = model->param_count();
  summary["train_samples"] = train.size();
  summary["test_samples"] = test.size();
  write_json_file(result.out_dir + "/summary.json", summary);
  return result;
}

}  // namespace pipar
