// Fluid link model for paced sending (see shaping.h).
#include "transport/shaping.h"

#include <algorithm>

#include "kernels/error.h"

namespace pipar::transport {

namespace {
Clock::duration seconds(double s) { return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s)); }
}  // namespace

uint64_t Pacer::push(size_t bytes, Clock::time_point now) {
  advance(now);
  PacedTiming t;
  t.seq = next_seq_++;
  t.bytes = bytes;
  t.enqueued = now;
  sending_.push_back(t);
  advance(now);  // an idle unlimited link finishes it at once
  return t.seq;
}

void Pacer::set_rate(double rate_mbps, Clock::time_point now) {
  PIPAR_CHECK(rate_mbps >= 0, "negative link rate ", rate_mbps);
  advance(now);
  shape_.rate_mbps = rate_mbps;
  advance(now);
}

void Pacer::set_latency(double latency_ms, Clock::time_point now) {
  PIPAR_CHECK(latency_ms >= 0, "negative link latency ", latency_ms);
  advance(now);
  shape_.latency_ms = latency_ms;  // applies to messages that finish transmission from now on
}

void Pacer::advance(Clock::time_point now) {
  while (!sending_.empty()) {
    PacedTiming& h = sending_.front();
    if (!head_started_) {
      h.started = std::max(link_free_, h.enqueued);
      if (h.started > now) return;
      head_started_ = true;
      head_bits_left_ = static_cast<double>(h.bytes) * 8.0;
      head_progress_ = h.started;
    }
    Clock::time_point end;
    if (shape_.rate_mbps <= 0) {
      end = head_progress_;
    } else {
      end = head_progress_ + seconds(head_bits_left_ / bits_per_second());
      if (end > now) {  // still in transmission: account the bits sent up to now
        head_bits_left_ -= std::chrono::duration<double>(now - head_progress_).count() * bits_per_second();
        head_bits_left_ = std::max(head_bits_left_, 0.0);
        head_progress_ = now;
        return;
      }
    }
    h.finished = end;
    h.due = std::max(end + seconds(shape_.latency_ms * 1e-3), last_due_);
    last_due_ = h.due;
    link_free_ = end;
    in_flight_.push_back(h);
    sending_.pop_front();
    head_started_ = false;
  }
}

std::vector<PacedTiming> Pacer::pop_due(Clock::time_point now) {
  advance(now);
  std::vector<PacedTiming> out;
  while (!in_flight_.empty() && in_flight_.front().due <= now) {
    out.push_back(in_flight_.front());
    in_flight_.pop_front();
  }
  return out;
}

std::optional<Clock::time_point> Pacer::next_event() const {
  std::optional<Clock::time_point> t;
  if (!in_flight_.empty()) t = in_flight_.front().due;
  if (!sending_.empty()) {
    Clock::time_point end;
    if (!head_started_) {
      end = std::max(link_free_, sending_.front().enqueued);  // starts then (advance does the rest)
    } else {
      end = head_progress_ + (shape_.rate_mbps > 0 ? seconds(head_bits_left_ / bits_per_second()) : Clock::duration{});
    }
    if (!t || end < *t) t = end;
  }
  return t;
}

}  // namespace pipar::transport
