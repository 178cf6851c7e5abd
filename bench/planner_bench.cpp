// Planner benchmark: measured profiling time of every zoo model, then the search time (shared and
// per-device split points, N in 1..64) for 4 and 16 heterogeneous devices on that measured profile.
// Run: build/bench/pipar_bench_planner [--models vgg5,resnet18] [--threads N] [--repeats R] [--sizes 1,4,16,64]
//      [--json PATH]
// Devices: speeds 1, 1.2, 1.4, 1.6 (cycled), uplinks 5 + 3*d Mbit/s, downlink 25, latency 2 ms,
// 3750 samples each; the server's profile is the device profile scaled by 0.1 (a faster machine).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "bench/harness.h"
#include "kernels/parallel.h"
#include "planner/search.h"

using namespace pipar;
using namespace pipar::planner;
using namespace pipar::bench;

namespace {

Cluster make_cluster(const Profile& p, int k) {
  Cluster c;
  c.device_profiles = {p};
  c.server_profile = scaled(p, 0.1);
  c.batch_size = 100;
  for (int d = 0; d < k; ++d) {
    DeviceSpec s;
    s.link = {5.0 + 3.0 * d, 25, 0.002, 0};
    s.time_scale = 1.0 + 0.2 * (d % 4);
    s.samples = 3750;
    c.devices.push_back(s);
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> models = model_names();
  ProfileOptions po;
  int repeats = 5;
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return option_value(argc, argv, i); };
    if (a == "--models") models = split_list(next());
    else if (a == "--threads") po.threads = std::atoi(next().c_str());
    else if (a == "--repeats") repeats = std::max(1, std::atoi(next().c_str()));
    else if (a == "--sizes") {
      po.sizes.clear();
      for (const std::string& s : split_list(next())) po.sizes.push_back(std::atoll(s.c_str()));
    } else if (a == "--json") json_path = next();
    else {
      std::fprintf(stderr, "usage: %s [--models a,b] [--threads N] [--repeats R] [--sizes 1,4,16,64] [--json PATH]\n", argv[0]);
      return a == "--help" ? 0 : 2;
    }
  }
  if (po.threads > 0) kernels::set_num_threads(po.threads);
  std::string sizes;
  for (int64_t s : po.sizes) sizes += (sizes.empty() ? "" : ",") + std::to_string(s);
  std::printf("pipar_bench_planner | CPU %s, %d threads, ISA %s | profile sizes %s, warm-up %d, repeats %d | search repeats %d\n",
              cpu_model().c_str(), kernels::num_threads(), kernels::isa_name(kernels::cpu_isa()), sizes.c_str(), po.warmup,
              po.repeats, repeats);
  std::printf("devices: speeds 1..1.6, uplinks 5+3d Mbit/s, down 25, latency 2 ms, 3750 samples; server = profile x 0.1\n\n");
  std::printf("%-18s %6s %10s | %3s %12s %8s %8s %6s | %s\n", "model", "blocks", "profile s", "K", "search ms", "min ms", "noise%",
              "evals", "best plan (predicted)");
  nlohmann::json rows = nlohmann::json::array();
  for (const std::string& name : models) {
    const auto t0 = std::chrono::steady_clock::now();
    const Profile p = profile_model(name, ModelOptions{}, po);
    const double profile_s = seconds_since(t0);
    for (int k : {4, 16}) {
      const CostModel model(make_cluster(p, k));
      std::vector<double> times;
      SearchResult r;
      for (int rep = 0; rep < repeats; ++rep) {
        r = search(model);
        times.push_back(r.seconds);
      }
      const Stats st = summarize(times);
      std::printf("%-18s %6zu %10.2f | %3d %12.1f %8.1f %8.0f %6d | %s\n", name.c_str(), p.num_blocks(), profile_s, k,
                  st.median * 1e3, st.min * 1e3, st.noise_pct(), r.evaluated, r.best.describe().c_str());
      std::fflush(stdout);
      rows.push_back({{"model", name},
                      {"blocks", p.num_blocks()},
                      {"profile_s", profile_s},
                      {"devices", k},
                      {"search_median_s", st.median},
                      {"search_min_s", st.min},
                      {"evaluations", r.evaluated},
                      {"best", nlohmann::json::parse(r.best.to_json())}});
    }
  }
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << rows.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
  }
  return 0;
}
