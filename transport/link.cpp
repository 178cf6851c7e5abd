// Server and DeviceLink over one LinkCore: a ZeroMQ socket owned by an I/O thread that paces outgoing
// messages per peer (Pacer) and queues incoming frames for recv(), which decodes them in the caller.
#include "transport/link.h"

#include <zmq.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "kernels/error.h"

namespace pipar::transport {

namespace {

constexpr char kRoutingPrefix[] = "pipar-dev-";
constexpr auto kIdlePoll = std::chrono::milliseconds(100);   // longest I/O-thread sleep with nothing due
constexpr auto kRetryPoll = std::chrono::milliseconds(1);    // retry interval for a send refused at the HWM
constexpr int kMaxRecvBurst = 64;                            // messages taken off the socket per wake-up

std::atomic<uint64_t> g_wake_counter{0};

constexpr auto kLogEvery = std::chrono::seconds(30);         // repeated refusals: one log line per kind this often
constexpr char kZapEndpoint[] = "inproc://zeromq.zap.01";     // fixed by the ZAP protocol (RFC 27)
constexpr int kZapEnforceDomain = 93;                         // ZMQ_ZAP_ENFORCE_DOMAIN (draft API in 4.3)
constexpr char kAnyDevice[] = "*";                            // ZAP user id of a key not bound to a device

[[noreturn]] void rethrow_as_pipar(const char* what_doing, const zmq::error_t& e) {
  throw Error(detail::concat("transport: ", what_doing, ": ", e.what(), " (errno ", e.num(), ")"));
}

// A start time unique in this process and larger than any earlier one (the replay check's session).
uint64_t new_session() {
  static std::atomic<uint64_t> last{0};
  const uint64_t now = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  uint64_t prev = last.load();
  uint64_t next;
  do {
    next = std::max(now, prev + 1);
  } while (!last.compare_exchange_weak(prev, next));
  return next;
}

// Log lines that a misbehaving peer can trigger at its reconnect rate: the first per key, then one
// line per kLogEvery with the number left out. Not thread-safe: guarded by its owner.
class LogLimiter {
 public:
  // Returns the line to log now ("" = stay quiet).
  std::string admit(const std::string& key, const std::string& line) {
    const auto now = Clock::now();
    auto [it, fresh] = seen_.try_emplace(key, Entry{now, 0});
    if (fresh) return line;
    if (now - it->second.last < kLogEvery) {
      ++it->second.suppressed;
      return {};
    }
    const uint64_t n = it->second.suppressed;
    it->second = Entry{now, 0};
    return n ? detail::concat(line, " (", n, " more like it not logged)") : line;
  }

 private:
  struct Entry {
    Clock::time_point last;
    uint64_t suppressed = 0;
  };
  std::map<std::string, Entry> seen_;
};

std::string z85_of(const void* data, size_t size) {
  if (size != 32) return detail::concat("<", size, "-byte key>");
  char out[kZ85KeyChars + 1];
  if (!zmq_z85_encode(out, static_cast<const uint8_t*>(data), size)) return "<bad key>";
  return out;
}

// --- ZAP handler: one REP socket per ZeroMQ context on inproc://zeromq.zap.01 (the endpoint is fixed,
// so secured Servers on one context share it and are told apart by their ZAP domain). Its own thread
// answers each CURVE handshake: 200 for an allow-listed key (user id = the routing id the key may use,
// or "*"), 400 otherwise.

class ZapHandler {
 public:
  using LogFn = std::function<void(const std::string&)>;

  // The handler of a context, started on first use; release() with the global lock held when done.
  static std::shared_ptr<ZapHandler> acquire(zmq::context_t& ctx) {
    std::lock_guard lock(registry_mutex());
    auto& weak = registry()[&ctx];
    auto h = weak.lock();
    if (!h) {
      h = std::shared_ptr<ZapHandler>(new ZapHandler(ctx));
      weak = h;
    }
    return h;
  }
  // Drops a reference; the last one stops the thread and unbinds the endpoint before another acquire().
  static void release(std::shared_ptr<ZapHandler>& h) {
    std::lock_guard lock(registry_mutex());
    zmq::context_t* ctx = h->ctx_;
    h.reset();
    auto it = registry().find(ctx);
    if (it != registry().end() && it->second.expired()) registry().erase(it);
  }

  ~ZapHandler() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
      zmq::message_t m;
      (void)wake_tx_.send(m, zmq::send_flags::dontwait);
    }
    if (thread_.joinable()) thread_.join();
    try {
      rep_.unbind(kZapEndpoint);  // synchronous for inproc, unlike close: the next handler can bind at once
    } catch (const zmq::error_t&) {
    }
  }

  // Registers a Server's allow-list; returns the ZAP domain to set on its socket.
  std::string add(AllowList allow, LogFn log) {
    std::lock_guard lock(mutex_);
    std::string domain = "pipar-" + std::to_string(next_domain_++);
    domains_.emplace(domain, Domain{std::move(allow), std::move(log), {}});
    return domain;
  }
  // After this returns the Server's log callback is never called again.
  void remove(const std::string& domain) {
    std::lock_guard lock(mutex_);
    domains_.erase(domain);
  }

