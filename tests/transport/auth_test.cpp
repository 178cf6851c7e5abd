// CURVE links and key files (transport/auth.h) with real sockets on tcp://127.0.0.1:*: key files
// round-trip with safe modes and bad ones fail clearly; an allow-listed device talks to the server;
// unknown keys, key-less clients and a wrong device id get nothing through (and are logged); a
// replayed message is dropped; a byte flipped on the wire kills the connection, not the server.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "transport/auth.h"
#include "transport/link.h"

namespace pipar::transport {
namespace {

using namespace std::chrono_literals;

constexpr auto kWait = 3s;        // upper bound for anything that should arrive at once
constexpr auto kQuiet = 500ms;    // how long "nothing arrives" is watched

// A log callback that tests can wait on.
struct LogSink {
  std::mutex mutex;
  std::vector<std::string> lines;
  std::function<void(const std::string&)> fn() {
    return [this](const std::string& s) {
      std::lock_guard lock(mutex);
      lines.push_back(s);
    };
  }
  bool contains(const std::string& needle) {
    std::lock_guard lock(mutex);
    for (const auto& l : lines)
      if (l.find(needle) != std::string::npos) return true;
    return false;
  }
  bool wait_for(const std::string& needle, std::chrono::milliseconds timeout = kWait) {
    const auto end = Clock::now() + timeout;
    while (Clock::now() < end) {
      if (contains(needle)) return true;
      std::this_thread::sleep_for(10ms);
    }
    return contains(needle);
  }
  std::string all() {
    std::lock_guard lock(mutex);
    std::string s;
    for (const auto& l : lines) s += l + "\n";
    return s;
  }
};

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/pipar-auth-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

unsigned file_mode(const std::string& path) {
  struct stat st{};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 0777;
}

void write_file(const std::string& path, const std::string& text, unsigned mode = 0600) {
  std::ofstream(path) << text;
  ::chmod(path.c_str(), mode);
}

template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

Security server_security(const KeyPair& server, const std::vector<AllowedKey>& allowed) {
  Security s;
  s.keys = server;
  s.allow.keys = allowed;
  return s;
}

Security device_security(const KeyPair& device, const KeyPair& server) {
  Security s;
  s.keys = device;
  s.server_public_z85 = server.public_z85;
  return s;
}

LinkOptions with(std::optional<Security> security, LogSink& log) {
  LinkOptions o;
  o.security = std::move(security);
  o.log = log.fn();
  o.linger_ms = 0;
  return o;
}

// --- key files

TEST(AuthKeys, GenerateWriteReadRoundTripWithSafeModes) {
  ASSERT_TRUE(curve_available()) << "libzmq without CURVE";
  TempDir dir;
  const KeyPair k = generate_keypair();
  EXPECT_EQ(k.public_z85.size(), kZ85KeyChars);
  EXPECT_EQ(k.secret_z85.size(), kZ85KeyChars);
  EXPECT_NE(generate_keypair().public_z85, k.public_z85);
  EXPECT_EQ(public_key_of(k.secret_z85), k.public_z85);

  const mode_t old_umask = ::umask(0);  // a careless umask must not widen the secret file
  const std::string key_path = write_keypair(dir.path + "/dev0", k);
  ::umask(old_umask);
  EXPECT_EQ(key_path, dir.path + "/dev0.key");
  EXPECT_EQ(file_mode(dir.path + "/dev0.key"), 0600u);
  EXPECT_EQ(file_mode(dir.path + "/dev0.pub"), 0644u);

  const KeyPair back = read_keypair(key_path);
  EXPECT_EQ(back.public_z85, k.public_z85);
  EXPECT_EQ(back.secret_z85, k.secret_z85);
  EXPECT_EQ(read_keypair(dir.path + "/dev0").secret_z85, k.secret_z85);  // prefix works too
  EXPECT_EQ(read_public_key(dir.path + "/dev0.pub"), k.public_z85);
  EXPECT_EQ(read_public_key(key_path), k.public_z85);
  EXPECT_EQ(read_public_key(k.public_z85), k.public_z85);  // the key itself

  // Never overwrites: the old key stays intact.
  const std::string again = error_of([&] { write_keypair(dir.path + "/dev0.key", generate_keypair()); });
  EXPECT_NE(again.find("refusing to overwrite"), std::string::npos) << again;
  EXPECT_EQ(read_keypair(key_path).secret_z85, k.secret_z85);

  // A directory gets pipar.key / pipar.pub.
  write_keypair(dir.path + "/", k);
  EXPECT_EQ(file_mode(dir.path + "/pipar.key"), 0600u);
}

TEST(AuthKeys, BadKeyFilesGiveClearErrors) {
  TempDir dir;
  const KeyPair k = generate_keypair();
  const std::string key = write_keypair(dir.path + "/a", k);

  std::string e = error_of([&] { read_keypair(dir.path + "/missing.key"); });
  EXPECT_NE(e.find("missing.key"), std::string::npos) << e;
  EXPECT_NE(e.find("pipar keygen"), std::string::npos) << e;

  ::chmod(key.c_str(), 0644);
  e = error_of([&] { read_keypair(key); });
  EXPECT_NE(e.find("chmod 600 " + key), std::string::npos) << e;
  EXPECT_NE(e.find("0644"), std::string::npos) << e;
  ::chmod(key.c_str(), 0600);
  EXPECT_NO_THROW(read_keypair(key));

  const std::string bad = dir.path + "/bad.key";
  write_file(bad, "secret-key = tooshort\n");
  e = error_of([&] { read_keypair(bad); });
  EXPECT_NE(e.find("40 Z85 characters, got 8"), std::string::npos) << e;
  EXPECT_NE(e.find(bad), std::string::npos) << e;

  std::string s = k.secret_z85;
  s[5] = '"';  // not in the Z85 alphabet
  ::unlink(bad.c_str());
  write_file(bad, "secret-key = " + s + "\n");
  e = error_of([&] { read_keypair(bad); });
  EXPECT_NE(e.find("is not Z85"), std::string::npos) << e;

  ::unlink(bad.c_str());
  write_file(bad, "public-key = " + generate_keypair().public_z85 + "\nsecret-key = " + k.secret_z85 + "\n");
  e = error_of([&] { read_keypair(bad); });
  EXPECT_NE(e.find("does not belong"), std::string::npos) << e;

  e = error_of([&] { read_keypair(dir.path + "/a.pub"); });  // a .pub path reads the .key next to it
  EXPECT_EQ(e, "(no error)");
  const std::string pub_only = dir.path + "/only.pub";
  write_file(pub_only, "public-key = " + k.public_z85 + "\n", 0600);
  e = error_of([&] { read_keypair(dir.path + "/only.pub"); });
  EXPECT_NE(e.find("only.key"), std::string::npos) << e;

  e = error_of([&] { read_public_key(dir.path + "/nope.pub"); });
  EXPECT_NE(e.find("nope.pub"), std::string::npos) << e;
}

TEST(AuthKeys, AllowListFormat) {
  TempDir dir;
  const KeyPair a = generate_keypair(), b = generate_keypair(), c = generate_keypair();
  const std::string path = dir.path + "/devices.txt";
  write_file(path, "# devices of the lab\n\n" + a.public_z85 + " 0   # jetson nano\n" + b.public_z85 + "\n  " + c.public_z85 +
                       " # any device id\n");
  const AllowList list = read_allow_list(path);
  ASSERT_EQ(list.keys.size(), 3u);
  EXPECT_EQ(list.keys[0].device, std::optional<uint32_t>(0));
  EXPECT_EQ(list.keys[0].comment, "jetson nano");
  EXPECT_EQ(list.keys[1].device, std::nullopt);
  EXPECT_EQ(list.keys[2].comment, "any device id");
  ASSERT_NE(list.find(b.public_z85), nullptr);
  EXPECT_EQ(list.find(generate_keypair().public_z85), nullptr);

  write_file(path, a.public_z85 + " 1\n" + a.public_z85 + " 2\n");
  std::string e = error_of([&] { read_allow_list(path); });
  EXPECT_NE(e.find("line 2"), std::string::npos) << e;
  EXPECT_NE(e.find("listed twice"), std::string::npos) << e;
  write_file(path, "\n" + a.public_z85 + " dev7\n");
  e = error_of([&] { read_allow_list(path); });
  EXPECT_NE(e.find(path + ": line 2: device id 'dev7' is not a number"), std::string::npos) << e;
  write_file(path, "not-a-key 3\n");
  e = error_of([&] { read_allow_list(path); });
  EXPECT_NE(e.find("line 1"), std::string::npos) << e;
  write_file(path, a.public_z85 + " 3 trailing words\n");
  e = error_of([&] { read_allow_list(path); });
  EXPECT_NE(e.find("comments start with '#'"), std::string::npos) << e;
  e = error_of([&] { read_allow_list(dir.path + "/none.txt"); });
  EXPECT_NE(e.find("none.txt"), std::string::npos) << e;
  EXPECT_NE(std::string(plain_warning()).find("NOT authenticated"), std::string::npos);
}

// --- CURVE links

TEST(AuthLink, KnownDeviceExchangesMessages) {
  const KeyPair server_keys = generate_keypair(), dev_keys = generate_keypair();
  LogSink server_log, dev_log;
  Server server("tcp://127.0.0.1:*", with(server_security(server_keys, {{dev_keys.public_z85, 1, ""}}), server_log));
  DeviceLink device(server.bound_endpoint(), 1, with(device_security(dev_keys, server_keys), dev_log));
  device.send(Hello{.device = 1, .capabilities = "cpu"});
  auto r = server.recv(kWait);
  ASSERT_TRUE(r.has_value()) << server_log.all();
  ASSERT_TRUE(r->message.ok()) << r->message.error();
  EXPECT_EQ(std::get<Hello>(r->message.value()).capabilities, "cpu");
  EXPECT_EQ(r->device, std::optional<uint32_t>(1));

  Activation a;
  a.device = 1;
  a.data = Tensor::from_vector(std::vector<float>{1, 2, 3}, Shape4{1, 3, 1, 1});
  server.send(r->peer, Gradient{0, 0, 0, 1, 1, a.data});
  auto g = device.recv(kWait);
  ASSERT_TRUE(g && g->ok());
  EXPECT_EQ(std::get<Gradient>(g->value()).data.to_vector(), (std::vector<float>{1, 2, 3}));
  device.send(a);
  r = server.recv(kWait);
  ASSERT_TRUE(r && r->message.ok());
  EXPECT_EQ(server.stats(routing_id(1)).messages_rejected, 0u);
}

TEST(AuthLink, KeyBoundToAnotherDeviceIsDropped) {
  // Device 2 holds an allow-listed key, but the list binds that key to device 1.
  const KeyPair server_keys = generate_keypair(), dev_keys = generate_keypair();
  LogSink server_log, dev_log;
  Server server("tcp://127.0.0.1:*", with(server_security(server_keys, {{dev_keys.public_z85, 1, ""}}), server_log));
  DeviceLink impostor(server.bound_endpoint(), 2, with(device_security(dev_keys, server_keys), dev_log));
  impostor.send(Hello{.device = 2});
  EXPECT_FALSE(server.recv(kQuiet).has_value());
  EXPECT_TRUE(server_log.wait_for("bound to device 1")) << server_log.all();
  EXPECT_EQ(server.stats(routing_id(2)).messages_rejected, 1u);
}

TEST(AuthLink, UnknownKeyIsRefusedAndLogged) {
  const KeyPair server_keys = generate_keypair(), known = generate_keypair(), stranger = generate_keypair();
  LogSink server_log, dev_log;
  Server server("tcp://127.0.0.1:*", with(server_security(server_keys, {{known.public_z85, std::nullopt, ""}}), server_log));
  DeviceLink device(server.bound_endpoint(), 3, with(device_security(stranger, server_keys), dev_log));
  device.send(Hello{.device = 3});
  EXPECT_FALSE(server.recv(kQuiet).has_value());
  EXPECT_TRUE(server_log.wait_for("key " + stranger.public_z85 + " is not in the allow-list")) << server_log.all();
  EXPECT_TRUE(dev_log.wait_for("refused this device's CURVE key")) << dev_log.all();
  EXPECT_TRUE(server.peers().empty());

  // A second CURVE server on the same context (shared ZAP handler) admits the key it lists.
  LogSink other_log;
  Server other("tcp://127.0.0.1:*", with(server_security(server_keys, {{stranger.public_z85, 3, ""}}), other_log));
  DeviceLink welcome(other.bound_endpoint(), 3, with(device_security(stranger, server_keys), dev_log));
  welcome.send(Hello{.device = 3});
  auto r = other.recv(kWait);
  ASSERT_TRUE(r && r->message.ok()) << other_log.all();
  EXPECT_FALSE(server.recv(100ms).has_value());
}

TEST(AuthLink, ClientsWithoutKeysGetNothingThrough) {
  const KeyPair server_keys = generate_keypair(), dev_keys = generate_keypair();
  LogSink server_log, dev_log;
  Server server("tcp://127.0.0.1:*", with(server_security(server_keys, {{dev_keys.public_z85, std::nullopt, ""}}), server_log));

  // A plain DeviceLink and a raw DEALER using a device's routing id.
  DeviceLink plain(server.bound_endpoint(), 4, with(std::nullopt, dev_log));
  plain.send(Hello{.device = 4});
  zmq::socket_t raw(default_context(), zmq::socket_type::dealer);
  raw.set(zmq::sockopt::linger, 0);
  raw.set(zmq::sockopt::routing_id, routing_id(4));
  raw.connect(server.bound_endpoint());
  Frames f = encode(Heartbeat{4, 1}, Sequence{1, 1});
  for (size_t i = 0; i < f.size(); ++i) (void)raw.send(f[i], i + 1 < f.size() ? zmq::send_flags::sndmore : zmq::send_flags::dontwait);

  // A device with an allow-listed key but the wrong server key.
  DeviceLink misled(server.bound_endpoint(), 5, with(device_security(dev_keys, generate_keypair()), dev_log));
  misled.send(Hello{.device = 5});

  EXPECT_FALSE(server.recv(kQuiet).has_value());
  // Mechanism mismatch, seen by the server or first by the client (then: closed during the handshake).
  EXPECT_TRUE(server_log.wait_for("plain/--insecure")) << server_log.all();
  EXPECT_TRUE(server_log.wait_for("cryptographic")) << server_log.all();
  EXPECT_TRUE(server.peers().empty());
  EXPECT_EQ(server.total_stats().messages_received, 0u);
}

TEST(AuthLink, SecurityNeedsValidKeys) {
  const KeyPair k = generate_keypair();
  LogSink log;
  Security s = device_security(k, generate_keypair());
  s.server_public_z85 = "short";
  std::string e = error_of([&] { DeviceLink d("tcp://127.0.0.1:1", 0, with(s, log)); });
  EXPECT_NE(e.find("server public key"), std::string::npos) << e;
  s = device_security(k, k);
  s.keys.public_z85 = generate_keypair().public_z85;
  e = error_of([&] { DeviceLink d("tcp://127.0.0.1:1", 0, with(s, log)); });
  EXPECT_NE(e.find("does not belong"), std::string::npos) << e;
}

// --- replay and tampering

TEST(AuthReplay, ReplayedMessageIsRejectedOnPlainLink) {
  LogSink log;
  Server server("tcp://127.0.0.1:*", with(std::nullopt, log));
  zmq::socket_t raw(default_context(), zmq::socket_type::dealer);
  raw.set(zmq::sockopt::linger, 0);
  raw.set(zmq::sockopt::routing_id, routing_id(5));
  raw.connect(server.bound_endpoint());
  auto send_raw = [&](const Frames& frames) {
    for (size_t i = 0; i < frames.size(); ++i) {
      zmq::message_t copy(frames[i].data(), frames[i].size());  // the same bytes again, as a replay would be
      ASSERT_TRUE(raw.send(copy, i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none));
    }
  };
  auto expect_time = [&](int64_t t) {
    auto r = server.recv(kWait);
    ASSERT_TRUE(r && r->message.ok()) << log.all();
    EXPECT_EQ(std::get<Heartbeat>(r->message.value()).time_ns, t);
  };
  const Frames first = encode(Heartbeat{5, 1}, Sequence{1000, 1});
  send_raw(first);
  expect_time(1);
  send_raw(first);  // replay
  EXPECT_FALSE(server.recv(kQuiet).has_value());
  EXPECT_TRUE(log.wait_for("replayed or out-of-order")) << log.all();
  EXPECT_EQ(server.stats(routing_id(5)).messages_rejected, 1u);

  send_raw(encode(Heartbeat{5, 2}, Sequence{1000, 2}));   // next in order: accepted
  expect_time(2);
  send_raw(encode(Heartbeat{5, 3}, Sequence{999, 50}));   // an older session: rejected
  send_raw(encode(Heartbeat{5, 4}, Sequence{2000, 1}));   // a restarted sender: accepted
  expect_time(4);
  send_raw(encode(Heartbeat{5, 5}));                      // unsequenced: allowed on a plain link
  expect_time(5);
  EXPECT_EQ(server.stats(routing_id(5)).messages_rejected, 2u);

  // Real links number their messages: device → server and back, across two DeviceLinks for one id.
  for (int round = 0; round < 2; ++round) {
    DeviceLink device(server.bound_endpoint(), 6, with(std::nullopt, log));
    for (int i = 0; i < 3; ++i) device.send(Heartbeat{6, i});
    for (int i = 0; i < 3; ++i) {
      auto r = server.recv(kWait);
      ASSERT_TRUE(r && r->message.ok());
      EXPECT_EQ(std::get<Heartbeat>(r->message.value()).time_ns, i);
    }
    server.send(routing_id(6), Heartbeat{0, 9});
    auto back = device.recv(kWait);
    ASSERT_TRUE(back && back->ok());
  }
  EXPECT_EQ(server.stats(routing_id(6)).messages_rejected, 0u);
}

TEST(AuthReplay, ReplayAndUnsequencedRejectedOnCurveLink) {
  // A raw CURVE client with an allowed key (an insider replaying its own traffic).
  const KeyPair server_keys = generate_keypair(), dev_keys = generate_keypair();
  LogSink log;
  Server server("tcp://127.0.0.1:*", with(server_security(server_keys, {{dev_keys.public_z85, 7, ""}}), log));
  zmq::socket_t raw(default_context(), zmq::socket_type::dealer);
  raw.set(zmq::sockopt::linger, 0);
  raw.set(zmq::sockopt::routing_id, routing_id(7));
  raw.set(zmq::sockopt::curve_serverkey, server_keys.public_z85);
  raw.set(zmq::sockopt::curve_publickey, dev_keys.public_z85);
  raw.set(zmq::sockopt::curve_secretkey, dev_keys.secret_z85);
  raw.connect(server.bound_endpoint());
  auto send_raw = [&](const Frames& frames) {
    for (size_t i = 0; i < frames.size(); ++i) {
      zmq::message_t copy(frames[i].data(), frames[i].size());
      ASSERT_TRUE(raw.send(copy, i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none));
    }
  };
  const Frames m = encode(Heartbeat{7, 1}, Sequence{1, 1});
  send_raw(m);
  auto r = server.recv(kWait);
  ASSERT_TRUE(r && r->message.ok()) << log.all();
  send_raw(m);
  send_raw(encode(Heartbeat{7, 2}));
  EXPECT_FALSE(server.recv(kQuiet).has_value());
  EXPECT_TRUE(log.wait_for("unsequenced message on a secured link")) << log.all();
  EXPECT_EQ(server.stats(routing_id(7)).messages_rejected, 2u);
}

// A TCP relay between a device and the server that flips one byte of client data when asked.
class TamperingRelay {
 public:
  explicit TamperingRelay(int server_port) : server_port_(server_port) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), len), 0);
    EXPECT_EQ(::listen(listen_fd_, 4), 0);
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { run(); });
  }
  ~TamperingRelay() {
    stop_ = true;
    thread_.join();
    ::close(listen_fd_);
  }
  int port() const { return port_; }
  void tamper_next() { tamper_ = true; }
  bool tampered() const { return done_; }

 private:
  void run() {
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      const int client = ::accept(listen_fd_, nullptr, nullptr);
      if (client < 0) continue;
      const int upstream = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      a.sin_port = htons(static_cast<uint16_t>(server_port_));
      if (::connect(upstream, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) relay(client, upstream);
      ::close(upstream);
      ::close(client);
    }
  }
  void relay(int client, int upstream) {
    char buf[65536];
    while (!stop_) {
      pollfd p[2] = {{client, POLLIN, 0}, {upstream, POLLIN, 0}};
      if (::poll(p, 2, 20) <= 0) continue;
      for (int i = 0; i < 2; ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = ::read(p[i].fd, buf, sizeof buf);
        if (n <= 0) return;
        if (i == 0 && tamper_.exchange(false)) {
          buf[n - 1] ^= 0x01;  // inside the last frame's ciphertext/MAC
          done_ = true;
        }
        if (::write(p[1 - i].fd, buf, static_cast<size_t>(n)) != n) return;
      }
    }
  }

  int server_port_, listen_fd_ = -1, port_ = 0;
  std::atomic<bool> stop_{false}, tamper_{false}, done_{false};
  std::thread thread_;
};

TEST(AuthReplay, TamperedCiphertextIsDroppedByCurve) {
  const KeyPair server_keys = generate_keypair(), dev_keys = generate_keypair();
  LogSink server_log, dev_log;
  Server server("tcp://127.0.0.1:*", with(server_security(server_keys, {{dev_keys.public_z85, 8, ""}}), server_log));
  const std::string ep = server.bound_endpoint();
  TamperingRelay relay(std::stoi(ep.substr(ep.rfind(':') + 1)));
  DeviceLink device("tcp://127.0.0.1:" + std::to_string(relay.port()), 8, with(device_security(dev_keys, server_keys), dev_log));
  device.send(Heartbeat{8, 1});
  auto r = server.recv(kWait);
  ASSERT_TRUE(r && r->message.ok()) << server_log.all();  // handshake done through the relay

  relay.tamper_next();
  device.send(Heartbeat{8, 2});
  EXPECT_FALSE(server.recv(kQuiet).has_value());
  EXPECT_TRUE(relay.tampered());
  EXPECT_TRUE(server_log.wait_for("cryptographic")) << server_log.all();
  EXPECT_EQ(server.stats(routing_id(8)).messages_received, 1u);
}

}  // namespace
}  // namespace pipar::transport
