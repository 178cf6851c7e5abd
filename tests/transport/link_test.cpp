// Real sockets on tcp://127.0.0.1:* (port read back) and inproc://: a server and 3 devices exchange
// hellos, plans, activations and gradients; a peer sending garbage gets an ErrorReply while the others
// are served; silent peers are timeouts, never hangs.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <set>
#include <thread>

#include "tests/random.h"
#include "transport/link.h"

namespace pipar::transport {
namespace {

using namespace std::chrono_literals;

constexpr auto kWait = 3s;  // generous upper bound for anything that should arrive at once

template <class T>
T expect_message(std::optional<Result<Message>> r) {
  EXPECT_TRUE(r.has_value()) << "timed out";
  if (!r) return T{};
  EXPECT_TRUE(r->ok()) << r->error();
  if (!r->ok() || !std::holds_alternative<T>(r->value())) {
    ADD_FAILURE() << "unexpected message type";
    return T{};
  }
  return std::get<T>(r->value());
}

TEST(TransportLink, BoundEndpointHasRealPort) {
  Server s("tcp://127.0.0.1:*");
  const std::string ep = s.bound_endpoint();
  ASSERT_EQ(ep.rfind("tcp://127.0.0.1:", 0), 0u) << ep;
  const int port = std::stoi(ep.substr(std::strlen("tcp://127.0.0.1:")));
  EXPECT_GT(port, 0);
  EXPECT_THROW(Server("tcp://127.0.0.1:" + std::to_string(port)), Error);  // already bound: a real error
}

TEST(TransportLink, RoutingIds) {
  EXPECT_EQ(routing_id(12), "pipar-dev-12");
  EXPECT_EQ(device_of("pipar-dev-12"), std::optional<uint32_t>(12));
  EXPECT_EQ(device_of("pipar-dev-"), std::nullopt);
  EXPECT_EQ(device_of("pipar-dev-99999999999"), std::nullopt);
  EXPECT_EQ(device_of(std::string("\0abcd", 5)), std::nullopt);
}

TEST(TransportLink, ThreeDevicesHelloPlanActivationGradient) {
  SCOPED_TRACE(test::seed_trace());
  test::Rng rng(11);
  Server server("tcp://127.0.0.1:*");
  std::vector<std::unique_ptr<DeviceLink>> devices;
  for (uint32_t d = 0; d < 3; ++d) devices.push_back(std::make_unique<DeviceLink>(server.bound_endpoint(), d));
  for (auto& d : devices) d->send(Hello{d->device(), kProtocolVersion, "cpu", 0, 100 + d->device(), {}});

  std::set<uint32_t> hellos;
  for (int i = 0; i < 3; ++i) {
    auto r = server.recv(kWait);
    ASSERT_TRUE(r.has_value());
    ASSERT_TRUE(r->message.ok()) << r->message.error();
    const auto& h = std::get<Hello>(r->message.value());
    ASSERT_EQ(r->device, std::optional<uint32_t>(h.device));
    EXPECT_EQ(h.data_size, 100 + h.device);
    hellos.insert(h.device);
    Plan p;
    p.round = 1;
    p.mode = "pipar";
    p.micro_batches = 2;
    server.send(r->peer, p);
  }
  EXPECT_EQ(hellos.size(), 3u);
  for (auto& d : devices) EXPECT_EQ(expect_message<Plan>(d->recv(kWait)).micro_batches, 2);

  // Each device uploads 2 micro-batches; the server answers each with a gradient of the same shape.
  std::map<std::pair<uint32_t, int>, std::vector<float>> sent;
  for (auto& d : devices)
    for (int mb = 0; mb < 2; ++mb) {
      Activation a;
      a.round = 1;
      a.micro_batch = mb;
      a.device = d->device();
      a.samples = 4;
      a.data = Tensor::from_vector(rng.uniform_vec(4 * 8 * 3 * 3), Shape4{4, 8, 3, 3});
      a.labels = Tensor::from_vector(std::vector<int32_t>{1, 2, 3, 4}, Shape4{4, 1, 1, 1});
      sent[{d->device(), mb}] = a.data.to_vector();
      d->send(a);
    }
  for (int i = 0; i < 6; ++i) {
    auto r = server.recv(kWait);
    ASSERT_TRUE(r.has_value());
    ASSERT_TRUE(r->message.ok()) << r->message.error();
    const auto& a = std::get<Activation>(r->message.value());
    EXPECT_EQ(a.data.to_vector(), (sent[{a.device, a.micro_batch}]));
    EXPECT_EQ(a.labels.to_ivector(), (std::vector<int32_t>{1, 2, 3, 4}));
    server.send(r->peer, Gradient{a.round, a.batch, a.micro_batch, a.device, a.samples, a.data});
  }
  for (auto& d : devices)
    for (int mb = 0; mb < 2; ++mb) {
      Gradient g = expect_message<Gradient>(d->recv(kWait));
      EXPECT_EQ(g.device, d->device());
      EXPECT_EQ(g.micro_batch, mb);  // per-peer order is kept
      EXPECT_EQ(g.data.to_vector(), (sent[{d->device(), mb}]));
    }
  ASSERT_TRUE(server.flush(kWait));
  const LinkStats st = server.stats(routing_id(0));
  EXPECT_EQ(st.messages_received, 3u);
  EXPECT_EQ(st.messages_sent, 3u);
  EXPECT_EQ(st.bytes_received, devices[0]->stats().bytes_sent);
  EXPECT_EQ(st.bytes_sent, devices[0]->stats().bytes_received);
  EXPECT_EQ(server.total_stats().messages_received, 9u);
  EXPECT_TRUE(server.last_seen(routing_id(2)).has_value());
}

TEST(TransportLink, GarbageGetsErrorReplyOthersStillServed) {
  Server server("tcp://127.0.0.1:*");
  DeviceLink good(server.bound_endpoint(), 1);
  zmq::socket_t evil(default_context(), zmq::socket_type::dealer);
  evil.set(zmq::sockopt::linger, 0);
  evil.set(zmq::sockopt::rcvtimeo, 3000);
  evil.set(zmq::sockopt::routing_id, routing_id(9));
  evil.connect(server.bound_endpoint());

  const char junk[] = "PIPRnot a flatbuffer at all";
  evil.send(zmq::buffer(junk, sizeof junk), zmq::send_flags::sndmore);
  evil.send(zmq::str_buffer("payload"), zmq::send_flags::none);
  good.send(Heartbeat{1, 42});

  int bad = 0, ok = 0;
  for (int i = 0; i < 2; ++i) {
    auto r = server.recv(kWait);
    ASSERT_TRUE(r.has_value());
    if (r->message.ok()) {
      ++ok;
      EXPECT_EQ(std::get<Heartbeat>(r->message.value()).time_ns, 42);
    } else {
      ++bad;
      EXPECT_EQ(r->device, std::optional<uint32_t>(9));
    }
  }
  EXPECT_EQ(bad, 1);
  EXPECT_EQ(ok, 1);

  // The garbage sender got an ErrorReply it can decode.
  Frames reply;
  for (bool more = true; more;) {
    zmq::message_t m;
    ASSERT_TRUE(evil.recv(m)) << "no error reply";
    more = m.more();
    reply.push_back(std::move(m));
  }
  auto err = decode(reply);
  ASSERT_TRUE(err.ok()) << err.error();
  EXPECT_EQ(std::get<ErrorReply>(err.value()).code, ErrorCode::kMalformed);

  // A device claiming another device's id is rejected too.
  good.send(Heartbeat{2, 0});
  auto spoof = server.recv(kWait);
  ASSERT_TRUE(spoof.has_value());
  EXPECT_FALSE(spoof->message.ok());
  EXPECT_EQ(expect_message<ErrorReply>(good.recv(kWait)).code, ErrorCode::kMalformed);

  // And the server keeps serving the good device.
  good.send(Heartbeat{1, 43});
  auto again = server.recv(kWait);
  ASSERT_TRUE(again && again->message.ok());
  server.send(routing_id(1), Heartbeat{0, 7});
  EXPECT_EQ(expect_message<Heartbeat>(good.recv(kWait)).time_ns, 7);
}

TEST(TransportLink, SilentPeersAreTimeouts) {
  Server server("tcp://127.0.0.1:*");
  auto t0 = Clock::now();
  EXPECT_FALSE(server.recv(100ms).has_value());
  EXPECT_LT(Clock::now() - t0, 1s);

  DeviceLink device(server.bound_endpoint(), 4);
  t0 = Clock::now();
  EXPECT_FALSE(device.recv(100ms).has_value());
  EXPECT_LT(Clock::now() - t0, 1s);

  // A device pointed at a port nobody listens on: sends queue, receives time out, destruction is prompt.
  std::string dead_ep;
  {
    Server tmp("tcp://127.0.0.1:*");
    dead_ep = tmp.bound_endpoint();
  }
  t0 = Clock::now();
  {
    DeviceLink lost(dead_ep, 5);
    lost.send(Hello{.device = 5});
    EXPECT_FALSE(lost.recv(100ms).has_value());
  }
  EXPECT_LT(Clock::now() - t0, 2s);

  // Sending to a peer that never connected: dropped and recorded, flush does not hang.
  server.send(routing_id(77), Heartbeat{});
  EXPECT_TRUE(server.flush(kWait));
  auto recs = server.take_transfers();
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_FALSE(recs[0].ok);
}

TEST(TransportLink, InprocAndHeartbeats) {
  Server server("inproc://pipar-link-test");
  LinkOptions opt;
  opt.heartbeat_interval = 50ms;
  DeviceLink device("inproc://pipar-link-test", 3, opt);
  auto r = server.recv(kWait);
  ASSERT_TRUE(r && r->message.ok());
  EXPECT_EQ(message_type(r->message.value()), MessageType::kHeartbeat);
  EXPECT_EQ(std::get<Heartbeat>(r->message.value()).device, 3u);
  r = server.recv(kWait);
  ASSERT_TRUE(r && r->message.ok());
  EXPECT_TRUE(server.last_seen(routing_id(3)).has_value());
}

TEST(TransportLink, OversizedFrameIsRefusedBySocket) {
  // ZMQ_MAXMSGSIZE comes from the limits: the server drops the connection of a peer sending a bigger
  // frame, and a good peer is unaffected.
  LinkOptions opt;
  opt.limits.max_tensor_bytes = 1 << 16;
  opt.limits.max_envelope_bytes = 1 << 12;
  Server server("tcp://127.0.0.1:*", opt);
  DeviceLink big(server.bound_endpoint(), 1);
  DeviceLink small(server.bound_endpoint(), 2);
  big.send(Gradient{0, 0, 0, 1, 1, Tensor::zeros(Shape4{1 << 16, 1, 1, 1})});  // 256 KiB frame
  small.send(Heartbeat{2, 1});
  auto r = server.recv(kWait);
  ASSERT_TRUE(r && r->message.ok());
  EXPECT_EQ(r->device, std::optional<uint32_t>(2));
  EXPECT_FALSE(server.recv(200ms).has_value());
}

TEST(TransportLink, ConcurrentThreadsShareALink) {
  // A device's compute thread sends while another thread receives; the server echoes from its own thread.
  constexpr int kCount = 100;
  Server server("tcp://127.0.0.1:*");
  DeviceLink device(server.bound_endpoint(), 2);
  std::thread echo([&] {
    for (int i = 0; i < kCount; ++i) {
      auto r = server.recv(kWait);
      if (!r || !r->message.ok()) return;
      const auto& a = std::get<Activation>(r->message.value());
      server.send(r->peer, Gradient{a.round, a.batch, a.micro_batch, a.device, a.samples, a.data});
    }
  });
  std::thread sender([&] {
    for (int i = 0; i < kCount; ++i) {
      Activation a;
      a.device = 2;
      a.micro_batch = i;
      a.data = Tensor::from_vector(std::vector<float>(64, static_cast<float>(i)), Shape4{1, 64, 1, 1});
      device.send(a);
    }
  });
  int got = 0;
  for (int i = 0; i < kCount; ++i) {
    auto r = device.recv(kWait);
    if (!r) break;
    ASSERT_TRUE(r->ok()) << r->error();
    const auto& g = std::get<Gradient>(r->value());
    EXPECT_EQ(g.micro_batch, i);  // order kept end to end
    EXPECT_EQ(g.data.to_vector()[63], static_cast<float>(i));
    ++got;
  }
  sender.join();
  echo.join();
  EXPECT_EQ(got, kCount);
  EXPECT_EQ(device.stats().messages_sent, static_cast<uint64_t>(kCount));
  EXPECT_EQ(device.take_transfers().size(), static_cast<size_t>(kCount));
}

}  // namespace
}  // namespace pipar::transport