 private:
  struct Domain {
    AllowList allow;
    LogFn log;
    LogLimiter limiter;
  };

  explicit ZapHandler(zmq::context_t& ctx) : ctx_(&ctx) {
    try {
      rep_ = zmq::socket_t(ctx, zmq::socket_type::rep);
      rep_.set(zmq::sockopt::linger, 0);
      const std::string wake_ep = "inproc://pipar-zap-wake-" + std::to_string(g_wake_counter++);
      wake_rx_ = zmq::socket_t(ctx, zmq::socket_type::pair);
      wake_rx_.set(zmq::sockopt::linger, 0);
      wake_rx_.bind(wake_ep);
      wake_tx_ = zmq::socket_t(ctx, zmq::socket_type::pair);
      wake_tx_.set(zmq::sockopt::linger, 0);
      wake_tx_.set(zmq::sockopt::sndhwm, 4);
      wake_tx_.connect(wake_ep);
    } catch (const zmq::error_t& e) {
      rethrow_as_pipar("ZAP handler setup", e);
    }
    try {
      rep_.bind(kZapEndpoint);
    } catch (const zmq::error_t& e) {
      throw Error(detail::concat("transport: cannot start the CURVE authentication handler: ", kZapEndpoint,
                                 " is taken on this ZeroMQ context (", e.what(),
                                 "); another ZAP handler there would decide who may connect — give the Server its own context"));
    }
    thread_ = std::thread([this] { run(); });
  }

  void run() {
    while (true) {
      zmq::pollitem_t items[2] = {{wake_rx_.handle(), 0, ZMQ_POLLIN, 0}, {rep_.handle(), 0, ZMQ_POLLIN, 0}};
      try {
        zmq::poll(items, 2, std::chrono::milliseconds(-1));
        if (items[0].revents & ZMQ_POLLIN) {
          zmq::message_t m;
          while (wake_rx_.recv(m, zmq::recv_flags::dontwait)) {
          }
        }
        {
          std::lock_guard lock(mutex_);
          if (stop_) return;
        }
        if (items[1].revents & ZMQ_POLLIN) answer_one();
      } catch (const zmq::error_t& e) {
        if (e.num() == ETERM) return;
        std::fprintf(stderr, "[pipar transport] ZAP handler: %s (errno %d)\n", e.what(), e.num());
      }
    }
  }

  // Reads one ZAP request (RFC 27: version, request id, domain, address, identity, mechanism,
  // credentials...) and sends the reply (version, request id, status, text, user id, metadata).
  void answer_one() {
    std::vector<zmq::message_t> req;
    for (bool more = true; more && req.size() < 16;) {
      zmq::message_t m;
      if (!rep_.recv(m, req.empty() ? zmq::recv_flags::dontwait : zmq::recv_flags::none)) return;
      more = m.more();
      req.push_back(std::move(m));
    }
    auto frame = [&](size_t i) { return i < req.size() ? req[i].to_string() : std::string(); };
    std::string status = "400", text = "denied", user_id;
    if (frame(0) != "1.0") {
      status = "500";
      text = "unsupported ZAP version";
    } else if (req.size() >= 7) {
      const std::string domain = frame(2), address = frame(3), mechanism = frame(5);
      const std::string key = z85_of(req[6].data(), req[6].size());
      std::lock_guard lock(mutex_);
      auto it = domains_.find(domain);
      if (it != domains_.end()) {
        Domain& d = it->second;
        const AllowedKey* allowed = mechanism == "CURVE" ? d.allow.find(key) : nullptr;
        if (allowed) {
          status = "200";
          text = "OK";
          user_id = allowed->device ? routing_id(*allowed->device) : kAnyDevice;
        } else {
          text = "key not in the allow-list";
          const std::string line = d.limiter.admit(
              key, detail::concat("refused a connection from ", address.empty() ? "?" : address, ": ", mechanism, " key ", key,
                                  " is not in the allow-list (add it there to admit this device)"));
          if (!line.empty()) d.log(line);
        }
      }
    }
    const std::string version = "1.0", request_id = frame(1), metadata;
    for (const std::string* part : std::initializer_list<const std::string*>{&version, &request_id, &status, &text, &user_id})
      rep_.send(zmq::buffer(*part), zmq::send_flags::sndmore);
    rep_.send(zmq::buffer(metadata), zmq::send_flags::none);
  }

  static std::mutex& registry_mutex() {
    static auto* m = new std::mutex;
    return *m;
  }
  static std::map<zmq::context_t*, std::weak_ptr<ZapHandler>>& registry() {
    static auto* r = new std::map<zmq::context_t*, std::weak_ptr<ZapHandler>>;
    return *r;
  }

  zmq::context_t* ctx_;
  zmq::socket_t rep_, wake_rx_, wake_tx_;
  std::mutex mutex_;  // domains_, stop_, wake_tx_
  bool stop_ = false;
  uint64_t next_domain_ = 0;
  std::map<std::string, Domain> domains_;
  std::thread thread_;
};

