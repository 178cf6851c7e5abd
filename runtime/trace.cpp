// Stage timing and Chrome trace output.
#include "runtime/trace.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace pipar {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void Trace::add(const std::string& track, const std::string& name, double begin, double end) {
  std::lock_guard<std::mutex> lock(mu_);
  events_.push_back({track, name, begin, end});
}

void Trace::add_all(const std::vector<TraceEvent>& events) {
  std::lock_guard<std::mutex> lock(mu_);
  events_.insert(events_.end(), events.begin(), events.end());
}

std::vector<TraceEvent> Trace::events() const {
  std::lock_guard<std::mutex> lock(mu_);
  return events_;
}

double Trace::busy_seconds(const std::string& track, double from, double to) const {
  std::vector<std::pair<double, double>> iv;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& e : events_)
      if (e.track == track) {
        const double b = std::max(e.begin, from), en = std::min(e.end, to);
        if (en > b) iv.emplace_back(b, en);
      }
  }
  std::sort(iv.begin(), iv.end());
  double busy = 0, cur_b = 0, cur_e = -1;
  for (const auto& [b, e] : iv) {
    if (b > cur_e) {
      if (cur_e > cur_b) busy += cur_e - cur_b;
      cur_b = b, cur_e = e;
    } else {
      cur_e = std::max(cur_e, e);
    }
  }
  if (cur_e > cur_b) busy += cur_e - cur_b;
  return busy;
}

void Trace::write_chrome_json(const std::string& path, double origin) const {
  const std::vector<TraceEvent> ev = events();
  std::map<std::string, int> tids;
  for (const auto& e : ev) tids.emplace(e.track, 0);
  int next = 1;
  for (auto& [track, id] : tids) id = next++;
  nlohmann::json events = nlohmann::json::array();
  for (const auto& [track, id] : tids)
    events.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", 1}, {"tid", id}, {"args", {{"name", track}}}});
  for (const auto& e : ev)
    events.push_back({{"ph", "X"},
                      {"name", e.name},
                      {"pid", 1},
                      {"tid", tids[e.track]},
                      {"ts", (e.begin - origin) * 1e6},
                      {"dur", std::max(0.0, e.end - e.begin) * 1e6}});
  std::ofstream f(path);
  if (!f) throw IoError("cannot write trace " + path);
  f << nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() << "\n";
}

std::string events_to_json(const std::vector<TraceEvent>& events) {
  nlohmann::json a = nlohmann::json::array();
  for (const auto& e : events) a.push_back({e.track, e.name, e.begin, e.end});
  return a.dump();
}

std::vector<TraceEvent> events_from_json(const std::string& text) {
  std::vector<TraceEvent> out;
  try {
    const auto a = nlohmann::json::parse(text);
    for (const auto& e : a)
      out.push_back({e.at(0).get<std::string>(), e.at(1).get<std::string>(), e.at(2).get<double>(), e.at(3).get<double>()});
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("malformed trace events: ") + e.what());
  }
  return out;
}

}  // namespace pipar
