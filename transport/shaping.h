// Link shaping: a fluid model of one direction of one link (rate in Mbit/s, latency in ms) that paces
// the real encoded bytes a link sends. The links (link.h) run it on their I/O thread; it is a plain
// class with the clock passed in, so its arithmetic is testable without sockets or sleeps.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

namespace pipar::transport {

using Clock = std::chrono::steady_clock;

// One direction of one link. rate_mbps 0 = unlimited (1 Mbit = 1e6 bits); latency is added after a
// message's last bit leaves.
struct LinkShape {
  double rate_mbps = 0;
  double latency_ms = 0;
};

// Timing of one message through a Pacer (and, in TransferRecord, through a link).
struct PacedTiming {
  uint64_t seq = 0;
  size_t bytes = 0;
  Clock::time_point enqueued;  // handed to the link
  Clock::time_point started;   // first bit on the link (after the messages queued before it)
  Clock::time_point finished;  // last bit on the link: started + bytes*8/rate (rate changes included)
  Clock::time_point due;       // arrival at the peer: finished + latency (never before an earlier message)
};

// FIFO link model: a message of B bytes occupies the link for B*8/rate seconds once the previous one
// has finished, then arrives latency later. set_rate() applies from `now` on, also to the message in
// transmission (its remaining bits go at the new rate). Not thread-safe: one owner.
class Pacer {
 public:
  explicit Pacer(LinkShape shape = {}) : shape_(shape) {}

  // Queues a message of `bytes` at time `now`; returns its sequence number (0, 1, ...).
  uint64_t push(size_t bytes, Clock::time_point now);
  void set_rate(double rate_mbps, Clock::time_point now);
  void set_latency(double latency_ms, Clock::time_point now);
  LinkShape shape() const { return shape_; }

  // Advances to `now` and removes the messages whose arrival time has come, oldest first.
  std::vector<PacedTiming> pop_due(Clock::time_point now);
  // The next time something happens (a transmission ends or a message becomes due); nullopt when idle.
  std::optional<Clock::time_point> next_event() const;
  bool empty() const { return sending_.empty() && in_flight_.empty(); }
  size_t queued() const { return sending_.size() + in_flight_.size(); }

 private:
  void advance(Clock::time_point now);
  double bits_per_second() const { return shape_.rate_mbps * 1e6; }

  LinkShape shape_;
  uint64_t next_seq_ = 0;
  Clock::time_point link_free_;        // when the last finished transmission ended
  Clock::time_point last_due_;
  double head_bits_left_ = 0;          // bits of sending_.front() not yet sent (valid when head_started_)
  Clock::time_point head_progress_;    // time up to which head_bits_left_ is accounted
  bool head_started_ = false;
  std::deque<PacedTiming> sending_;    // waiting or in transmission (front)
  std::deque<PacedTiming> in_flight_;  // transmitted, waiting out the latency
};

}  // namespace pipar::transport