// A Server's place in its context's ZAP handler; gone (and its log callback unused) once destroyed.
class ZapRegistration {
 public:
  ZapRegistration() = default;
  ZapRegistration(zmq::context_t& ctx, AllowList allow, ZapHandler::LogFn log) : handler_(ZapHandler::acquire(ctx)) {
    domain_ = handler_->add(std::move(allow), std::move(log));
  }
  ~ZapRegistration() {
    if (!handler_) return;
    handler_->remove(domain_);
    ZapHandler::release(handler_);
  }
  ZapRegistration(const ZapRegistration&) = delete;
  ZapRegistration& operator=(const ZapRegistration&) = delete;
  const std::string& domain() const { return domain_; }

 private:
  std::shared_ptr<ZapHandler> handler_;
  std::string domain_;
};

const char* protocol_error_text(uint32_t v) {
  switch (v) {
    case ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
      return "security mechanism mismatch (one side uses CURVE keys, the other runs plain/--insecure)";
    case ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
      return "CURVE cryptographic error (the client has the wrong server public key, or the data was tampered with)";
    default:
      return "protocol error during the handshake";
  }
}

}  // namespace

// --- public helpers

PeerId routing_id(uint32_t device) { return kRoutingPrefix + std::to_string(device); }

std::optional<uint32_t> device_of(const PeerId& peer) {
  const std::string prefix = kRoutingPrefix;
  if (peer.size() <= prefix.size() || peer.size() > prefix.size() + 10 || peer.compare(0, prefix.size(), prefix) != 0)
    return std::nullopt;
  uint64_t v = 0;
  for (size_t i = prefix.size(); i < peer.size(); ++i) {
    if (peer[i] < '0' || peer[i] > '9') return std::nullopt;
    v = v * 10 + static_cast<uint64_t>(peer[i] - '0');
  }
  if (v > UINT32_MAX) return std::nullopt;
  return static_cast<uint32_t>(v);
}

zmq::context_t& default_context() {
  static auto* ctx = new zmq::context_t(2);  // never destroyed: no exit-time ordering with sockets
  return *ctx;
}

// --- LinkCore

class LinkCore {
 public:
  LinkCore(zmq::socket_type type, LinkOptions options) : options_(std::move(options)) {
    if (!options_.log) options_.log = [](const std::string& s) { std::fprintf(stderr, "[pipar transport] %s\n", s.c_str()); };
    ctx_ = options_.context ? options_.context : &default_context();
    router_ = type == zmq::socket_type::router;
    session_ = new_session();
    if (options_.security) {
      check_security();
      // Before the socket binds: a CURVE server without its ZAP handler would admit every key.
      if (router_)
        zap_ = std::make_unique<ZapRegistration>(*ctx_, options_.security->allow, [this](const std::string& line) {
          std::lock_guard lock(mutex_);
          options_.log(line);
        });
    }
    try {
      sock_ = zmq::socket_t(*ctx_, type);
      sock_.set(zmq::sockopt::linger, options_.linger_ms);
      const uint64_t frame_max = std::max(options_.limits.max_tensor_bytes, options_.limits.max_envelope_bytes);
      sock_.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(std::min<uint64_t>(frame_max, INT64_MAX)));
      sock_.set(zmq::sockopt::sndhwm, options_.send_hwm);
      sock_.set(zmq::sockopt::rcvhwm, options_.recv_hwm);
      sock_.set(zmq::sockopt::rcvtimeo, 100);  // the I/O thread polls; this only bounds a stray blocking call
      sock_.set(zmq::sockopt::sndtimeo, 100);
      sock_.set(zmq::sockopt::reconnect_ivl, 100);
      sock_.set(zmq::sockopt::reconnect_ivl_max, 1000);
      if (options_.zmtp_heartbeat_ms > 0) {  // a dead TCP peer is noticed even while nothing is sent
        sock_.set(zmq::sockopt::heartbeat_ivl, options_.zmtp_heartbeat_ms);
        sock_.set(zmq::sockopt::heartbeat_timeout, options_.zmtp_timeout_ms);
        sock_.set(zmq::sockopt::heartbeat_ttl, options_.zmtp_timeout_ms);
      }
      if (router_) {
        sock_.set(zmq::sockopt::router_mandatory, 1);  // unknown peer → EHOSTUNREACH, not a silent drop
        sock_.set(zmq::sockopt::router_handover, 1);   // a device that reconnects takes its id back
      }
      if (options_.security) {
        const Security& sec = *options_.security;
        if (router_) {
          sock_.set(zmq::sockopt::zap_domain, zap_->domain());
          const int one = 1;  // no handler → refuse, never admit (ignored by a libzmq without the draft option)
          (void)zmq_setsockopt(sock_.handle(), kZapEnforceDomain, &one, sizeof one);
          sock_.set(zmq::sockopt::curve_server, true);
          sock_.set(zmq::sockopt::curve_secretkey, sec.keys.secret_z85);
        } else {
          sock_.set(zmq::sockopt::curve_serverkey, sec.server_public_z85);
          sock_.set(zmq::sockopt::curve_publickey, sec.keys.public_z85);
          sock_.set(zmq::sockopt::curve_secretkey, sec.keys.secret_z85);
        }
      }
      // Handshake failures (refused keys, plain vs CURVE, wrong server key) surface only as monitor events.
      const std::string monitor_ep = "inproc://pipar-monitor-" + std::to_string(g_wake_counter++);
      if (zmq_socket_monitor(sock_.handle(), monitor_ep.c_str(),
                             ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0)
        throw zmq::error_t();
      monitor_ = zmq::socket_t(*ctx_, zmq::socket_type::pair);
      monitor_.set(zmq::sockopt::linger, 0);
      monitor_.connect(monitor_ep);
      const std::string wake_ep = "inproc://pipar-wake-" + std::to_string(g_wake_counter++);
      wake_rx_ = zmq::socket_t(*ctx_, zmq::socket_type::pair);
      wake_rx_.set(zmq::sockopt::linger, 0);
      wake_rx_.bind(wake_ep);
      wake_tx_ = zmq::socket_t(*ctx_, zmq::socket_type::pair);
      wake_tx_.set(zmq::sockopt::linger, 0);
      wake_tx_.set(zmq::sockopt::sndhwm, 4);
      wake_tx_.connect(wake_ep);
    } catch (const zmq::error_t& e) {
      rethrow_as_pipar("socket setup", e);
    }
  }

