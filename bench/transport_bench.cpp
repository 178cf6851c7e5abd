// Transport throughput and latency on loopback, ours vs a plain blocking TCP socket in the same process.
// Run: build/bench/pipar_bench_transport [--repeats N] [--mb-per-repeat M]
// Ours = encode + DEALER→ROUTER send (through the link's I/O thread) + recv + decode (one copy into a
// fresh Tensor); plain = write()/read() of the same bytes (8-byte length header) into a reused buffer.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/harness.h"
#include "transport/link.h"

using namespace pipar;
using namespace pipar::transport;
using namespace pipar::bench;
using namespace std::chrono_literals;

namespace {

// --- helpers

// --- plain TCP peer

void write_all(int fd, const void* p, size_t n) {
  auto* c = static_cast<const char*>(p);
  while (n) {
    ssize_t k = ::write(fd, c, n);
    if (k <= 0) {
      std::perror("write");
      std::exit(1);
    }
    c += k;
    n -= static_cast<size_t>(k);
  }
}
void read_all(int fd, void* p, size_t n) {
  auto* c = static_cast<char*>(p);
  while (n) {
    ssize_t k = ::read(fd, c, n);
    if (k <= 0) {
      std::perror("read");
      std::exit(1);
    }
    c += k;
    n -= static_cast<size_t>(k);
  }
}

struct TcpPair {
  int a = -1, b = -1;  // a writes, b reads (and back for ping-pong)
  TcpPair() {
    int ls = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (ls < 0 || ::bind(ls, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(ls, 1) != 0) {
      std::perror("tcp listen");
      std::exit(1);
    }
    socklen_t len = sizeof addr;
    ::getsockname(ls, reinterpret_cast<sockaddr*>(&addr), &len);
    a = ::socket(AF_INET, SOCK_STREAM, 0);
    if (::connect(a, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      std::perror("tcp connect");
      std::exit(1);
    }
    b = ::accept(ls, nullptr, nullptr);
    ::close(ls);
    int one = 1;  // ZeroMQ sets TCP_NODELAY too
    ::setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~TcpPair() {
    ::close(a);
    ::close(b);
  }
};

// Seconds to move `count` messages of `bytes` one way (writer thread, reader in the caller).
double plain_tcp_oneway(TcpPair& p, size_t bytes, int count, const std::vector<char>& src, std::vector<char>& dst, bool& ok) {
  const auto t0 = Clock::now();
  std::thread writer([&] {
    for (int i = 0; i < count; ++i) {
      uint64_t n = bytes;
      write_all(p.a, &n, sizeof n);
      write_all(p.a, src.data(), bytes);
    }
  });
  for (int i = 0; i < count; ++i) {
    uint64_t n = 0;
    read_all(p.b, &n, sizeof n);
    if (n != bytes) ok = false;
    read_all(p.b, dst.data(), n);
  }
  const double s = seconds_since(t0);
  writer.join();
  ok = ok && std::memcmp(src.data(), dst.data(), bytes) == 0;
  return s;
}

// --- our transport

double ours_oneway(Server& server, DeviceLink& device, const Activation& act, int count, bool& ok) {
  const auto t0 = Clock::now();
  for (int i = 0; i < count; ++i) device.send(act);  // asynchronous: returns at once
  for (int i = 0; i < count; ++i) {
    auto r = server.recv(30s);
    if (!r || !r->message.ok()) {
      std::fprintf(stderr, "ours: %s\n", r ? r->message.error().c_str() : "timed out");
      std::exit(1);
    }
    const auto& a = std::get<Activation>(r->message.value());
    if (a.data.numel() != act.data.numel() || a.data.data()[a.data.numel() - 1] != act.data.data()[act.data.numel() - 1]) ok = false;
  }
  return seconds_since(t0);
}

}  // namespace

int main(int argc, char** argv) {
  int repeats = 7;
  double mb_per_repeat = 128;
  bool tune_malloc = true;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--repeats" && i + 1 < argc) repeats = std::max(1, std::atoi(argv[++i]));
    else if (a == "--mb-per-repeat" && i + 1 < argc) mb_per_repeat = std::max(1.0, std::atof(argv[++i]));
    else if (a == "--default-malloc") tune_malloc = false;
    else {
      std::printf("usage: %s [--repeats N] [--mb-per-repeat M] [--default-malloc]\n", argv[0]);
      return a == "--help" ? 0 : 2;
    }
  }
  if (tune_malloc) {
    // Keep freed message buffers in the heap instead of returning them to the kernel: otherwise every
    // received tensor page-faults its fresh pages (glibc trims/mmaps blocks of this size by default).
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
  }
  int zmaj, zmin, zpat;
  zmq_version(&zmaj, &zmin, &zpat);
  std::printf("# pipar_bench_transport: loopback, no shaping, one direction (device -> server)\n");
  std::printf("# commit %s, build %s, libzmq %d.%d.%d\n", git_commit().c_str(),
              PIPAR_BUILD_TYPE, zmaj, zmin, zpat);
  std::printf("# cpu %s, %u threads, load average %s\n", cpu_model().c_str(), std::thread::hardware_concurrency(),
              shell_line("cut -d' ' -f1-3 /proc/loadavg").c_str());
  std::printf("# repeats %d (median, min over repeats; noise = (max-min)/median), %.0f MiB per repeat per size\n", repeats, mb_per_repeat);
  std::printf("# malloc: %s\n", tune_malloc ? "mallopt M_MMAP_THRESHOLD=256MiB M_TRIM_THRESHOLD=512MiB (--default-malloc: off)" : "glibc defaults");
  std::printf("# ours = encode + ROUTER/DEALER via the link I/O thread + recv + decode (copy into a new Tensor)\n");
  std::printf("# plain = blocking TCP write()/read() of the same bytes into a reused buffer\n");
  std::printf("# ratio = ours/plain of the medians; paired = median and min of ours/plain per adjacent repeat pair\n\n");

  // Separate ZeroMQ contexts (one I/O thread each), as the server and a device have in separate processes.
  zmq::context_t server_ctx(1), device_ctx(1);
  LinkOptions server_opt, device_opt;
  server_opt.context = &server_ctx;
  device_opt.context = &device_ctx;
  Server server("tcp://127.0.0.1:*", server_opt);
  DeviceLink device(server.bound_endpoint(), 1, device_opt);
  device.send(Heartbeat{1, 0});
  if (!server.recv(5s)) {
    std::fprintf(stderr, "no connection\n");
    return 1;
  }
  TcpPair tcp;

  // --- throughput
  std::printf("%-8s | %-26s | %-26s | %-6s | %-13s | %s\n", "size", "ours GB/s (med, min, noise)", "plain GB/s (med, min, noise)",
              "ratio", "paired (med,min)", "check");
  const size_t sizes_mb[] = {1, 2, 4, 8, 16};
  for (size_t mb : sizes_mb) {
    const size_t bytes = mb << 20;
    const int count = std::max(4, static_cast<int>(mb_per_repeat / static_cast<double>(mb)));
    Activation act;
    act.device = 1;
    act.samples = 1;
    std::vector<float> vals(bytes / 4);
    for (size_t i = 0; i < vals.size(); ++i) vals[i] = static_cast<float>(i % 1000);
    act.data = Tensor::from_vector(vals, Shape4{static_cast<int64_t>(vals.size()), 1, 1, 1});
    std::vector<char> src(bytes), dst(bytes);
    std::memcpy(src.data(), vals.data(), bytes);
    bool ok = true;
    ours_oneway(server, device, act, 2, ok);  // warm-up
    plain_tcp_oneway(tcp, bytes, 2, src, dst, ok);
    std::vector<double> ours, plain, ratios;
    for (int r = 0; r < repeats; ++r) {  // interleaved, so drifting load hits both alike
      ours.push_back(static_cast<double>(count) * static_cast<double>(bytes) / ours_oneway(server, device, act, count, ok) / 1e9);
      plain.push_back(static_cast<double>(count) * static_cast<double>(bytes) / plain_tcp_oneway(tcp, bytes, count, src, dst, ok) / 1e9);
      ratios.push_back(ours.back() / plain.back());
    }
    const Stats o = summarize(ours), p = summarize(plain), q = summarize(ratios);
    char a[64], b[64];
    std::snprintf(a, sizeof a, "%6.2f %6.2f %5.1f%%", o.median, o.min, o.noise_pct());
    std::snprintf(b, sizeof b, "%6.2f %6.2f %5.1f%%", p.median, p.min, p.noise_pct());
    std::printf("%4zu MiB | %-26s | %-26s | %5.2fx | %5.2fx %5.2fx | %s\n", mb, a, b, o.median / p.median, q.median, q.min,
                ok ? "ok" : "MISMATCH");
    std::fflush(stdout);
  }

  // --- latency: round trip of a small message (device -> server -> device)
  std::printf("\n%-8s | %-26s | %-26s | %s\n", "size", "ours RTT us (med, min)", "plain RTT us (med, min)", "ratio");
  const size_t small[] = {64, 1024, 16384, 65536};
  for (size_t bytes : small) {
    const int iters = 200;
    Gradient g{0, 0, 0, 1, 1, Tensor::zeros(Shape4{static_cast<int64_t>(bytes / 4), 1, 1, 1})};
    std::vector<double> ours, plain;
    std::vector<char> src(bytes, 1), dst(bytes);
    for (int i = 0; i < iters + 10; ++i) {
      auto t0 = Clock::now();
      device.send(g);
      auto r = server.recv(5s);
      if (!r) return 1;
      server.send(r->peer, g);
      auto back = device.recv(5s);
      if (!back || !back->ok()) return 1;
      if (i >= 10) ours.push_back(seconds_since(t0) * 1e6);
      t0 = Clock::now();
      uint64_t n = bytes;
      write_all(tcp.a, &n, sizeof n);
      write_all(tcp.a, src.data(), bytes);
      read_all(tcp.b, &n, sizeof n);
      read_all(tcp.b, dst.data(), n);
      write_all(tcp.b, &n, sizeof n);
      write_all(tcp.b, dst.data(), n);
      read_all(tcp.a, &n, sizeof n);
      read_all(tcp.a, dst.data(), n);
      if (i >= 10) plain.push_back(seconds_since(t0) * 1e6);
    }
    const Stats o = summarize(ours), p = summarize(plain);
    char a[64], b[64];
    std::snprintf(a, sizeof a, "%8.1f %8.1f", o.median, o.min);
    std::snprintf(b, sizeof b, "%8.1f %8.1f", p.median, p.min);
    std::printf("%6zu B | %-26s | %-26s | %5.2fx\n", bytes, a, b, o.median / p.median);
  }
  std::printf("\n# plain RTT is single-threaded (both ends in one thread, no wake-ups); ours crosses 4 threads each way.\n");
  return 0;
}
