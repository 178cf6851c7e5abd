// Timing of pipeline stages: intervals on named tracks (one per resource: a device's compute, its
// uplink and downlink, the server), written as a Chrome trace (opens in Perfetto as a Gantt chart)
// and summed into busy times. Times are seconds on the steady clock, which all processes of one
// Linux host share.
#pragma once
#include <mutex>
#include <string>
#include <vector>

namespace pipar {

double now_seconds();  // steady clock

struct TraceEvent {
  std::string track, name;
  double begin = 0, end = 0;  // seconds, steady clock
};

class Trace {
 public:
  void add(const std::string& track, const std::string& name, double begin, double end);
  void add_all(const std::vector<TraceEvent>& events);
  std::vector<TraceEvent> events() const;
  // Union length of a track's intervals within [from, to] (overlaps counted once).
  double busy_seconds(const std::string& track, double from, double to) const;
  // Chrome trace JSON ("traceEvents", complete events in microseconds from `origin`).
  void write_chrome_json(const std::string& path, double origin) const;

 private:
  mutable std::mutex mu_;
  std::vector<TraceEvent> events_;
};

// Serializes events for a message (JSON text) and back.
std::string events_to_json(const std::vector<TraceEvent>& events);
std::vector<TraceEvent> events_from_json(const std::string& text);

}  // namespace pipar
