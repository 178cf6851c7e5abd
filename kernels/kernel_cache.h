// The on-disk record of which kernel implementation won for each layer shape (the CUDA backend's
// per-layer autotuning): key → value text lines, kept across runs so that a shape is timed once per
// GPU and library versions (the caller puts both into the key). No CUDA in here: it is plain host
// code, tested on any machine.
//
// File format (UTF-8 text): a first line "# pipar kernel cache v1", then one "key<TAB>value" line per
// entry; keys and values hold no tab or newline. A missing file is an empty cache; a file with another
// first line, or lines without a tab, is read as far as it is valid, and the rest is ignored with one
// warning on stderr (a cache is never worth a failed run). Writes merge with what is on disk (another
// process may have added entries) and replace the file atomically (temporary file + rename).
#pragma once
#include <cstddef>
#include <map>
#include <mutex>
#include <optional>
#include <string>

namespace pipar::kernels {

class KernelCache {
 public:
  // Loads `path` (see the format above). An empty path keeps the cache in memory only.
  explicit KernelCache(std::string path);

  std::optional<std::string> get(const std::string& key) const;
  // Records key → value in memory and on disk. A key or value with a tab or newline is refused
  // (pipar::Error); a failed write warns once on stderr and keeps the entry in memory.
  void put(const std::string& key, const std::string& value);
  std::map<std::string, std::string> entries() const;
  const std::string& path() const { return path_; }

  // $PIPAR_KERNEL_CACHE if set (empty: memory only), else $XDG_CACHE_HOME/pipar/kernels.tsv, else
  // $HOME/.cache/pipar/kernels.tsv, else memory only.
  static std::string default_path();

 private:
  static std::map<std::string, std::string> read_file(const std::string& path, bool warn);

  std::string path_;
  mutable std::mutex mu_;
  std::map<std::string, std::string> entries_;
  bool write_warned_ = false;
};

}  // namespace pipar::kernels