  void set_routing_id(const std::string& id) { sock_.set(zmq::sockopt::routing_id, id); }

  void bind(const std::string& endpoint) {
    try {
      sock_.bind(endpoint);
      bound_ = sock_.get(zmq::sockopt::last_endpoint);
    } catch (const zmq::error_t& e) {
      throw Error(detail::concat("transport: cannot bind ", endpoint, ": ", e.what()));
    }
  }
  void connect(const std::string& endpoint) {
    try {
      sock_.connect(endpoint);
      bound_ = endpoint;
    } catch (const zmq::error_t& e) {
      throw Error(detail::concat("transport: cannot connect to ", endpoint, ": ", e.what()));
    }
  }
  // Starts the I/O thread; from here on only it touches sock_ and wake_rx_.
  void start(std::optional<uint32_t> heartbeat_device) {
    heartbeat_device_ = heartbeat_device;
    io_ = std::thread([this] { io_main(); });
  }

  ~LinkCore() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
      wake_locked();
    }
    if (io_.joinable()) io_.join();
    // The ZAP registration goes last: while the socket is open its handler must answer (and its log
    // callback uses mutex_, which dies with this object).
    monitor_.close();
    sock_.close();
    zap_.reset();
  }

  const std::string& endpoint() const { return bound_; }

  uint64_t send(const PeerId& peer, const Message& m) {
    // Sequence numbers go out in queue order: order_mutex_ covers numbering and queueing (not the I/O thread).
    std::lock_guard order(order_mutex_);
    Frames frames = encode(m, Sequence{session_, ++next_seq_});  // in the caller's thread: tensor frames share storage
    std::lock_guard lock(mutex_);
    check_fatal_locked();
    PIPAR_CHECK(!stop_, "send on a closed link");
    Peer& p = peer_locked(peer);
    Pending pending;
    pending.id = next_id_++;
    pending.type = message_type(m);
    pending.bytes = frames_bytes(frames);
    pending.frames = std::move(frames);
    p.pacer.push(pending.bytes, Clock::now());
    p.queue.push_back(std::move(pending));
    ++outstanding_;
    wake_locked();
    return next_id_ - 1;
  }

  struct Inbound {
    PeerId peer;
    Frames frames;
    size_t bytes = 0;
    Clock::time_point at;
  };

  // Waits for the next inbound message; nullopt on timeout.
  std::optional<Inbound> pop_inbound(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    const bool ready = cv_.wait_for(lock, timeout, [&] { return !inbound_.empty() || fatal_ || stop_; });
    check_fatal_locked();
    if (!ready || inbound_.empty()) return std::nullopt;
    Inbound in = std::move(inbound_.front());
    inbound_.pop_front();
    const bool was_full = inbound_bytes_ >= options_.max_inbound_bytes;
    inbound_bytes_ -= in.bytes;
    if (was_full) wake_locked();  // the I/O thread may read the socket again
    return in;
  }

  bool flush(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    const bool done = cv_.wait_for(lock, timeout, [&] { return outstanding_ == 0 || fatal_; });
    check_fatal_locked();
    return done;
  }

  void set_shape(const PeerId& peer, std::optional<double> rate, std::optional<double> latency) {
    std::lock_guard lock(mutex_);
    Peer& p = peer_locked(peer);
    const auto now = Clock::now();
    if (rate) p.pacer.set_rate(*rate, now);
    if (latency) p.pacer.set_latency(*latency, now);
    wake_locked();
  }
  LinkShape shape(const PeerId& peer) {
    std::lock_guard lock(mutex_);
    return peer_locked(peer).pacer.shape();
  }
  LinkStats stats(const PeerId& peer) const {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(peer);
    return it == peers_.end() ? LinkStats{} : it->second.stats;
  }
  LinkStats total_stats() const {
    std::lock_guard lock(mutex_);
    LinkStats t;
    for (const auto& [id, p] : peers_) {
      t.bytes_sent += p.stats.bytes_sent;
      t.bytes_received += p.stats.bytes_received;
      t.messages_sent += p.stats.messages_sent;
      t.messages_received += p.stats.messages_received;
      t.messages_rejected += p.stats.messages_rejected;
    }
    return t;
  }
  std::vector<PeerId> peers() const {
    std::lock_guard lock(mutex_);
    std::vector<PeerId> out;
    for (const auto& [id, p] : peers_) out.push_back(id);
    return out;
  }
  std::optional<Clock::time_point> last_seen(const PeerId& peer) const {
    std::lock_guard lock(mutex_);
    auto it = peers_.find(peer);
    if (it == peers_.end() || it->second.stats.messages_received == 0) return std::nullopt;
    return it->second.last_seen;
  }
  std::vector<TransferRecord> take_transfers() {
    std::lock_guard lock(mutex_);
    std::vector<TransferRecord> out(std::make_move_iterator(records_.begin()), std::make_move_iterator(records_.end()));
    records_.clear();
    return out;
  }
  const LinkOptions& options() const { return options_; }
  void log(const std::string& line) const { options_.log(line); }

 private:
  struct Pending {
    uint64_t id = 0;
    MessageType type = MessageType::kHeartbeat;
    size_t bytes = 0;
    Frames frames;
    Clock::time_point enqueued, started, finished;
    Clock::time_point first_try;  // set when ZeroMQ first refused it (HWM)
    bool timed = false;           // pacer timing filled in
  };
  struct Peer {
    Pacer pacer;
    std::deque<Pending> queue;    // same order as the pacer's FIFO
    std::deque<Pending> due;      // arrival time reached, waiting to be handed to ZeroMQ
    LinkStats stats;
    Clock::time_point last_seen;
    std::optional<Sequence> last_in;  // newest sequence accepted from this peer
  };

  Peer& peer_locked(const PeerId& id) {
    auto it = peers_.find(id);
    if (it == peers_.end()) it = peers_.emplace(id, Peer{Pacer(options_.shape), {}, {}, {}, {}, {}}).first;
    return it->second;
  }
  void wake_locked() {
    zmq::message_t empty;
    try {
      (void)wake_tx_.send(empty, zmq::send_flags::dontwait);  // a full pipe means a wake-up is pending anyway
    } catch (const zmq::error_t&) {
    }
  }
  void check_fatal_locked() {
    if (fatal_) std::rethrow_exception(fatal_);
  }
  void record_locked(const PeerId& peer, const Pending& p, Clock::time_point delivered, bool ok) {
    --outstanding_;
    if (options_.max_transfer_records == 0) return;
    if (records_.size() >= options_.max_transfer_records) records_.pop_front();
    records_.push_back({p.id, peer, p.type, p.bytes, p.enqueued, p.started, p.finished, delivered, ok});
  }

  // Hands one message to ZeroMQ without blocking. Returns false when the HWM refused it (retry later).
  // Throws zmq::error_t on real failures; EHOSTUNREACH (peer gone) is reported as dropped.
  enum class SendOutcome { kSent, kRetry, kUnreachable };
  SendOutcome send_frames(const PeerId& peer, Frames& frames) {
    if (router_) {
      zmq::message_t id(peer.data(), peer.size());
      try {
        if (!sock_.send(id, zmq::send_flags::sndmore | zmq::send_flags::dontwait)) return SendOutcome::kRetry;
      } catch (const zmq::error_t& e) {
        if (e.num() == EHOSTUNREACH) return SendOutcome::kUnreachable;
        throw;
      }
    }
    for (size_t i = 0; i < frames.size(); ++i) {
      const auto flags = (i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none) | zmq::send_flags::dontwait;
      // After the first part is accepted ZeroMQ accepts the rest of a multipart message (atomic delivery).
      if (!sock_.send(frames[i], flags)) {
        if (i == 0 && !router_) return SendOutcome::kRetry;
        throw zmq::error_t();
      }
    }
    return SendOutcome::kSent;
  }

  // Moves due messages out of the pacers and hands them to ZeroMQ. Returns the next wake-up time.
  Clock::time_point pump_sends() {
    auto now = Clock::now();
    Clock::time_point next = now + kIdlePoll;
    // Heartbeats (DeviceLink): queued like any message, so they obey the uplink shape. They take a
    // sequence number like send(); if a user send holds order_mutex_, try again in a moment.
    std::unique_lock<std::mutex> order;
    bool heartbeat_blocked = false;
    if (heartbeat_device_ && options_.heartbeat_interval.count() > 0 && now - last_heartbeat_ >= options_.heartbeat_interval) {
      order = std::unique_lock(order_mutex_, std::try_to_lock);
      heartbeat_blocked = !order.owns_lock();
    }
    std::unique_lock lock(mutex_);
    if (heartbeat_device_ && options_.heartbeat_interval.count() > 0) {
      if (order.owns_lock()) {
        last_heartbeat_ = now;
        Frames f = encode(Heartbeat{*heartbeat_device_, std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count()},
                          Sequence{session_, ++next_seq_});
        order.unlock();
        Peer& p = peer_locked("");
        Pending hb;
        hb.id = next_id_++;
        hb.type = MessageType::kHeartbeat;
        hb.bytes = frames_bytes(f);
        hb.frames = std::move(f);
        p.pacer.push(hb.bytes, now);
        p.queue.push_back(std::move(hb));
        ++outstanding_;
      }
      next = heartbeat_blocked ? std::min(next, now + kRetryPoll) : std::min(next, last_heartbeat_ + options_.heartbeat_interval);
    }
    bool progressed = false;
    for (auto& [id, p] : peers_) {
      for (const PacedTiming& t : p.pacer.pop_due(now)) {
        Pending pending = std::move(p.queue.front());
        p.queue.pop_front();
        pending.enqueued = t.enqueued;
        pending.started = t.started;
        pending.finished = t.finished;
        p.due.push_back(std::move(pending));
      }
      while (!p.due.empty()) {
        Pending& pending = p.due.front();
        // The socket belongs to this thread; sending under the mutex keeps the peer's queue consistent
        // and is short (ZeroMQ only enqueues; the tensor frames are not copied).
        const SendOutcome out = send_frames(id, pending.frames);
        if (out == SendOutcome::kRetry) {
          if (pending.first_try == Clock::time_point{}) pending.first_try = now;
          if (now - pending.first_try < options_.send_timeout) {
            next = std::min(next, now + kRetryPoll);
            break;
          }
          log(detail::concat("dropped a ", message_type_name(pending.type), " to ", printable(id), ": send timed out at the high-water mark"));
          record_locked(id, pending, now, false);
        } else if (out == SendOutcome::kUnreachable) {
          log(detail::concat("dropped a ", message_type_name(pending.type), " to ", printable(id), ": peer not connected"));
          record_locked(id, pending, now, false);
        } else {
          p.stats.bytes_sent += pending.bytes;
          p.stats.messages_sent += 1;
          record_locked(id, pending, Clock::now(), true);
        }
        p.due.pop_front();
        progressed = true;
      }
      if (auto e = p.pacer.next_event()) next = std::min(next, *e);
    }
    if (progressed) cv_.notify_all();
    return next;
  }

  // Takes up to kMaxRecvBurst messages off the socket without blocking.
  void pump_recvs() {
    for (int k = 0; k < kMaxRecvBurst; ++k) {
      {
        std::lock_guard lock(mutex_);
        if (inbound_bytes_ >= options_.max_inbound_bytes) return;
      }
      Inbound in;
      zmq::message_t part;
      if (!sock_.recv(part, zmq::recv_flags::dontwait)) return;
      bool more = part.more();
      if (router_) {
        in.peer.assign(static_cast<const char*>(part.data()), part.size());
      } else {
        in.bytes += part.size();
        in.frames.push_back(std::move(part));
      }
      // The rest of a multipart message is already here (atomic delivery); cap the frame count.
      while (more) {
        zmq::message_t f;
        if (!sock_.recv(f, zmq::recv_flags::none)) break;
        more = f.more();
        in.bytes += f.size();
        if (in.frames.size() <= options_.limits.max_tensors + 1) in.frames.push_back(std::move(f));
        else in.frames.emplace_back();  // decode rejects the frame count; keep memory bounded
      }
      in.at = Clock::now();
      // Checks before anything is queued for recv(): the key's device binding, then the replay check.
      std::string reject;
      if (router_ && options_.security) {
        const char* user = in.frames.empty() ? nullptr : zmq_msg_gets(in.frames[0].handle(), "User-Id");
        if (!user) reject = "no authenticated user id on the message";
        else if (std::strcmp(user, kAnyDevice) != 0 && in.peer != user)
          reject = detail::concat("its CURVE key is bound to ", printable(user), " in the allow-list");
      }
      std::optional<Sequence> seq;
      if (reject.empty() && !in.frames.empty()) seq = peek_sequence(in.frames[0], options_.limits);  // invalid: decode reports it
      std::lock_guard lock(mutex_);
      Peer& p = peer_locked(in.peer);
      if (reject.empty() && seq) reject = check_sequence_locked(p, *seq);
      if (!reject.empty()) {
        p.stats.messages_rejected += 1;
        const std::string line = limiter_.admit("reject:" + in.peer + ":" + reject.substr(0, 20), detail::concat("dropped a message (", in.bytes, " bytes) from ",
                                                                                    printable(in.peer), ": ", reject));
        if (!line.empty()) log(line);
        continue;
      }
      p.stats.bytes_received += in.bytes;
      p.stats.messages_received += 1;
      p.last_seen = in.at;
      inbound_bytes_ += in.bytes;
      inbound_.push_back(std::move(in));
      cv_.notify_all();
    }
  }

  // Accepts a sequence newer than the last one from the peer (a later session restarts the count).
  std::string check_sequence_locked(Peer& p, const Sequence& s) {
    if (s.seq == 0) return options_.security ? "unsequenced message on a secured link" : "";
    if (p.last_in && (s.session < p.last_in->session || (s.session == p.last_in->session && s.seq <= p.last_in->seq)))
      return detail::concat("replayed or out-of-order message (session ", s.session, " seq ", s.seq, "; last accepted session ",
                            p.last_in->session, " seq ", p.last_in->seq, ")");
    p.last_in = s;
    return {};
  }

  // Logs handshake failures reported by the socket monitor (two frames: event + value, endpoint).
  void pump_monitor() {
    for (int k = 0; k < kMaxRecvBurst; ++k) {
      zmq::message_t ev;
      if (!monitor_.recv(ev, zmq::recv_flags::dontwait)) return;
      std::string endpoint;
      for (bool more = ev.more(); more;) {
        zmq::message_t f;
        if (!monitor_.recv(f, zmq::recv_flags::none)) break;
        more = f.more();
        if (endpoint.empty()) endpoint = f.to_string();
      }
      if (ev.size() < 6) continue;
      uint16_t event = 0;
      uint32_t value = 0;
      std::memcpy(&event, ev.data(), 2);
      std::memcpy(&value, static_cast<const char*>(ev.data()) + 2, 4);
      std::string what;
      if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        if (router_) continue;  // the ZAP handler logged it, with the key
        what = detail::concat("the server refused this device's CURVE key (ZAP status ", value, "); add its public key ",
                              options_.security ? options_.security->keys.public_z85 : std::string("?"), " to the server's allow-list");
      } else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
        what = detail::concat("handshake failed: ", protocol_error_text(value), " [0x", std::hex, value, "]");
      } else {  // the other end gave up first, typically on a mechanism mismatch it detected itself
        what = "handshake failed: the peer closed the connection during the handshake (often one side uses CURVE keys, the other runs plain/--insecure)";
      }
      std::lock_guard lock(mutex_);
      const std::string line = limiter_.admit(detail::concat("monitor:", event, ":", value),
                                              detail::concat(router_ ? "refused a connection on " : "connection to ", endpoint, ": ", what));
      if (!line.empty()) log(line);
    }
  }

  void check_security() const {
    require_curve();
    const Security& sec = *options_.security;
    auto need = [](const std::string& key, const char* what) {
      if (auto why = check_z85_key(key); !why.empty()) throw Error(detail::concat("transport: bad ", what, ": ", why));
    };
    need(sec.keys.secret_z85, "secret key");
    need(sec.keys.public_z85, "public key");
    if (public_key_of(sec.keys.secret_z85) != sec.keys.public_z85)
      throw Error("transport: the public key does not belong to the secret key (read both with read_keypair())");
    if (!router_) need(sec.server_public_z85, "server public key (--server-key)");
    if (router_ && sec.allow.keys.empty()) options_.log("CURVE server with an empty allow-list: no device can connect");
  }

  void io_main() {
    try {
      while (true) {
        {
          std::lock_guard lock(mutex_);
          if (stop_) break;
        }
        const Clock::time_point next = pump_sends();
        bool want_in;
        {
          std::lock_guard lock(mutex_);
          want_in = inbound_bytes_ < options_.max_inbound_bytes;
        }
        zmq::pollitem_t items[3] = {{wake_rx_.handle(), 0, ZMQ_POLLIN, 0},
                                    {sock_.handle(), 0, static_cast<short>(want_in ? ZMQ_POLLIN : 0), 0},
                                    {monitor_.handle(), 0, ZMQ_POLLIN, 0}};
        const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next - Clock::now() + std::chrono::microseconds(999));
        zmq::poll(items, 3, std::max(wait, std::chrono::milliseconds(0)));
        if (items[2].revents & ZMQ_POLLIN) pump_monitor();
        if (items[0].revents & ZMQ_POLLIN) {
          zmq::message_t m;
          while (wake_rx_.recv(m, zmq::recv_flags::dontwait)) {
          }
        }
        if (items[1].revents & ZMQ_POLLIN) pump_recvs();
      }
    } catch (const zmq::error_t& e) {
      std::lock_guard lock(mutex_);
      fatal_ = std::make_exception_ptr(Error(detail::concat("transport I/O thread: ", e.what(), " (errno ", e.num(), ")")));
      cv_.notify_all();
    } catch (const std::exception& e) {
      std::lock_guard lock(mutex_);
      fatal_ = std::make_exception_ptr(Error(detail::concat("transport I/O thread: ", e.what())));
      cv_.notify_all();
    }
    // Drop what was never handed to ZeroMQ, so flush() and records see it.
    std::lock_guard lock(mutex_);
    for (auto& [id, p] : peers_) {
      for (auto& q : {&p.queue, &p.due})
        for (auto& pending : *q) record_locked(id, pending, Clock::now(), false);
      p.queue.clear();
      p.due.clear();
    }
    cv_.notify_all();
  }

 public:
  static std::string printable(const PeerId& id) {
    if (auto d = device_of(id)) return "device " + std::to_string(*d);
    if (id.empty()) return "server";
    std::string s = "peer 0x";
    static const char* kHex = "0123456789abcdef";
    for (unsigned char c : id) {
      s += kHex[c >> 4];
      s += kHex[c & 15];
    }
    return s;
  }

 private:
  LinkOptions options_;
  zmq::context_t* ctx_ = nullptr;
  std::unique_ptr<ZapRegistration> zap_;  // Server with security: its ZAP domain (reset last, see ~LinkCore)
  zmq::socket_t sock_;     // owned by io_ once started
  zmq::socket_t monitor_;  // owned by io_: handshake-failure events of sock_
  zmq::socket_t wake_rx_;  // owned by io_
  zmq::socket_t wake_tx_;  // used under mutex_ by any thread
  bool router_ = false;
  std::string bound_;
  std::optional<uint32_t> heartbeat_device_;
  Clock::time_point last_heartbeat_;
  uint64_t session_ = 0;     // this link's incarnation in the replay check
  std::mutex order_mutex_;   // taken before mutex_: sequence numbering + queueing in send order
  uint64_t next_seq_ = 0;    // under order_mutex_
  LogLimiter limiter_;       // under mutex_

  mutable std::mutex mutex_;
  std::condition_variable cv_;  // inbound arrived, sends progressed, fatal error
  bool stop_ = false;
  std::exception_ptr fatal_;
  std::map<PeerId, Peer> peers_;
  std::deque<Inbound> inbound_;
  size_t inbound_bytes_ = 0;
  size_t outstanding_ = 0;  // sent by the user, not yet handed to ZeroMQ or dropped
  uint64_t next_id_ = 0;
  std::deque<TransferRecord> records_;
  std::thread io_;
};

