// Shared pieces of the libFuzzer targets: a private scratch directory per process (file readers get
// their input as a file), and the frame format of decode_fuzz.
#pragma once
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

namespace pipar::fuzz {

// A directory under $TMPDIR (or /tmp) for this process, removed at exit.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/pipar_fuzz_XXXXXX";
    if (!::mkdtemp(tmpl.data())) std::abort();
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return std::filesystem::path(tmpl);
  }();
  return dir;
}

// Writes bytes to scratch_dir()/name (replacing it) and returns the path.
inline std::string write_scratch(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = (scratch_dir() / name).string();
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return path;
}

inline uint32_t load_le32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}

// decode_fuzz input format: frames back to back, each a 4-byte little-endian length L followed by L
// bytes. A length that runs past the end takes the bytes that are left; 1-3 trailing bytes (too
// few for a length) are one last frame of their own. An empty input is zero frames.
inline std::vector<std::vector<uint8_t>> split_frames(const uint8_t* data, size_t size, size_t max_frames) {
  std::vector<std::vector<uint8_t>> frames;
  size_t pos = 0;
  while (pos < size && frames.size() < max_frames) {
    if (size - pos < 4) {
      frames.emplace_back(data + pos, data + size);
      break;
    }
    const size_t len = load_le32(data + pos);
    pos += 4;
    const size_t take = len < size - pos ? len : size - pos;
    frames.emplace_back(data + pos, data + pos + take);
    pos += take;
  }
  return frames;
}

inline void append_frame(std::vector<uint8_t>& out, const void* data, size_t size) {
  const uint32_t n = static_cast<uint32_t>(size);
  const uint8_t len[4] = {static_cast<uint8_t>(n), static_cast<uint8_t>(n >> 8), static_cast<uint8_t>(n >> 16),
                          static_cast<uint8_t>(n >> 24)};
  out.insert(out.end(), len, len + 4);
  out.insert(out.end(), static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + size);
}

}  // namespace pipar::fuzz
