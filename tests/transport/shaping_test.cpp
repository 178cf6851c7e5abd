// Link shaping: the Pacer's arithmetic on a synthetic clock, then end to end over loopback sockets:
// a transfer at a set rate takes bytes*8/rate within 10%, latency adds its delay, messages queue,
// set_rate() applies mid-transfer, and send() never blocks the caller.
#include <gtest/gtest.h>

#include <thread>

#include "transport/link.h"

namespace pipar::transport {
namespace {

using namespace std::chrono_literals;

// Links number their messages (session + seq in the envelope): sizes on the wire include both.
constexpr Sequence kOnWire{1, 1};
using Secs = std::chrono::duration<double>;

double secs(Clock::duration d) { return Secs(d).count(); }

// --- Pacer on a synthetic clock

TEST(ShapingPacer, UnlimitedIsImmediate) {
  Pacer p;
  const auto t0 = Clock::time_point{} + 1s;
  p.push(1000000, t0);
  auto due = p.pop_due(t0);
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].started, t0);
  EXPECT_EQ(due[0].finished, t0);
  EXPECT_TRUE(p.empty());
}

TEST(ShapingPacer, RateQueueAndLatency) {
  Pacer p(LinkShape{8, 50});  // 8 Mbit/s = 1 MB/s, 50 ms latency
  const auto t0 = Clock::time_point{} + 1s;
  p.push(100000, t0);  // 0.1 s on the link
  p.push(200000, t0);  // queued behind: 0.2 s more
  EXPECT_TRUE(p.pop_due(t0 + 100ms).empty());  // finished at 0.1 s, due at 0.15 s
  ASSERT_TRUE(p.next_event().has_value());
  EXPECT_NEAR(secs(*p.next_event() - t0), 0.15, 1e-6);
  auto a = p.pop_due(t0 + 150ms);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_NEAR(secs(a[0].finished - t0), 0.1, 1e-6);
  auto b = p.pop_due(t0 + 400ms);
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(b[0].started, a[0].finished);
  EXPECT_NEAR(secs(b[0].finished - t0), 0.3, 1e-6);
  EXPECT_NEAR(secs(b[0].due - t0), 0.35, 1e-6);
}

TEST(ShapingPacer, IdleLinkStartsAtEnqueue) {
  Pacer p(LinkShape{8, 0});
  const auto t0 = Clock::time_point{} + 1s;
  p.push(100000, t0);
  ASSERT_EQ(p.pop_due(t0 + 1s).size(), 1u);
  p.push(100000, t0 + 2s);  // the link was idle: starts at once, not at t0 + 0.1 s
  auto d = p.pop_due(t0 + 3s);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_NEAR(secs(d[0].started - t0), 2.0, 1e-6);
  EXPECT_NEAR(secs(d[0].finished - t0), 2.1, 1e-6);
}

TEST(ShapingPacer, RateChangeMidTransfer) {
  Pacer p(LinkShape{8, 0});  // 1 MB/s
  const auto t0 = Clock::time_point{} + 1s;
  p.push(1000000, t0);            // 1 s at 8 Mbit/s
  p.set_rate(80, t0 + 500ms);     // half sent; the other 0.5 MB at 10 MB/s = 0.05 s
  auto d = p.pop_due(t0 + 2s);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_NEAR(secs(d[0].finished - t0), 0.55, 1e-6);
  p.push(1000, t0 + 3s);
  p.set_rate(0, t0 + 3s);         // unlimited again
  EXPECT_EQ(p.pop_due(t0 + 3s).size(), 1u);
}

// --- end to end over loopback

struct Pair {
  Server server{"tcp://127.0.0.1:*"};
  DeviceLink device;
  explicit Pair(LinkShape up = {}) : device(server.bound_endpoint(), 1, options(up)) {
    // Warm the connection so that connect time is not measured.
    device.send(Hello{.device = 1});
    auto r = server.recv(2s);
    EXPECT_TRUE(r && r->message.ok());
  }
  static LinkOptions options(LinkShape s) {
    LinkOptions o;
    o.shape = s;
    return o;
  }
};

Activation activation_of_bytes(size_t bytes) {
  Activation a;
  a.device = 1;
  a.data = Tensor::zeros(Shape4{static_cast<int64_t>(bytes / 4), 1, 1, 1});
  return a;
}