// --- Server

Server::Server(const std::string& endpoint, LinkOptions options)
    : core_(std::make_unique<LinkCore>(zmq::socket_type::router, std::move(options))) {
  core_->bind(endpoint);
  core_->start(std::nullopt);
}
Server::~Server() = default;

const std::string& Server::bound_endpoint() const { return core_->endpoint(); }

std::optional<Received> Server::recv(std::chrono::milliseconds timeout) {
  auto in = core_->pop_inbound(timeout);
  if (!in) return std::nullopt;
  Received r{in->peer, device_of(in->peer), decode(in->frames, core_->options().limits), in->bytes, in->at};
  in->frames.clear();  // free the raw frames before any reply
  if (r.message.ok() && r.device) {
    if (auto d = message_device(r.message.value()); d && *d != *r.device)
      r.message = Result<Message>::failure(detail::concat(message_type_name(message_type(r.message.value())), " claims device ", *d,
                                                          " but comes from device ", *r.device));
  }
  if (!r.message.ok()) {
    core_->log(detail::concat("bad message from ", LinkCore::printable(r.peer), " (", r.bytes, " bytes): ", r.message.error(),
                              "; dropped, error sent"));
    core_->send(r.peer, ErrorReply{ErrorCode::kMalformed, r.message.error()});
  }
  return r;
}

