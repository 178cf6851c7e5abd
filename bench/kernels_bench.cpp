// VGG5 conv and linear layers (FMNIST and CIFAR-10 shapes, batch 100 and micro-batch 10) through the
// CPU kernels: forward, backward-input and backward-weight(+bias) timed separately, with GFLOP/s
// against the measured FMA peak and a point check against a double reference.
// Run: build/bench/pipar_bench_kernels [--threads N] [--repeats R] [--warmup W] [--json PATH]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bench/harness.h"
#include "kernels/ops.h"
#include "kernels/parallel.h"

namespace {

using pipar::ConstView;
using pipar::Device;
using pipar::Shape4;
using pipar::View;
namespace k = pipar::kernels;

// --- layers -----------------------------------------------------------------------------------------

struct Layer {
  std::string name;  // e.g. "fmnist.conv2"
  bool conv;
  int64_t c, h, w, k;  // conv: x [n, c, h, w], 3x3 pad 1 → k channels; linear: in = c, out = k
};

const std::vector<Layer> kLayers = {
    {"fmnist.conv1", true, 1, 28, 28, 32},  {"fmnist.conv2", true, 32, 14, 14, 64},
    {"fmnist.conv3", true, 64, 7, 7, 64},   {"fmnist.fc1", false, 3136, 1, 1, 128},
    {"fmnist.fc2", false, 128, 1, 1, 10},   {"cifar10.conv1", true, 3, 32, 32, 32},
    {"cifar10.conv2", true, 32, 16, 16, 64}, {"cifar10.conv3", true, 64, 8, 8, 64},
    {"cifar10.fc1", false, 4096, 1, 1, 128}, {"cifar10.fc2", false, 128, 1, 1, 10},
};

k::Conv2dParams conv3x3() {
  k::Conv2dParams p;
  p.kh = p.kw = 3, p.sh = p.sw = 1, p.ph = p.pw = 1;
  return p;
}

// --- timing -----------------------------------------------------------------------------------------

struct Timing {
  double median_ms, min_ms, noise_pct;  // noise: (p75 - p25) / median
};

template <class F>
Timing time_it(F&& f, int warmup, int repeats) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> ms(repeats);
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ms[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[repeats / 2];
  const double spread = ms[(3 * repeats) / 4] - ms[repeats / 4];
  return {med, ms[0], med > 0 ? 100.0 * spread / med : 0.0};
}

// --- machine ----------------------------------------------------------------------------------------

using pipar::bench::cpu_model;
using pipar::bench::git_commit;
using pipar::bench::option_value;

// FMA throughput per thread: 12 independent accumulator chains (latency 4 × 2-3 pipes), many
// iterations; returns flops (2 per lane per FMA) per second for one thread.
#if defined(__x86_64__)
__attribute__((target("avx512f"))) double fma_loop_avx512(int64_t iters) {
  __m512 acc[12];
#pragma GCC unroll 12
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, a);
  __m512 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
  float lanes[16];
  _mm512_storeu_ps(lanes, s);
  double t = 0;
  for (float v : lanes) t += v;
  return t;
}
__attribute__((target("avx2,fma"))) double fma_loop_avx2(int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
  const __m256 m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], m, a);
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  float lanes[8];
  _mm256_storeu_ps(lanes, s);
  double t = 0;
  for (float v : lanes) t += v;
  return t;
}
#endif
double fma_loop_generic(int64_t iters) {
  float acc[12][4];
  for (int i = 0; i < 12; ++i)
    for (int l = 0; l < 4; ++l) acc[i][l] = 1.0f + i * 1e-3f;
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i)
#pragma GCC unroll 4
      for (int l = 0; l < 4; ++l) acc[i][l] = acc[i][l] * 0.999999f + 1e-7f;
  double t = 0;
  for (int i = 0; i < 12; ++i)
    for (int l = 0; l < 4; ++l) t += acc[i][l];
  return t;
}

// Peak GFLOP/s: one thread's FMA throughput with the widest ISA (best of 3), times the thread count
// (measured per thread so that other processes on the machine do not hide the per-core peak).
double measure_peak_gflops(int threads, k::Isa isa) {
  const int64_t iters = 5'000'000;
  double lanes_flops = 2.0 * 4 * 12;  // flops per iteration
  auto run = [&](int64_t n) -> double {
#if defined(__x86_64__)
    if (isa == k::Isa::kAvx512) return fma_loop_avx512(n);
    if (isa == k::Isa::kAvx2) return fma_loop_avx2(n);
#endif
    return fma_loop_generic(n);
  };
#if defined(__x86_64__)
  if (isa == k::Isa::kAvx512) lanes_flops = 2.0 * 16 * 12;
  if (isa == k::Isa::kAvx2) lanes_flops = 2.0 * 8 * 12;
#endif
  double sink = run(iters / 4);  // warm up clocks
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    sink += run(iters);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, lanes_flops * iters / s / 1e9);
  }
  if (sink == 42.0) std::printf(" ");  // keeps the loops alive
  return best * threads;
}