// Seconds from `start` until the server has the next message (fails the test after `limit`).
double wait_server(Server& s, Clock::time_point start, std::chrono::milliseconds limit = 3s) {
  auto r = s.recv(limit);
  EXPECT_TRUE(r.has_value()) << "no message within the limit";
  if (r) {
    EXPECT_TRUE(r->message.ok()) << r->message.error();
  }
  return secs(Clock::now() - start);
}

TEST(ShapingLink, RateTakesExpectedTimeEndToEnd) {
  Pair p(LinkShape{20, 0});
  Activation a = activation_of_bytes(2 << 20);  // 2 MiB at 20 Mbit/s ≈ 0.84 s
  const double bytes = static_cast<double>(frames_bytes(encode(a, kOnWire)));
  const double expected = bytes * 8 / 20e6;
  const auto t0 = Clock::now();
  p.device.send(a);
  const double send_returned = secs(Clock::now() - t0);
  const double took = wait_server(p.server, t0);
  EXPECT_LT(send_returned, 0.05) << "send() must not wait for the link";
  EXPECT_NEAR(took, expected, 0.1 * expected) << "expected " << expected << " s";
  // The transfer record tells the same story.
  auto recs = p.device.take_transfers();
  ASSERT_FALSE(recs.empty());
  const auto& r = recs.back();
  EXPECT_TRUE(r.ok);
  EXPECT_EQ(r.type, MessageType::kActivation);
  EXPECT_EQ(r.bytes, static_cast<size_t>(bytes));
  EXPECT_NEAR(secs(r.finished - r.started), expected, 0.01);
  EXPECT_GE(p.device.stats().bytes_sent, static_cast<uint64_t>(bytes));
}

TEST(ShapingLink, LatencyAddsDelayAndMessagesQueue) {
  Pair p(LinkShape{40, 120});
  Activation a = activation_of_bytes(500000);  // 0.1 s each at 40 Mbit/s
  const double one = static_cast<double>(frames_bytes(encode(a, kOnWire))) * 8 / 40e6;
  const auto t0 = Clock::now();
  p.device.send(a);
  p.device.send(a);  // queues behind the first
  const double first = wait_server(p.server, t0);
  const double second = wait_server(p.server, t0);
  EXPECT_NEAR(first, one + 0.12, 0.1 * (one + 0.12));
  EXPECT_NEAR(second, 2 * one + 0.12, 0.1 * (2 * one + 0.12));
  auto recs = p.device.take_transfers();
  ASSERT_GE(recs.size(), 2u);
  const auto& r1 = recs[recs.size() - 2];
  const auto& r2 = recs.back();
  EXPECT_EQ(r2.started, r1.finished);  // back to back on the link
  EXPECT_GE(secs(r2.delivered - r2.finished), 0.119);
}

TEST(ShapingLink, RateChangeAtRunTime) {
  Pair p(LinkShape{10, 0});
  Activation a = activation_of_bytes(2 << 20);  // 1.68 s at 10 Mbit/s, unless sped up
  const double bits = static_cast<double>(frames_bytes(encode(a, kOnWire))) * 8;
  const auto t0 = Clock::now();
  p.device.send(a);
  std::this_thread::sleep_for(200ms);
  const double t_change = secs(Clock::now() - t0);
  p.device.set_rate(80);
  const double expected = t_change + (bits - t_change * 10e6) / 80e6;
  const double took = wait_server(p.server, t0);
  EXPECT_NEAR(took, expected, 0.1 * expected) << "rate change at " << t_change << " s";
  EXPECT_EQ(p.device.shape().rate_mbps, 80);
}

TEST(ShapingLink, ServerDownlinkPerPeer) {
  Pair p;
  const PeerId peer = routing_id(1);
  p.server.set_rate(peer, 20);
  Gradient g{0, 0, 0, 1, 1, Tensor::zeros(Shape4{250000, 1, 1, 1})};  // 1 MB at 20 Mbit/s ≈ 0.4 s
  const double expected = static_cast<double>(frames_bytes(encode(g, kOnWire))) * 8 / 20e6;
  const auto t0 = Clock::now();
  p.server.send(peer, g);
  auto r = p.device.recv(3s);
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(r->ok()) << r->error();
  EXPECT_NEAR(secs(Clock::now() - t0), expected, 0.1 * expected);
  EXPECT_EQ(p.server.shape(peer).rate_mbps, 20);
  EXPECT_GE(p.server.stats(peer).bytes_sent, 1000000u);
  EXPECT_GE(p.device.stats().bytes_received, 1000000u);
}

}  // namespace
}  // namespace pipar::transport
