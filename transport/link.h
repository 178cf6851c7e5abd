// Owning links over cppzmq: Server (ROUTER, one per server process) and DeviceLink (DEALER, one per
// device). Sends are asynchronous and paced by the link shape (shaping.h); receives wait with a timeout
// and decode with the codec's checks. Timeouts come back as std::nullopt, bad messages as error values,
// real ZeroMQ failures throw pipar::Error.
//
// Threads: each link owns one I/O thread, the only thread that touches its ZeroMQ socket (the socket is
// created and bound/connected in the constructor, before the thread starts). User threads talk to it
// through mutex-guarded queues and an inproc PAIR wake-up socket (its sending end is used under the
// mutex). Every public member function is safe to call from any thread. The log callback runs with
// the link's mutex held (from the I/O thread or a caller): it must not call back into the link.
// Destroying a link drops messages still waiting for their (paced) turn: call flush() first; messages
// already handed to ZeroMQ get linger_ms to leave.
//
// Security (LinkOptions::security, auth.h): unset = plain ZeroMQ (no authentication, no encryption;
// the CLI requires --insecure and prints plain_warning()). Set = ZeroMQ CURVE: the Server is a CURVE
// server and admits only keys in its allow-list, through a ZAP handler on the link's context (one per
// context, shared by its secured Servers); refused connections are logged with key and address and no
// byte of theirs reaches recv(). A key bound to a device id in the allow-list may only speak as that
// device: messages under another routing id are logged and dropped. Handshake failures (a client
// without keys, a wrong server key, a refused key on the device side) are logged through a socket
// monitor, rate-limited per kind.
// Replay check (both modes): every message carries the sending link's session and a per-link counter;
// a message not newer than the last one from the same peer is logged, dropped and counted in
// LinkStats::messages_rejected. Unsequenced messages (hand-built frames) pass on plain links only.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "transport/auth.h"
#include "transport/codec.h"
#include "transport/shaping.h"