uint64_t Server::send(const PeerId& peer, const Message& m) { return core_->send(peer, m); }
bool Server::flush(std::chrono::milliseconds timeout) { return core_->flush(timeout); }
void Server::set_shape(const PeerId& peer, LinkShape s) { core_->set_shape(peer, s.rate_mbps, s.latency_ms); }
void Server::set_rate(const PeerId& peer, double rate_mbps) { core_->set_shape(peer, rate_mbps, std::nullopt); }
void Server::set_latency(const PeerId& peer, double latency_ms) { core_->set_shape(peer, std::nullopt, latency_ms); }
LinkShape Server::shape(const PeerId& peer) const { return core_->shape(peer); }
LinkStats Server::stats(const PeerId& peer) const { return core_->stats(peer); }
LinkStats Server::total_stats() const { return core_->total_stats(); }
std::vector<PeerId> Server::peers() const { return core_->peers(); }
std::optional<Clock::time_point> Server::last_seen(const PeerId& peer) const { return core_->last_seen(peer); }
std::vector<TransferRecord> Server::take_transfers() { return core_->take_transfers(); }

// --- DeviceLink

DeviceLink::DeviceLink(const std::string& endpoint, uint32_t device, LinkOptions options)
    : device_(device), core_(std::make_unique<LinkCore>(zmq::socket_type::dealer, std::move(options))) {
  core_->set_routing_id(routing_id(device));
  core_->connect(endpoint);
  core_->start(device);
}
DeviceLink::~DeviceLink() = default;

uint64_t DeviceLink::send(const Message& m) { return core_->send("", m); }

std::optional<Result<Message>> DeviceLink::recv(std::chrono::milliseconds timeout) {
  auto in = core_->pop_inbound(timeout);
  if (!in) return std::nullopt;
  Result<Message> r = decode(in->frames, core_->options().limits);
  if (!r.ok()) core_->log(detail::concat("device ", device_, ": bad message from the server (", in->bytes, " bytes): ", r.error()));
  return r;
}

bool DeviceLink::flush(std::chrono::milliseconds timeout) { return core_->flush(timeout); }
void DeviceLink::set_shape(LinkShape s) { core_->set_shape("", s.rate_mbps, s.latency_ms); }
void DeviceLink::set_rate(double rate_mbps) { core_->set_shape("", rate_mbps, std::nullopt); }
void DeviceLink::set_latency(double latency_ms) { core_->set_shape("", std::nullopt, latency_ms); }
LinkShape DeviceLink::shape() const { return core_->shape(""); }
LinkStats DeviceLink::stats() const { return core_->stats(""); }
std::vector<TransferRecord> DeviceLink::take_transfers() { return core_->take_transfers(); }

}  // namespace pipar::transport
