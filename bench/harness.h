// What every benchmark here shares: median/min/max statistics over repeats, the steady clock, and
// the machine and commit lines printed before any number.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace pipar::bench {

struct Stats {
  double median = 0, min = 0, max = 0;
  double noise_pct() const { return median > 0 ? 100.0 * (max - min) / median : 0; }  // (max - min) / median
};

inline Stats summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  Stats s;
  s.min = v.front();
  s.max = v.back();
  s.median = v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  return s;
}

inline double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// The first line a shell command prints, or "unknown".
inline std::string shell_line(const std::string& cmd) {
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[256];
    if (std::fgets(buf, sizeof buf, p)) out = buf;
    pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r' || out.back() == ' ')) out.pop_back();
  return out.empty() ? "unknown" : out;
}

// The value of command-line option argv[i] (argv[i + 1], and i moves past it); a missing value ends the
// program with a message (exit code 2).
inline std::string option_value(int argc, char** argv, int& i) {
  if (i + 1 >= argc) {
    std::fprintf(stderr, "%s needs a value\n", argv[i]);
    std::exit(2);
  }
  return argv[++i];
}

// "a,b,,c" → {"a", "b", "c"}: a comma-separated command-line list (or separated by `sep`).
inline std::vector<std::string> split_list(const std::string& s, char sep = ',') {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

inline std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

inline std::string git_commit() {
#ifdef PIPAR_SOURCE_DIR
  return shell_line(std::string("git -C '") + PIPAR_SOURCE_DIR + "' rev-parse --short HEAD 2>/dev/null");
#else
  return "unknown";
#endif
}

}  // namespace pipar::bench