namespace pipar::transport {

using PeerId = std::string;  // ZeroMQ routing id of a device's DEALER socket

// The routing id a device uses ("pipar-dev-<id>") and its inverse (nullopt for other ids).
PeerId routing_id(uint32_t device);
std::optional<uint32_t> device_of(const PeerId& peer);

// The process-wide ZeroMQ context the links use unless given one (inproc:// needs a shared context).
zmq::context_t& default_context();

struct LinkOptions {
  Limits limits;                                     // decode checks; ZMQ_MAXMSGSIZE per frame from these
  LinkShape shape;                                   // outgoing direction: DeviceLink uplink; Server default downlink per peer
  int linger_ms = 1000;                              // ZMQ_LINGER: how long unsent messages survive close
  int send_hwm = 1000, recv_hwm = 1000;              // ZeroMQ high-water marks (messages)
  std::chrono::milliseconds send_timeout{5000};      // a message ZeroMQ refuses (HWM) this long is dropped
  std::chrono::milliseconds heartbeat_interval{0};   // DeviceLink: send Heartbeat this often (0 = never)
  int zmtp_heartbeat_ms = 1000;                      // ZeroMQ-level ping on idle connections (0 = off) ...
  int zmtp_timeout_ms = 10000;                       // ... and the silence after which a connection is dropped
  size_t max_inbound_bytes = size_t{2} << 30;        // stop reading the socket while this much awaits recv()
  size_t max_transfer_records = 100000;              // oldest records are dropped beyond this
  std::function<void(const std::string&)> log;       // log lines (bad messages, drops); default stderr
  zmq::context_t* context = nullptr;                 // (optional) default: default_context()
  std::optional<Security> security;                  // (optional) CURVE keys; unset = plain (insecure)
};

// Bytes and messages through one link (the Server counts per peer); bytes are all frames of a message.
struct LinkStats {
  uint64_t bytes_sent = 0, bytes_received = 0;
  uint64_t messages_sent = 0, messages_received = 0;
  uint64_t messages_rejected = 0;  // dropped on receipt: replayed/out of order, or wrong device for the key
};

// What happened to one sent message, on steady_clock: queued by send(), first and last bit on the
// (shaped) link, handed to ZeroMQ at the modelled arrival time. For tracing uploads/downloads.
struct TransferRecord {
  uint64_t id = 0;           // the value send() returned
  PeerId peer;               // "" on a DeviceLink
  MessageType type = MessageType::kHeartbeat;
  size_t bytes = 0;
  Clock::time_point enqueued, started, finished, delivered;
  bool ok = true;            // false: dropped (peer unreachable, send timeout, link closed)
};

// A received message with its sender. `message` is an error value when decoding failed.
struct Received {
  PeerId peer;
  std::optional<uint32_t> device;  // from the routing id
  Result<Message> message;
  size_t bytes = 0;
  Clock::time_point at;            // when the I/O thread took it off the socket
};

class LinkCore;  // link.cpp

// --- Server: ROUTER socket bound to an endpoint, talking to many devices

class Server {
 public:
  // endpoint: "tcp://0.0.0.0:PORT", "tcp://127.0.0.1:*" (port chosen by the OS), "ipc://path", "inproc://name".
  explicit Server(const std::string& endpoint, LinkOptions options = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The endpoint actually bound, with the real port (e.g. "tcp://127.0.0.1:41235").
  const std::string& bound_endpoint() const;

  // Next message from any device, or nullopt after `timeout`. A message that fails decoding, or whose
  // device field disagrees with the sender's routing id, is logged, answered with an ErrorReply
  // (kMalformed) and returned as an error value so the caller can count it; the server keeps serving.
  std::optional<Received> recv(std::chrono::milliseconds timeout);
  // Queues a message for a peer (paced by that peer's downlink shape); returns the transfer id.
  // Never blocks on the network. An unknown/disconnected peer shows up as a record with ok = false.
  uint64_t send(const PeerId& peer, const Message& m);
  uint64_t send(uint32_t device, const Message& m) { return send(routing_id(device), m); }
  // Waits until every queued message was handed to ZeroMQ; false on timeout.
  bool flush(std::chrono::milliseconds timeout);

  // Downlink shaping per peer (usable before the peer connects); new peers get options.shape.
  void set_shape(const PeerId& peer, LinkShape shape);
  void set_rate(const PeerId& peer, double rate_mbps);
  void set_latency(const PeerId& peer, double latency_ms);
  LinkShape shape(const PeerId& peer) const;

  LinkStats stats(const PeerId& peer) const;
  LinkStats total_stats() const;
  std::vector<PeerId> peers() const;  // peers seen or configured
  std::optional<Clock::time_point> last_seen(const PeerId& peer) const;  // last message received
  std::vector<TransferRecord> take_transfers();  // completed records since the last call

 private:
  std::unique_ptr<LinkCore> core_;
};

// --- DeviceLink: DEALER socket connected to the server with routing id routing_id(device)

class DeviceLink {
 public:
  DeviceLink(const std::string& endpoint, uint32_t device, LinkOptions options = {});
  ~DeviceLink();
  DeviceLink(const DeviceLink&) = delete;
  DeviceLink& operator=(const DeviceLink&) = delete;

  uint32_t device() const { return device_; }
  // Queues a message for the server (paced by the uplink shape); returns at once with the transfer id,
  // so the caller computes micro-batch i+1 while micro-batch i uploads.
  uint64_t send(const Message& m);
  // Next message from the server (decoded and checked), or nullopt after `timeout`.
  std::optional<Result<Message>> recv(std::chrono::milliseconds timeout);
  bool flush(std::chrono::milliseconds timeout);

  void set_shape(LinkShape shape);
  void set_rate(double rate_mbps);    // takes effect at once, also for the message in transmission
  void set_latency(double latency_ms);
  LinkShape shape() const;

  LinkStats stats() const;
  std::vector<TransferRecord> take_transfers();

 private:
  uint32_t device_;
  std::unique_ptr<LinkCore> core_;
};

}  // namespace pipar::transport
