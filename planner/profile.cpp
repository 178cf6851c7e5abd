// The profiler (measured block times at a few micro-batch sizes) and the Profile's queries and JSON.
#include "planner/profile.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "kernels/device.h"
#include "kernels/parallel.h"
#include "planner/cost_model.h"
#include "runtime/loss.h"
#include "runtime/replica_stack.h"

namespace pipar::planner {

using json = nlohmann::json;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double mean(std::vector<double> v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0 : sum / static_cast<double>(v.size());
}

// What a profile's times are read from: the wall clock, or (cores > 0) the CPU time spread over
// `cores` (ProfileOptions::cpu_time_cores): the calling thread's where the kernels run on it alone
// (one thread: neither the transport's threads nor, where devices are threads of one process as in
// the tests, the other devices' count), else the process's.
class Stopwatch {
 public:
  Stopwatch(double cores, bool one_thread) : cores_(cores), clock_(one_thread ? CLOCK_THREAD_CPUTIME_ID : CLOCK_PROCESS_CPUTIME_ID) {}
  double now() const {
    if (cores_ > 0) {
      timespec ts{};
      clock_gettime(clock_, &ts);
      return (static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9) / cores_;
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  double since(double t0) const { return now() - t0; }

 private:
  double cores_;
  clockid_t clock_;
};

constexpr int kMaxPasses = 100000;  // min_seconds_per_size: a bound on passes at one size

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

// Value at m of the piecewise-linear function through (sizes[i], t[i]), extended with the nearest
// segment's slope, clamped at 0. One size: proportional to m.
double interpolate(const std::vector<int64_t>& sizes, const std::vector<double>& t, double m) {
  const size_t n = sizes.size();
  if (n == 1) return t[0] * m / static_cast<double>(sizes[0]);
  size_t i = 1;
  while (i + 1 < n && static_cast<double>(sizes[i]) < m) ++i;
  const double x0 = static_cast<double>(sizes[i - 1]), x1 = static_cast<double>(sizes[i]);
  const double v = t[i - 1] + (t[i] - t[i - 1]) * (m - x0) / (x1 - x0);
  return std::max(0.0, v);
}

// Sum over blocks [begin, end) of per-size values picked by `field`, then interpolated at m. The
// interpolation weights are shared by every block, so this equals the sum of interpolations.
template <class F>
double range_at(const Profile& p, size_t begin, size_t end, double m, F field) {
  PIPAR_CHECK(begin <= end && end <= p.blocks.size(), "block range [", begin, ", ", end, ") of ", p.blocks.size());
  std::vector<double> sum(p.sizes.size(), 0.0);
  for (size_t b = begin; b < end; ++b) {
    const std::vector<double>& v = field(p.blocks[b]);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += v[i];
  }
  return begin == end ? 0.0 : interpolate(p.sizes, sum, m);
}

void make_non_decreasing(std::vector<double>& v) {
  for (size_t i = 1; i < v.size(); ++i) v[i] = std::max(v[i], v[i - 1]);
}

Tensor random_tensor(Shape4 s, std::mt19937_64& gen) {
  std::vector<float> v(static_cast<size_t>(s.numel()));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (float& x : v) x = u(gen);
  return Tensor::from_vector(v, s);
}

}  // namespace

// --- queries ---------------------------------------------------------------------------------------

double Profile::forward_s(size_t begin, size_t end, double m) const {
  return range_at(*this, begin, end, m, [](const BlockProfile& b) -> const std::vector<double>& { return b.forward_s; });
}

double Profile::backward_s(size_t begin, size_t end, double m) const {
  return range_at(*this, begin, end, m, [](const BlockProfile& b) -> const std::vector<double>& { return b.backward_s; });
}

double Profile::loss_time_s(double m) const { return interpolate(sizes, loss_s, m); }

double Profile::step_s(size_t begin, size_t end) const {
  double s = 0;
  for (size_t b = begin; b < end; ++b) s += blocks.at(b).step_s;
  return s;
}

int64_t Profile::param_bytes(size_t begin, size_t end) const {
  int64_t s = 0;
  for (size_t b = begin; b < end; ++b) s += blocks.at(b).params * 4;
  return s;
}

int64_t Profile::state_bytes(size_t begin, size_t end) const {
  int64_t s = 0;
  for (size_t b = begin; b < end; ++b) s += (blocks.at(b).params + blocks.at(b).buffers) * 4;
  return s;
}

int64_t Profile::tape_bytes(size_t begin, size_t end) const {
  int64_t s = 0;
  for (size_t b = begin; b < end; ++b) s += blocks.at(b).tape_bytes;
  return s;
}

void Profile::validate() const {
  auto fail = [&](const std::string& why) { throw Error("profile of '" + model + "': " + why); };
  if (blocks.size() < 2) fail(detail::concat(blocks.size(), " blocks; a split needs at least 2"));
  if (sizes.empty()) fail("no micro-batch sizes");
  for (size_t i = 0; i < sizes.size(); ++i)
    if (sizes[i] < 1 || (i > 0 && sizes[i] <= sizes[i - 1])) fail("sizes must be positive and strictly increasing");
  auto check_times = [&](const std::vector<double>& v, const std::string& what) {
    if (v.size() != sizes.size()) fail(detail::concat(what, " has ", v.size(), " values for ", sizes.size(), " sizes"));
    for (double t : v)
      if (!std::isfinite(t) || t < 0) fail(what + " holds a negative or non-finite time");
  };
  check_times(loss_s, "loss_s");
  if (!std::isfinite(cpu_quota_cores) || cpu_quota_cores < 0) fail("cpu_quota_cores must be 0 (none) or positive");
  for (size_t b = 0; b < blocks.size(); ++b) {
    const BlockProfile& bp = blocks[b];
    const std::string name = detail::concat("block ", b + 1);
    check_times(bp.forward_s, name + " forward_s");
    check_times(bp.backward_s, name + " backward_s");
    if (!std::isfinite(bp.step_s) || bp.step_s < 0) fail(name + " step_s is negative or non-finite");
    if (bp.params < 0 || bp.buffers < 0 || bp.out_floats < 1 || bp.tape_bytes < 0) fail(name + " has a negative or zero size");
  }
  if (threads < 1) fail("threads must be at least 1");
  if (min_micro_batch < 1) fail("min_micro_batch must be at least 1");
}

// --- JSON ------------------------------------------------------------------------------------------

std::string Profile::to_json() const {
  json blocks_j = json::array();
  for (const BlockProfile& b : blocks)
    blocks_j.push_back({{"kind", b.kind},
                        {"forward_s", b.forward_s},
                        {"backward_s", b.backward_s},
                        {"step_s", b.step_s},
                        {"params", b.params},
                        {"buffers", b.buffers},
                        {"out_floats", b.out_floats},
                        {"tape_bytes", b.tape_bytes}});
  const json j = {{"version", kVersion},
                  {"model", model},
                  {"input", {input.c, input.h, input.w}},
                  {"num_classes", num_classes},
                  {"batch_norm", batch_norm},
                  {"backend", backend},
                  {"isa", isa},
                  {"threads", threads},
                  {"source", source},
                  {"seconds", seconds},
                  {"cpu_quota_cores", cpu_quota_cores},
                  {"cpu_time", cpu_time},
                  {"sizes", sizes},
                  {"min_micro_batch", min_micro_batch},
                  {"loss_s", loss_s},
                  {"blocks", blocks_j}};
  return j.dump();
}

namespace {

// What a profile from elsewhere (a device's hello message, a file) may claim, checked while parsing:
// the JSON's size, list lengths, and every count in a range where the cost model's int64 byte
// arithmetic cannot overflow (real profiles are a few KB with counts below 2^30).
constexpr size_t kMaxProfileJson = size_t{1} << 20;
constexpr size_t kMaxProfileSizes = 64, kMaxProfileBlocks = 1024;
constexpr int64_t kMaxProfileSide = int64_t{1} << 16, kMaxProfileClasses = int64_t{1} << 20;
constexpr int64_t kMaxProfileThreads = int64_t{1} << 16, kMaxProfileMicroBatch = int64_t{1} << 20;
constexpr int64_t kMaxProfileCount = int64_t{1} << 36;  // a block's params, buffers, out_floats, tape_bytes

// An integer in [lo, hi] (hi >= 0). A float, a string or an out-of-range value is an Error; nlohmann's
// get<int>() would convert a float such as 1e300 with undefined behaviour.
int64_t int_of(const json& v, const std::string& what, int64_t lo, int64_t hi) {
  bool ok = false;
  int64_t x = 0;
  if (v.is_number_unsigned()) {
    ok = v.get<uint64_t>() <= static_cast<uint64_t>(hi);
    x = ok ? static_cast<int64_t>(v.get<uint64_t>()) : 0;
  } else if (v.is_number_integer()) {
    x = v.get<int64_t>();
    ok = x >= lo && x <= hi;
  }
  if (!ok) throw Error(detail::concat("profile JSON: ", what, " must be an integer in [", lo, ", ", hi, "]"));
  return x;
}

const json& list_of(const json& v, const std::string& what, size_t max_entries) {
  if (!v.is_array() || v.size() > max_entries)
    throw Error(detail::concat("profile JSON: ", what, " must be a list of at most ", max_entries, " entries"));
  return v;
}

}  // namespace

Profile Profile::from_json(const std::string& text) {
  Profile p;
  if (text.size() > kMaxProfileJson)
    throw Error(detail::concat("profile JSON of ", text.size(), " bytes; at most ", kMaxProfileJson, " are accepted"));
  try {
    const json j = json::parse(text);
    const int64_t version = int_of(j.at("version"), "version", 0, INT32_MAX);
    if (version != kVersion) throw Error(detail::concat("profile version ", version, "; this build reads version ", kVersion));
    p.model = j.at("model").get<std::string>();
    const json& in = j.at("input");
    if (!in.is_array() || in.size() != 3) throw Error("profile: input must be [c, h, w]");
    p.input = {1, int_of(in[0], "input c", 1, kMaxProfileSide), int_of(in[1], "input h", 1, kMaxProfileSide),
               int_of(in[2], "input w", 1, kMaxProfileSide)};
    p.num_classes = static_cast<int>(int_of(j.at("num_classes"), "num_classes", 1, kMaxProfileClasses));
    p.batch_norm = j.at("batch_norm").get<bool>();
    p.backend = j.value("backend", "cpu");
    p.isa = j.value("isa", "");
    p.threads = static_cast<int>(int_of(j.at("threads"), "threads", 1, kMaxProfileThreads));
    p.source = j.value("source", "measured");
    p.seconds = j.value("seconds", 0.0);
    p.cpu_quota_cores = j.value("cpu_quota_cores", 0.0);
    p.cpu_time = j.value("cpu_time", false);
    for (const json& m : list_of(j.at("sizes"), "sizes", kMaxProfileSizes))
      p.sizes.push_back(int_of(m, "a size", 1, kMaxProfileMicroBatch));
    p.min_micro_batch = j.contains("min_micro_batch")
                            ? int_of(j.at("min_micro_batch"), "min_micro_batch", 1, kMaxProfileMicroBatch)
                            : 1;
    p.loss_s = list_of(j.at("loss_s"), "loss_s", kMaxProfileSizes).get<std::vector<double>>();
    for (const json& b : list_of(j.at("blocks"), "blocks", kMaxProfileBlocks)) {
      BlockProfile bp;
      const std::string name = detail::concat("block ", p.blocks.size() + 1);
      bp.kind = b.at("kind").get<std::string>();
      bp.forward_s = list_of(b.at("forward_s"), name + " forward_s", kMaxProfileSizes).get<std::vector<double>>();
      bp.backward_s = list_of(b.at("backward_s"), name + " backward_s", kMaxProfileSizes).get<std::vector<double>>();
      bp.step_s = b.at("step_s").get<double>();
      bp.params = int_of(b.at("params"), name + " params", 0, kMaxProfileCount);
      bp.buffers = int_of(b.at("buffers"), name + " buffers", 0, kMaxProfileCount);
      bp.out_floats = int_of(b.at("out_floats"), name + " out_floats", 1, kMaxProfileCount);
      bp.tape_bytes = int_of(b.at("tape_bytes"), name + " tape_bytes", 0, kMaxProfileCount);
      p.blocks.push_back(std::move(bp));
    }
  } catch (const json::exception& e) {
    throw Error(std::string("profile JSON: ") + e.what());
  }
  p.validate();
  return p;
}

Profile Profile::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw IoError("cannot read profile " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return from_json(ss.str());
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

void Profile::save(const std::string& path) const {
  std::ofstream f(path);
  if (!f) throw IoError("cannot write profile " + path);
  f << to_json() << "\n";
  if (!f) throw IoError("cannot write profile " + path);
}

// --- measurement -----------------------------------------------------------------------------------

namespace {

// Fills the size-independent fields of every block (kinds, parameter and byte counts).
Profile describe(Model& model) {
  Profile p;
  p.model = model.name();
  p.input = model.options().input;
  p.input.n = 1;
  p.num_classes = model.options().num_classes;
  p.batch_norm = model.options().batch_norm;
  p.isa = kernels::isa_name(kernels::cpu_isa());
  p.threads = kernels::num_threads();
  for (size_t b = 0; b < model.num_blocks(); ++b) {
    BlockProfile bp;
    bp.kind = model.block(b).kind;
    bp.params = model.param_count(b, b + 1);
    for (const Buffer& buf : model.buffers(b, b + 1)) bp.buffers += buf.value->numel();
    bp.out_floats = model.block_out_shape(b).per_sample();
    p.blocks.push_back(std::move(bp));
  }
  return p;
}

}  // namespace

namespace {

// The first line of a small file, or "".
std::string first_line(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  std::getline(f, line);
  return line;
}

}  // namespace

CpuQuota cpu_quota() {
  CpuQuota best;
  auto consider = [&](double quota_us, double period_us) {
    if (quota_us <= 0 || period_us <= 0) return;
    const double cores = quota_us / period_us;
    if (best.cores == 0 || cores < best.cores) best = {cores, period_us / 1e6};
  };
  std::ifstream groups("/proc/self/cgroup");
  for (std::string line; std::getline(groups, line);) {
    // "ID:CONTROLLERS:PATH": v1 with the cpu controller, or v2 ("0::PATH").
    const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    std::string path = line.substr(b + 1);
    bool v1 = false;
    for (size_t at = 0; at <= controllers.size();) {
      const size_t comma = std::min(controllers.find(',', at), controllers.size());
      v1 |= controllers.substr(at, comma - at) == "cpu";
      at = comma + 1;
    }
    if (!v1 && !controllers.empty()) continue;
    const std::vector<std::string> roots = v1 ? std::vector<std::string>{"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}
                                              : std::vector<std::string>{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"};
    for (const std::string& root : roots) {
      // The group and every group above it up to the mount's root (a container's own limit sits there).
      for (std::string p = path;; p = p.substr(0, p.rfind('/'))) {
        const std::string dir = root + (p == "/" ? "" : p);
        if (v1) {
          const std::string q = first_line(dir + "/cpu.cfs_quota_us"), per = first_line(dir + "/cpu.cfs_period_us");
          if (!q.empty() && !per.empty()) consider(std::atof(q.c_str()), std::atof(per.c_str()));
        } else {
          std::istringstream max(first_line(dir + "/cpu.max"));
          std::string q, per;
          if (max >> q >> per && q != "max") consider(std::atof(q.c_str()), std::atof(per.c_str()));
        }
        if (p.empty() || p == "/") break;
      }
    }
  }
  return best;
}

namespace {

// options.sizes sorted and distinct, at least one, all >= 1.
std::vector<int64_t> sorted_sizes(const ProfileOptions& options) {
  std::vector<int64_t> sizes = options.sizes;
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  PIPAR_CHECK(!sizes.empty() && sizes.front() >= 1, "profile sizes must be >= 1");
  return sizes;
}

// The kernels' thread count for a measurement (as it is where n is 0), restored on leaving.
struct ScopedThreads {
  explicit ScopedThreads(int n) : saved(kernels::num_threads()) {
    if (n > 0) kernels::set_num_threads(n);
  }
  ~ScopedThreads() { kernels::set_num_threads(saved); }
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;
  int saved;
};

}  // namespace

Profile profile_model(Model& model, const ProfileOptions& options) {
  PIPAR_CHECK(model.device() == options.device, "the profiler measures ", device_name(options.device), " but the model is on ",
              device_name(model.device()));
  PIPAR_CHECK(options.cpu_time_cores >= 0 && (options.cpu_time_cores == 0 || options.device == Device::kCpu),
              "cpu_time_cores ", options.cpu_time_cores, " on ", device_name(options.device));
  PIPAR_CHECK(options.repeats >= 1 && options.warmup >= 0, "repeats ", options.repeats, ", warmup ", options.warmup);
  std::vector<int64_t> sizes = sorted_sizes(options);

  const ScopedThreads threads(options.threads);

  const auto t_start = std::chrono::steady_clock::now();
  const Stopwatch watch(options.cpu_time_cores, kernels::num_threads() == 1);
  Profile p = describe(model);
  p.sizes = sizes;
  p.cpu_time = options.cpu_time_cores > 0;
  const size_t nb = model.num_blocks();
  std::vector<std::vector<Param*>> params(nb);
  for (size_t b = 0; b < nb; ++b) params[b] = model.params(b, b + 1);
  kernels::SgdParams sp;
  sp.lr = 1e-4f;  // small: the weights stay sane over the profiling steps
  sp.momentum = 0.9f;
  Sgd sgd(sp);
  std::vector<std::vector<double>> step_samples(nb);
  std::mt19937_64 gen(options.seed);
  // On CUDA: a stream of its own carries every op, allocation and copy; `done` makes the host wait
  // for what was queued, so that each time covers its op's work (a no-op on the CPU).
  kernels::DeviceStream stream(options.device);
  kernels::ScopedStream on_stream(stream.ref());
  auto done = [&] { stream.synchronize(); };
  Context ctx;
  ctx.training = true;
  ctx.device = options.device;
  ctx.stream = stream.ref();
  if (options.device != Device::kCpu) p.isa = device_name(options.device);

  // One pass: forward block by block (timed), loss, backward block by block (timed), step per block
  // (timed). Returns nothing; appends to the sample vectors when `record`.
  std::vector<std::vector<double>> fwd(nb), bwd(nb);
  std::vector<double> loss;
  auto pass = [&](int64_t m, bool record) {
    Shape4 in = p.input;
    in.n = m;
    Tensor x = random_tensor(in, gen).to(options.device);
    std::vector<int32_t> ys(static_cast<size_t>(m));
    for (auto& y : ys) y = static_cast<int32_t>(gen() % static_cast<uint64_t>(p.num_classes));
    const Tensor labels = Tensor::from_vector(ys, {m, 1, 1, 1}).to(options.device);
    Tape tape;
    ctx.seed = gen();
    done();
    for (size_t b = 0; b < nb; ++b) {
      const size_t before = tape.bytes();
      const double t0 = watch.now();
      x = model.forward(x, &tape, ctx, b, b + 1);
      done();
      if (record) fwd[b].push_back(watch.since(t0));
      if (record && m == sizes.back()) p.blocks[b].tape_bytes = static_cast<int64_t>((tape.bytes() - before) / static_cast<size_t>(m));
    }
    Tensor d;
    double t0 = watch.now();
    softmax_cross_entropy(x, labels, 1.0f / static_cast<float>(m), &d, ctx.stream);
    done();
    if (record) loss.push_back(watch.since(t0));
    for (size_t b = nb; b-- > 0;) {
      Context c = ctx;
      c.input_grad = b > 0;  // as DevicePart: nothing consumes the raw input's gradient
      t0 = watch.now();
      d = model.backward(d, tape, c, b, b + 1);
      done();
      if (record) bwd[b].push_back(watch.since(t0));
    }
    for (size_t b = 0; b < nb; ++b) {
      t0 = watch.now();
      sgd.step(params[b], ctx.stream);
      Sgd::zero_grad(params[b]);
      done();
      if (record) step_samples[b].push_back(watch.since(t0));
    }
  };

  model.zero_grad();
  // Warm-up (threads, allocations) at the smallest size: at these sizes a pass costs little more than
  // its fixed part. Batch-norm in training needs more than one value per channel, so a model whose
  // last feature maps are 1x1 cannot train on micro-batches of one sample (nor can the runtime): the
  // first pass at size 1 doubles as that probe.
  int warmed = 0;
  if (sizes.front() == 1) {
    try {
      pass(1, false);
      ++warmed;
    } catch (const ShapeError&) {
      p.min_micro_batch = 2;
      sizes.front() = 2;
      sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
      p.sizes = sizes;
      model.zero_grad();
    }
  }
  for (; warmed < options.warmup; ++warmed) pass(sizes.front(), false);
  for (int64_t m : sizes) {
    for (auto& v : fwd) v.clear();
    for (auto& v : bwd) v.clear();
    loss.clear();
    const auto t_size = std::chrono::steady_clock::now();
    const bool over_time = options.min_seconds_per_size > 0;
    for (int r = 0;; ++r) {
      const double spent = seconds_since(t_size);
      if (r > 0 && !(over_time ? spent < options.min_seconds_per_size && r < kMaxPasses
                               : r < options.repeats && spent < options.max_seconds_per_size))
        break;
      pass(m, true);
    }
    const auto stat = over_time ? mean : median;
    for (size_t b = 0; b < nb; ++b) {
      p.blocks[b].forward_s.push_back(stat(fwd[b]));
      p.blocks[b].backward_s.push_back(stat(bwd[b]));
    }
    p.loss_s.push_back(stat(loss));
  }
  for (size_t b = 0; b < nb; ++b) {
    make_non_decreasing(p.blocks[b].forward_s);
    make_non_decreasing(p.blocks[b].backward_s);
    p.blocks[b].step_s = median(step_samples[b]);
  }
  make_non_decreasing(p.loss_s);
  p.seconds = seconds_since(t_start);
  p.validate();
  return p;
}

Profile profile_model(const std::string& name, const ModelOptions& model_options, const ProfileOptions& options) {
  auto model = build_model(name, model_options);
  if (options.device != Device::kCpu) model->to(options.device);
  return profile_model(*model, options);
}

Profile profile_this_process(Model& model, ProfileOptions options, std::string* note) {
  // Under a CPU quota (a container's --cpus, a cgroup) the process runs at full speed until the
  // period's budget is spent, then not at all. Where the quota binds (below the threads), the speed it
  // sustains is the CPU time over the quota, taken over several periods.
  const CpuQuota q = cpu_quota();
  const int threads = options.threads > 0 ? options.threads : kernels::num_threads();
  if (q.period_s > 0 && q.cores < threads && options.device == Device::kCpu) {
    options.cpu_time_cores = q.cores;
    options.min_seconds_per_size = std::max(options.min_seconds_per_size, std::min(1.0, 5 * q.period_s));
    if (note)
      *note = detail::concat("CPU quota of ", q.cores, " cores (period ", q.period_s * 1e3, " ms) for ", threads,
                             " thread(s): profiling CPU time over the quota, each size for ", options.min_seconds_per_size, " s");
  }
  Profile p = profile_model(model, options);
  p.cpu_quota_cores = q.period_s > 0 ? q.cores : 0.0;
  return p;
}

Profile profile_stack(const std::string& name, const ModelOptions& model_options, size_t split, int replicas,
                      const ProfileOptions& options, int64_t max_samples) {
  PIPAR_CHECK(options.repeats >= 1 && options.warmup >= 0, "repeats ", options.repeats, ", warmup ", options.warmup);
  PIPAR_CHECK(replicas >= 1 && max_samples >= 1, "a stack of ", replicas, " replicas, at most ", max_samples, " samples");
  std::vector<int64_t> sizes = sorted_sizes(options);
  // The smallest size always; larger ones while a call holds at most max_samples samples.
  const int64_t smallest = sizes.front();
  std::erase_if(sizes, [&](int64_t m) { return m != smallest && m * replicas > max_samples; });

  const ScopedThreads threads(options.threads);

  const auto t_start = std::chrono::steady_clock::now();
  auto model = build_model(name, model_options);  // on the host: load copies each replica to the stack's device
  Profile p = describe(*model);
  p.threads = kernels::num_threads();
  if (options.device != Device::kCpu) p.isa = device_name(options.device);
  kernels::SgdParams sp;
  sp.lr = 1e-4f;  // small: the weights stay sane over the profiling steps
  sp.momentum = 0.9f;
  ReplicaStack stack(*model, split, replicas, sp, options.device);
  for (int r = 0; r < replicas; ++r) stack.load(r, *model);
  const Shape4 cut = model->block_out_shape(split - 1);
  std::mt19937_64 gen(options.seed);
  std::vector<int> all(static_cast<size_t>(replicas));
  for (int r = 0; r < replicas; ++r) all[static_cast<size_t>(r)] = r;
  auto pass = [&](int64_t m) {
    std::vector<ReplicaStack::Item> items(static_cast<size_t>(replicas));
    for (int r = 0; r < replicas; ++r) {
      ReplicaStack::Item& it = items[static_cast<size_t>(r)];
      it.replica = r;
      it.activation = random_tensor({m, cut.c, cut.h, cut.w}, gen);
      std::vector<int32_t> ys(static_cast<size_t>(m));
      for (auto& y : ys) y = static_cast<int32_t>(gen() % static_cast<uint64_t>(p.num_classes));
      it.labels = Tensor::from_vector(ys, {m, 1, 1, 1});
    }
    stack.train_micro(items, m);
    stack.step(all);
  };
  // Warm-up at the smallest size; a size of one the model cannot train on becomes 2 (as profile_model).
  int warmed = 0;
  if (sizes.front() == 1) {
    try {
      pass(1);
      ++warmed;
    } catch (const ShapeError&) {
      p.min_micro_batch = 2;
      sizes.front() = 2;
      sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
    }
  }
  for (; warmed < options.warmup; ++warmed) pass(sizes.front());
  p.sizes = sizes;
  const size_t nb = model->num_blocks();
  for (int64_t m : sizes) {
    // Each pass timed on its own (the stack's profile from zero; each call waits for the device after
    // each phase), medians kept as profile_model's: the first pass at a size meets its buffers cold.
    std::vector<std::vector<double>> fwd(nb), bwd(nb);
    std::vector<double> rest;
    const auto t_size = std::chrono::steady_clock::now();
    for (int r = 0; r == 0 || (r < options.repeats && seconds_since(t_size) < options.max_seconds_per_size); ++r) {
      stack.set_profiling(true);
      pass(m);
      const ReplicaStack::Profile& timed = stack.profile();
      for (size_t b = split; b < nb; ++b) fwd[b].push_back(timed.forward[b - split]), bwd[b].push_back(timed.backward[b - split]);
      rest.push_back(timed.assemble + timed.upload + timed.loss + timed.download);
    }
    for (size_t b = 0; b < nb; ++b) {
      p.blocks[b].forward_s.push_back(median(fwd[b]));  // 0 below the split
      p.blocks[b].backward_s.push_back(median(bwd[b]));
    }
    p.loss_s.push_back(median(rest));
  }
  stack.set_profiling(false);
  for (BlockProfile& b : p.blocks) {
    make_non_decreasing(b.forward_s);
    make_non_decreasing(b.backward_s);
  }
  make_non_decreasing(p.loss_s);
  p.seconds = seconds_since(t_start);
  p.validate();
  return p;
}

void profile_stacks(Cluster& c, const std::string& name, const ModelOptions& model_options, size_t split, int stack_max,
                    ProfileOptions options) {
  const size_t devices = c.devices.size();
  PIPAR_CHECK(c.server_profile, "profile_stacks: the cluster has no server profile");
  const Profile& plain = *c.server_profile;
  PIPAR_CHECK(devices >= 1 && stack_max >= 1, devices, " devices in stacks of ", stack_max);
  PIPAR_CHECK(split >= 1 && split < plain.num_blocks(), "split point ", split, " of ", plain.num_blocks(), " blocks");
  options.threads = plain.threads;
  const double per_sample = static_cast<double>(plain.tape_bytes(split, plain.num_blocks()) + 2 * plain.gradient_bytes(split));
  const int64_t max_samples = std::clamp<int64_t>(static_cast<int64_t>(static_cast<double>(1LL << 30) / std::max(per_sample, 1.0)),
                                                  1, 4096);
  std::vector<int> sizes = {static_cast<int>(std::min<size_t>(devices, static_cast<size_t>(stack_max)))};
  if (devices > static_cast<size_t>(stack_max) && devices % static_cast<size_t>(stack_max) != 0)
    sizes.push_back(static_cast<int>(devices % static_cast<size_t>(stack_max)));
  std::vector<std::pair<int, Profile>> out;
  for (int k : sizes) out.emplace_back(k, profile_stack(name, model_options, split, k, options, max_samples));
  c.stack_profiles = std::move(out);
  c.server_stack = stack_max;
  c.stack_split = static_cast<int>(split);
}

Profile estimate_profile(Model& model, double flops_per_s, double fixed_s, const std::vector<int64_t>& sizes) {
  PIPAR_CHECK(flops_per_s > 0 && fixed_s >= 0, "flops_per_s ", flops_per_s, ", fixed_s ", fixed_s);
  Profile p = describe(model);
  p.source = "estimated";
  p.isa = "";
  p.threads = 1;
  p.sizes = sizes;
  for (int64_t m : sizes) p.loss_s.push_back(1e-9 * static_cast<double>(m * p.num_classes));
  for (size_t b = 0; b < model.num_blocks(); ++b) {
    BlockProfile& bp = p.blocks[b];
    const double f = static_cast<double>(model.forward_flops(b, b + 1));
    for (int64_t m : sizes) {
      const double t = fixed_s + f * static_cast<double>(m) / flops_per_s;
      bp.forward_s.push_back(t);
      bp.backward_s.push_back(2 * t);
    }
    bp.step_s = static_cast<double>(bp.params) * 4.0 * 4.0 / 10e9;  // ~4 float streams at 10 GB/s
    bp.tape_bytes = bp.out_floats * 4 * 3;
  }
  p.validate();
  return p;
}

Profile scaled(const Profile& p, double factor) {
  PIPAR_CHECK(factor >= 0 && std::isfinite(factor), "scale factor ", factor);
  Profile q = p;
  for (double& t : q.loss_s) t *= factor;
  for (BlockProfile& b : q.blocks) {
    for (double& t : b.forward_s) t *= factor;
    for (double& t : b.backward_s) t *= factor;
    b.step_s *= factor;
  }
  return q;
}

}  // namespace pipar::planner
