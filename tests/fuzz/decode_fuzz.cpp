// libFuzzer target: transport::decode() and peek_sequence() on hostile frames (format in fuzz_util.h:
// length-prefixed frames, so envelope + payload frames of every message type are reachable). Each
// input is decoded with the default Limits, with tiny ones (so the limit checks are hit too) and, with
// the default Limits, from frames at odd addresses (as ZeroMQ may hand them over: the envelope copy
// path). A message that decodes must keep decode's promises (every tensor, string and list within the
// Limits, however its dims are ordered), survive encode → decode and re-encode to the same bytes.
// pipar::Error is never expected here: decode reports failures as values.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "tests/fuzz/fuzz_util.h"
#include "transport/codec.h"

namespace {

using pipar::transport::Frames;
using pipar::transport::Limits;

Frames to_frames(const std::vector<std::vector<uint8_t>>& parts) {
  Frames frames;
  frames.reserve(parts.size());
  for (const auto& p : parts) frames.emplace_back(p.data(), p.size());
  return frames;
}

bool same_bytes(const Frames& a, const Frames& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() || (a[i].size() && std::memcmp(a[i].data(), b[i].data(), a[i].size()) != 0))
      return false;
  return true;
}

// The same bytes, each frame starting at an odd address inside `storage` (constant ZeroMQ messages
// that point into it, nothing copied).
Frames misaligned(const std::vector<std::vector<uint8_t>>& parts, std::vector<uint8_t>& storage) {
  size_t total = 0;
  for (const auto& p : parts) total += p.size() + 8;
  storage.assign(total, 0);
  Frames frames;
  size_t pos = 1;
  for (const auto& p : parts) {
    if (!p.empty()) std::memcpy(storage.data() + pos, p.data(), p.size());
    frames.emplace_back(storage.data() + pos, p.size(), nullptr);
    pos += p.size() + 8;  // stays odd
  }
  return frames;
}

[[noreturn]] void broken_promise(const char* what) {
  std::fprintf(stderr, "decode accepted a message that breaks its limits: %s\n", what);
  std::abort();
}

void check_tensor(const pipar::Tensor& t, const Limits& limits) {
  if (!t.defined()) return;
  const pipar::Shape4 s = t.shape();
  uint64_t bound = 1;  // product of the dims, zeros counted as 1
  for (int64_t d : {s.n, s.c, s.h, s.w}) {
    if (d < 0 || d > limits.max_dim) broken_promise("tensor dimension");
    if (d > 1 && __builtin_mul_overflow(bound, static_cast<uint64_t>(d), &bound)) broken_promise("tensor size overflows");
  }
  if (bound > limits.max_tensor_bytes / 4) broken_promise("tensor size");
}

void check_limits(const pipar::transport::Message& m, const Limits& limits) {
  using namespace pipar::transport;
  auto str = [&](const std::string& x) {
    if (x.size() > limits.max_string_bytes) broken_promise("string length");
  };
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, Hello>) {
          str(x.capabilities), str(x.profile);
        } else if constexpr (std::is_same_v<T, Plan>) {
          str(x.mode), str(x.config);
          if (x.devices.size() > limits.max_list_entries) broken_promise("plan devices");
        } else if constexpr (std::is_same_v<T, Activation>) {
          if (!x.data.defined()) broken_promise("activation without data");
          check_tensor(x.data, limits), check_tensor(x.labels, limits);
        } else if constexpr (std::is_same_v<T, Gradient>) {
          if (!x.data.defined()) broken_promise("gradient without data");
          check_tensor(x.data, limits);
        } else if constexpr (std::is_same_v<T, Weights>) {
          if (x.tensors.size() > limits.max_tensors) broken_promise("weights tensor count");
          for (const auto& t : x.tensors) str(t.name), check_tensor(t.tensor, limits);
        } else if constexpr (std::is_same_v<T, RoundEnd>) {
          str(x.details);
          if (x.stats.size() > limits.max_list_entries) broken_promise("round_end stats");
          for (const auto& kv : x.stats) str(kv.first);
        } else if constexpr (std::is_same_v<T, ErrorReply>) {
          str(x.text);
        }
      },
      m);
}

Frames copy(const Frames& f) {  // plain bytes, as if received (encode's frames share tensor storage)
  Frames out;
  for (const auto& m : f) out.emplace_back(m.data(), m.size());
  return out;
}

// Decodes (and checks) one input; returns whether it decoded.
bool check(const Frames& frames, const Limits& limits) {
  if (frames.empty()) (void)pipar::transport::peek_sequence(zmq::message_t(), limits);
  else (void)pipar::transport::peek_sequence(frames[0], limits);  // in place (a misaligned envelope stays so)
  auto r = pipar::transport::decode(frames, limits);
  if (!r.ok()) return false;
  const auto& m = r.value();
  check_limits(m, limits);
  (void)pipar::transport::message_type_name(pipar::transport::message_type(m));
  (void)pipar::transport::message_device(m);
  // Round trip: what decode accepts, encode must reproduce, and decode must accept again.
  const Frames once = copy(pipar::transport::encode(m));
  auto again = pipar::transport::decode(once, Limits{});
  if (!again.ok()) {
    std::fprintf(stderr, "re-encoded message does not decode: %s\n", again.error().c_str());
    std::abort();
  }
  if (!same_bytes(once, copy(pipar::transport::encode(again.value())))) {
    std::fprintf(stderr, "encode(decode(encode(m))) differs from encode(m)\n");
    std::abort();
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Limits kDefault{};
  static const Limits kTiny = [] {
    Limits l;
    l.max_dim = 64;
    l.max_tensor_bytes = 4096;
    l.max_message_bytes = 8192;
    l.max_envelope_bytes = 2048;
    l.max_tensors = 3;
    l.max_string_bytes = 16;
    l.max_list_entries = 3;
    l.max_depth = 4;
    l.max_tables = 16;
    return l;
  }();
  const auto parts = pipar::fuzz::split_frames(data, size, 64);
  const bool ok = check(to_frames(parts), kDefault);
  check(to_frames(parts), kTiny);
  std::vector<uint8_t> storage;
  if (check(misaligned(parts, storage), kDefault) != ok) {
    std::fprintf(stderr, "decode's verdict depends on where the frames lie in memory\n");
    std::abort();
  }
  return 0;
}