// --- point checks against a double reference --------------------------------------------------------
// Max relative error |ours - ref| / (sum of |terms|) over a few random output points.

struct Buffers {
  std::vector<float> x, w, b, y, dy, dx, dw, db;
};

double check_conv(const Layer& L, int64_t n, const Buffers& B, const std::string& pass, std::mt19937& rng) {
  const int64_t H = L.h, W = L.w, C = L.c, K = L.k;
  double worst = 0;
  for (int t = 0; t < 24; ++t) {
    double ref = 0, mag = 0, got = 0;
    if (pass == "forward") {
      const int64_t s = rng() % n, oc = rng() % K, oy = rng() % H, ox = rng() % W;
      ref = B.b[oc], mag = std::abs(ref);
      for (int64_t c = 0; c < C; ++c)
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) {
            const int64_t iy = oy - 1 + i, ix = ox - 1 + j;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            const double v = double(B.x[((s * C + c) * H + iy) * W + ix]) * B.w[((oc * C + c) * 3 + i) * 3 + j];
            ref += v, mag += std::abs(v);
          }
      got = B.y[((s * K + oc) * H + oy) * W + ox];
    } else if (pass == "backward_input") {
      const int64_t s = rng() % n, c = rng() % C, iy = rng() % H, ix = rng() % W;
      for (int64_t oc = 0; oc < K; ++oc)
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) {
            const int64_t oy = iy + 1 - i, ox = ix + 1 - j;
            if (oy < 0 || oy >= H || ox < 0 || ox >= W) continue;
            const double v = double(B.dy[((s * K + oc) * H + oy) * W + ox]) * B.w[((oc * C + c) * 3 + i) * 3 + j];
            ref += v, mag += std::abs(v);
          }
      got = B.dx[((s * C + c) * H + iy) * W + ix];
    } else {
      const int64_t oc = rng() % K, c = rng() % C, i = rng() % 3, j = rng() % 3;
      for (int64_t s = 0; s < n; ++s)
        for (int64_t oy = 0; oy < H; ++oy)
          for (int64_t ox = 0; ox < W; ++ox) {
            const int64_t iy = oy - 1 + i, ix = ox - 1 + j;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            const double v = double(B.dy[((s * K + oc) * H + oy) * W + ox]) * B.x[((s * C + c) * H + iy) * W + ix];
            ref += v, mag += std::abs(v);
          }
      got = B.dw[((oc * C + c) * 3 + i) * 3 + j];
    }
    worst = std::max(worst, std::abs(got - ref) / std::max(mag, 1e-30));
  }
  return worst;
}

double check_linear(const Layer& L, int64_t n, const Buffers& B, const std::string& pass, std::mt19937& rng) {
  const int64_t in = L.c, out = L.k;
  double worst = 0;
  for (int t = 0; t < 24; ++t) {
    double ref = 0, mag = 0, got = 0;
    if (pass == "forward") {
      const int64_t s = rng() % n, o = rng() % out;
      ref = B.b[o], mag = std::abs(ref);
      for (int64_t i = 0; i < in; ++i) {
        const double v = double(B.x[s * in + i]) * B.w[o * in + i];
        ref += v, mag += std::abs(v);
      }
      got = B.y[s * out + o];
    } else if (pass == "backward_input") {
      const int64_t s = rng() % n, i = rng() % in;
      for (int64_t o = 0; o < out; ++o) {
        const double v = double(B.dy[s * out + o]) * B.w[o * in + i];
        ref += v, mag += std::abs(v);
      }
      got = B.dx[s * in + i];
    } else {
      const int64_t o = rng() % out, i = rng() % in;
      for (int64_t s = 0; s < n; ++s) {
        const double v = double(B.dy[s * out + o]) * B.x[s * in + i];
        ref += v, mag += std::abs(v);
      }
      got = B.dw[o * in + i];
    }
    worst = std::max(worst, std::abs(got - ref) / std::max(mag, 1e-30));
  }
  return worst;
}

// --- main -------------------------------------------------------------------------------------------

