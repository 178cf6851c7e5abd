// Server and DeviceLink over one LinkCore: a ZeroMQ socket owned by an I/O thread that paces outgoing
// messages per peer (Pacer) and queues incoming frames for recv(), which decodes them in the caller.
#include "transport/link.h"

#include <atomic>
#include <condition_variable>
#include <cstdio>
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

[[noreturn]] void rethrow_as_pipar(const char* what_doing, const zmq::error_t& e) {
  throw Error(detail::concat("transport: ", what_doing, ": ", e.what(), " (errno ", e.num(), ")"));
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
    try {
      sock_ = zmq::socket_t(*ctx_, type);
      router_ = type == zmq::socket_type::router;
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
  }

  const std::string& endpoint() const { return bound_; }

  uint64_t send(const PeerId& peer, const Message& m) {
    Frames frames = encode(m);  // in the caller's thread: tensor frames share storage, no copy
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
  };

  Peer& peer_locked(const PeerId& id) {
    auto it = peers_.find(id);
    if (it == peers_.end()) it = peers_.emplace(id, Peer{Pacer(options_.shape), {}, {}, {}, {}}).first;
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
    std::unique_lock lock(mutex_);
    // Heartbeats (DeviceLink): queued like any message, so they obey the uplink shape.
    if (heartbeat_device_ && options_.heartbeat_interval.count() > 0) {
      if (now - last_heartbeat_ >= options_.heartbeat_interval) {
        last_heartbeat_ = now;
        Frames f = encode(Heartbeat{*heartbeat_device_, std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count()});
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
      next = std::min(next, last_heartbeat_ + options_.heartbeat_interval);
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
      std::lock_guard lock(mutex_);
      Peer& p = peer_locked(in.peer);
      p.stats.bytes_received += in.bytes;
      p.stats.messages_received += 1;
      p.last_seen = in.at;
      inbound_bytes_ += in.bytes;
      inbound_.push_back(std::move(in));
      cv_.notify_all();
    }
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
        zmq::pollitem_t items[2] = {{wake_rx_.handle(), 0, ZMQ_POLLIN, 0}, {sock_.handle(), 0, static_cast<short>(want_in ? ZMQ_POLLIN : 0), 0}};
        const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next - Clock::now() + std::chrono::microseconds(999));
        zmq::poll(items, 2, std::max(wait, std::chrono::milliseconds(0)));
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
  zmq::socket_t sock_;     // owned by io_ once started
  zmq::socket_t wake_rx_;  // owned by io_
  zmq::socket_t wake_tx_;  // used under mutex_ by any thread
  bool router_ = false;
  std::string bound_;
  std::optional<uint32_t> heartbeat_device_;
  Clock::time_point last_heartbeat_;

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
