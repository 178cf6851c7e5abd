// The kernel-choice cache file (kernel_cache.h).
#include "kernels/kernel_cache.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "kernels/error.h"

namespace pipar::kernels {
namespace {

constexpr const char* kHeader = "# pipar kernel cache v1";

bool clean(const std::string& s) { return s.find_first_of("\t\n\r") == std::string::npos; }

}  // namespace

KernelCache::KernelCache(std::string path) : path_(std::move(path)) {
  if (!path_.empty()) entries_ = read_file(path_, true);
}

std::map<std::string, std::string> KernelCache::read_file(const std::string& path, bool warn) {
  std::map<std::string, std::string> out;
  std::ifstream f(path);
  if (!f) return out;  // no cache yet
  std::string line;
  if (!std::getline(f, line) || line != kHeader) {
    if (warn)
      std::fprintf(stderr, "pipar: kernel cache %s is not a v1 cache (first line '%s'); ignoring it\n", path.c_str(),
                   line.substr(0, 60).c_str());
    return out;
  }
  size_t number = 1;
  while (std::getline(f, line)) {
    ++number;
    if (line.empty()) continue;
    const size_t tab = line.find('\t');
    if (tab == std::string::npos || tab == 0 || line.find('\t', tab + 1) != std::string::npos) {
      if (warn)
        std::fprintf(stderr, "pipar: kernel cache %s: line %zu is malformed; ignoring it and the rest\n", path.c_str(),
                     number);
      break;
    }
    out[line.substr(0, tab)] = line.substr(tab + 1);
  }
  return out;
}

std::optional<std::string> KernelCache::get(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return std::nullopt;
  return it->second;
}

std::map<std::string, std::string> KernelCache::entries() const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_;
}

void KernelCache::put(const std::string& key, const std::string& value) {
  if (key.empty() || !clean(key) || !clean(value))
    throw Error("kernel cache: a key or value with a tab or newline (or an empty key): '" + key + "'");
  std::lock_guard<std::mutex> lock(mu_);
  entries_[key] = value;
  if (path_.empty()) return;
  // Merge with the file as it is now (entries another process added since we read it), ours winning.
  std::map<std::string, std::string> merged = read_file(path_, false);
  for (const auto& [k, v] : entries_) merged[k] = v;
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path target(path_);
  if (target.has_parent_path()) fs::create_directories(target.parent_path(), ec);
  const std::string tmp = path_ + ".tmp." + std::to_string(::getpid());
  bool ok = false;
  {
    std::ofstream f(tmp, std::ios::trunc);
    if (f) {
      f << kHeader << '\n';
      for (const auto& [k, v] : merged) f << k << '\t' << v << '\n';
      f.flush();
      ok = static_cast<bool>(f);
    }
  }
  if (ok) {
    fs::rename(tmp, target, ec);
    ok = !ec;
  }
  if (!ok) {
    fs::remove(tmp, ec);
    if (!write_warned_)
      std::fprintf(stderr, "pipar: cannot write the kernel cache %s; choices are kept for this run only\n",
                   path_.c_str());
    write_warned_ = true;
    return;
  }
  entries_ = std::move(merged);
}

std::string KernelCache::default_path() {
  if (const char* p = std::getenv("PIPAR_KERNEL_CACHE")) return p;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/pipar/kernels.tsv";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/pipar/kernels.tsv";
  return "";
}

}  // namespace pipar::kernels