struct Row {
  std::string layer, pass;
  int64_t batch;
  Timing t;
  double gflops, check;
};

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, repeats = 30, warmup = 5;
  std::string json_path, only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return option_value(argc, argv, i); };
    if (a == "--threads") threads = std::atoi(next().c_str());
    else if (a == "--repeats") repeats = std::max(1, std::atoi(next().c_str()));
    else if (a == "--warmup") warmup = std::max(0, std::atoi(next().c_str()));
    else if (a == "--json") json_path = next();
    else if (a == "--layer") only = next();
    else {
      std::fprintf(stderr,
                   "usage: %s [--threads N] [--repeats R] [--warmup W] [--json PATH] [--layer SUBSTRING]\n", argv[0]);
      return a == "--help" ? 0 : 2;
    }
  }
  k::set_num_threads(threads);
  threads = k::num_threads();
  const k::Isa isa = k::cpu_isa();
  const double peak = measure_peak_gflops(threads, isa);

  std::printf("# pipar_bench_kernels: VGG5 conv (3x3, pad 1) and linear layers, CPU kernels\n");
  std::printf("# commit %s | cpu %s | hardware threads %d | threads %d | isa %s\n", git_commit().c_str(),
              cpu_model().c_str(), k::hardware_threads(), threads, k::isa_name(isa));
  std::printf("# warmup %d, repeats %d; times in ms (median, min, noise = IQR/median); FMA peak %.1f GFLOP/s (1 thread measured x threads)\n",
              warmup, repeats, peak);
  std::printf("# check: max |ours - ref| / sum|terms| over 24 random output points (double reference)\n");
  std::printf("%-15s %-16s %5s %9s %9s %7s %9s %7s %9s\n", "layer", "pass", "batch", "median", "min", "noise%",
              "GFLOP/s", "%peak", "check");

  std::vector<Row> rows;
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  auto fill = [&](std::vector<float>& v, size_t n) {
    v.resize(n);
    for (auto& e : v) e = uni(rng);
  };
  for (const Layer& L : kLayers) {
    if (!only.empty() && L.name.find(only) == std::string::npos) continue;
    for (int64_t n : {int64_t{100}, int64_t{10}}) {
      Buffers B;
      Shape4 xs, ws, ys, bs{L.k, 1, 1, 1};
      int64_t flops;
      if (L.conv) {
        xs = {n, L.c, L.h, L.w}, ws = {L.k, L.c, 3, 3};
        ys = k::conv2d_out_shape(xs, ws, conv3x3());
        flops = k::conv2d_flops(xs, ws, conv3x3());
      } else {
        xs = {n, L.c, 1, 1}, ws = {L.k, L.c, 1, 1}, ys = {n, L.k, 1, 1};
        flops = 2 * n * L.c * L.k;
      }
      fill(B.x, xs.numel()), fill(B.w, ws.numel()), fill(B.b, L.k), fill(B.dy, ys.numel());
      B.y.assign(ys.numel(), 0), B.dx.assign(xs.numel(), 0), B.dw.assign(ws.numel(), 0), B.db.assign(L.k, 0);
      const ConstView x{B.x.data(), xs, Device::kCpu}, w{B.w.data(), ws, Device::kCpu}, b{B.b.data(), bs, Device::kCpu},
          dy{B.dy.data(), ys, Device::kCpu};
      const View y{B.y.data(), ys, Device::kCpu}, dx{B.dx.data(), xs, Device::kCpu}, dw{B.dw.data(), ws, Device::kCpu},
          db{B.db.data(), bs, Device::kCpu};
      const k::Conv2dParams p = conv3x3();
      for (const std::string pass : {"forward", "backward_input", "backward_weight"}) {
        Timing t;
        if (pass == "forward")
          t = time_it([&] { L.conv ? k::conv2d_forward(p, x, w, b, y) : k::linear_forward(x, w, b, y); }, warmup, repeats);
        else if (pass == "backward_input")
          t = time_it([&] { L.conv ? k::conv2d_backward_input(p, dy, w, dx) : k::linear_backward_input(dy, w, dx); },
                      warmup, repeats);
        else
          t = time_it(
              [&] {
                if (L.conv) k::conv2d_backward_weight(p, x, dy, dw), k::conv2d_backward_bias(dy, db);
                else k::linear_backward_weight(x, dy, dw), k::linear_backward_bias(dy, db);
              },
              warmup, repeats);
        if (pass == "backward_weight") {  // dw accumulated over every call: recompute once from zero to check
          std::fill(B.dw.begin(), B.dw.end(), 0.0f);
          L.conv ? k::conv2d_backward_weight(p, x, dy, dw) : k::linear_backward_weight(x, dy, dw);
        }
        const double check = L.conv ? check_conv(L, n, B, pass, rng) : check_linear(L, n, B, pass, rng);
        const double gf = flops / (t.median_ms * 1e-3) / 1e9;
        rows.push_back({L.name, pass, n, t, gf, check});
        std::printf("%-15s %-16s %5lld %9.4f %9.4f %7.1f %9.1f %7.1f %9.1e\n", L.name.c_str(), pass.c_str(),
                    static_cast<long long>(n), t.median_ms, t.min_ms, t.noise_pct, gf, 100.0 * gf / peak, check);
        std::fflush(stdout);
      }
    }
  }

  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "{\n  \"threads\": " << threads << ",\n  \"isa\": \"" << k::isa_name(isa) << "\",\n  \"peak_gflops\": " << peak
        << ",\n  \"cpu\": \"" << cpu_model() << "\",\n  \"commit\": \"" << git_commit() << "\",\n  \"rows\": [\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      out << "    {\"layer\": \"" << r.layer << "\", \"pass\": \"" << r.pass << "\", \"batch\": " << r.batch
          << ", \"median_ms\": " << r.t.median_ms << ", \"min_ms\": " << r.t.min_ms << ", \"noise_pct\": " << r.t.noise_pct
          << ", \"gflops\": " << r.gflops << ", \"check\": " << r.check << "}" << (i + 1 < rows.size() ? "," : "")
          << "\n";
    }
    out << "  ]\n}\n";
  }
  return 0;
}
