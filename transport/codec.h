// Wire messages as plain C++ (Message = a variant of one struct per kind) and the codec: encode() to
// ZeroMQ frames (flatbuffer envelope + one raw frame per tensor) and decode() that checks everything
// (frame count, identifier, flatbuffers Verifier, every size against Limits) and returns failures as values.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <zmq.hpp>

#include "kernels/error.h"
#include "runtime/tensor.h"

namespace pipar::transport {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr char kFileIdentifier[] = "PIPR";

// --- Result: a value or an error string (expected failures are values, not exceptions)

template <class T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit on purpose
  static Result failure(std::string why) { return Result(Failure{std::move(why)}); }
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() { return std::get<0>(v_); }              // precondition: ok()
  const T& value() const { return std::get<0>(v_); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  const std::string& error() const { return std::get<1>(v_).why; }  // precondition: !ok()

 private:
  struct Failure {
    std::string why;
  };
  explicit Result(Failure f) : v_(std::move(f)) {}
  std::variant<T, Failure> v_;
};

// --- Message kinds

enum class WeightsPart : uint8_t { kDevice, kServer, kWhole };
enum class ErrorCode : int16_t { kMalformed, kUnexpected, kVersion, kInternal, kShutdown };

// A named tensor (weights); the name travels in the envelope, the data as its own frame.
struct NamedTensor {
  std::string name{};
  Tensor tensor{};
};

struct Hello {
  uint32_t device = 0;
  uint32_t protocol_version = kProtocolVersion;
  std::string capabilities{};       // free text, e.g. "cpu,avx2"
  uint64_t capability_flags = 0;
  int64_t data_size = 0;          // training samples on the device
  std::string profile{};            // (optional) opaque profile bytes (e.g. JSON from the planner)
};

struct DevicePlan {
  uint32_t device = 0;
  int64_t samples = 0;
  int32_t batches = 0;
  double uplink_mbps = 0;
  double downlink_mbps = 0;
};

struct Plan {
  int32_t round = 0;
  int32_t epoch = 0;
  std::string mode{};               // "fl", "sl", "sfl", "pipar"
  int32_t split_point = 0;
  int32_t micro_batches = 1;
  int32_t batch_size = 0;
  double learning_rate = 0;
  uint64_t seed = 0;
  bool finished = false;          // training is over
  std::vector<DevicePlan> devices{};
  std::string config{};           // (optional) opaque run configuration, e.g. JSON
};

// One micro-batch's activation (device → server); labels (int32 or float) travel as a second frame.
struct Activation {
  int32_t round = 0, batch = 0, micro_batch = 0;
  uint32_t device = 0;
  int32_t samples = 0;
  Tensor data{};                    // required
  Tensor labels{};                  // (optional)
};

// One micro-batch's gradient w.r.t. the activation (server → device).
struct Gradient {
  int32_t round = 0, batch = 0, micro_batch = 0;
  uint32_t device = 0;
  int32_t samples = 0;
  Tensor data{};                    // required
};

struct Weights {
  int32_t round = 0;
  uint32_t device = 0;
  WeightsPart part = WeightsPart::kDevice;
  int64_t samples = 0;            // FedAvg weight
  std::vector<NamedTensor> tensors{};
};

struct RoundEnd {
  int32_t round = 0;
  uint32_t device = 0;
  int64_t samples = 0;
  double loss_sum = 0;
  int64_t correct = 0;
  std::map<std::string, double> stats{};  // free-form numbers (busy seconds, ...)
  std::string details{};          // (optional) opaque details, e.g. JSON trace events of the round
};

struct ErrorReply {
  ErrorCode code = ErrorCode::kMalformed;
  std::string text{};
};

struct Heartbeat {
  uint32_t device = 0;
  int64_t time_ns = 0;            // sender's steady clock; kGoodbye: a device's last message (it exits)
  static constexpr int64_t kGoodbye = -1;
};

// A link probe: the server sends one (payload: the downlink's test bytes), the device answers with the
// same seq and reply_bytes of payload (the uplink's); the server times the round trips.
struct Probe {
  uint32_t device = 0;
  uint32_t seq = 0;
  int64_t reply_bytes = 0;          // the answer's payload, bytes (0 in the answer itself)
  Tensor payload{};                 // (optional) float32 zeros
};

using Message = std::variant<Hello, Plan, Activation, Gradient, Weights, RoundEnd, ErrorReply, Heartbeat, Probe>;

enum class MessageType : uint8_t { kHello, kPlan, kActivation, kGradient, kWeights, kRoundEnd, kErrorReply, kHeartbeat, kProbe };
inline MessageType message_type(const Message& m) { return static_cast<MessageType>(m.index()); }
const char* message_type_name(MessageType t);
// The device id a message carries (Hello, Activation, Gradient, Weights, RoundEnd, Heartbeat, Probe), if any.
std::optional<uint32_t> message_device(const Message& m);

// --- Limits checked by decode (and used for ZMQ_MAXMSGSIZE by the links)

struct Limits {
  int64_t max_dim = int64_t{1} << 28;                  // each of n, c, h, w
  uint64_t max_tensor_bytes = uint64_t{512} << 20;     // one payload frame
  uint64_t max_message_bytes = uint64_t{1} << 30;      // all frames together
  uint64_t max_envelope_bytes = uint64_t{64} << 20;    // the flatbuffer frame
  size_t max_tensors = 4096;                           // payload frames per message
  size_t max_string_bytes = size_t{32} << 20;          // any string or byte field
  size_t max_list_entries = 65536;                     // plan devices, stats
  uint32_t max_depth = 16;                             // flatbuffers Verifier
  uint32_t max_tables = 200000;
};

// --- Codec

using Frames = std::vector<zmq::message_t>;

// Encodes a message: frame 0 is the flatbuffer envelope, then one frame per tensor. Tensor frames
// share the tensor's storage (zero-copy; the frame keeps the storage alive until ZeroMQ is done), so
// do not write into a tensor after sending it — send a clone() if its buffer is reused. CUDA
// tensors are copied to the host. Throws pipar::Error on a programming error (missing required
// tensor, non-4-byte dtype).
Frames encode(const Message& m);
// Replay-check fields of the envelope: the sending link's incarnation (its start time; larger for a
// later link) and a per-link counter from 1. {0, 0} = unsequenced (plain encode()).
struct Sequence {
  uint64_t session = 0, seq = 0;
};
Frames encode(const Message& m, Sequence sequence);
// The sequence of an envelope frame (identifier + Verifier checked, nothing copied but a misaligned
// envelope); nullopt when the frame is not a valid envelope (decode() will say why).
std::optional<Sequence> peek_sequence(const zmq::message_t& envelope, const Limits& limits = {});
// Total bytes of a message's frames (what a link counts and paces).
size_t frames_bytes(const Frames& frames);
// Decodes and validates frames; never throws on bad input, never allocates from an unchecked size.
// Tensors in the result are fresh CPU tensors (one copy out of the frame).
Result<Message> decode(const Frames& frames, const Limits& limits = {});

}  // namespace pipar::transport
