// Codec between Message and ZeroMQ frames: flatbuffer envelope (messages.fbs) + raw tensor frames.
// decode() treats every byte as hostile: identifier, Verifier, then each field and size against Limits.
#include "transport/codec.h"

#include <cstring>
#include <memory>

#include "kernels/error.h"
#include "messages_generated.h"

namespace pipar::transport {

namespace {

// --- encode helpers

// Frame that shares a tensor's storage: the heap-held Tensor copy keeps it alive until ZeroMQ frees it.
zmq::message_t tensor_frame(const Tensor& t) {
  Tensor host = t.device() == Device::kCpu ? t : t.to(Device::kCpu);
  if (host.bytes() == 0) return zmq::message_t();
  auto* keep = new Tensor(host);
  return zmq::message_t(keep->raw(), keep->bytes(), [](void*, void* hint) { delete static_cast<Tensor*>(hint); }, keep);
}

fb::DType to_fb(DType d) { return d == DType::kI32 ? fb::DType_I32 : fb::DType_F32; }

flatbuffers::Offset<fb::TensorMeta> meta(flatbuffers::FlatBufferBuilder& b, const Tensor& t, const std::string& name = {}) {
  auto name_off = name.empty() ? 0 : b.CreateString(name);
  const Shape4 s = t.shape();
  return fb::CreateTensorMeta(b, name_off, s.n, s.c, s.h, s.w, to_fb(t.dtype()));
}

struct Encoder {
  flatbuffers::FlatBufferBuilder& b;
  std::vector<const Tensor*>& payloads;

  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const Hello& m) {
    auto caps = b.CreateString(m.capabilities);
    auto prof = m.profile.empty() ? 0 : b.CreateVector(reinterpret_cast<const uint8_t*>(m.profile.data()), m.profile.size());
    return {fb::Body_Hello, fb::CreateHello(b, m.device, m.protocol_version, caps, m.capability_flags, m.data_size, prof).Union()};
  }
  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const Plan& m) {
    auto mode = b.CreateString(m.mode);
    std::vector<flatbuffers::Offset<fb::DevicePlan>> devs;
    for (const auto& d : m.devices)
      devs.push_back(fb::CreateDevicePlan(b, d.device, d.samples, d.batches, d.uplink_mbps, d.downlink_mbps));
    auto devs_off = b.CreateVector(devs);
    auto config = m.config.empty() ? 0 : b.CreateString(m.config);
    return {fb::Body_Plan, fb::CreatePlan(b, m.round, m.epoch, mode, m.split_point, m.micro_batches, m.batch_size,
                                          m.learning_rate, m.seed, m.finished, devs_off, config).Union()};
  }
  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const Activation& m) {
    PIPAR_CHECK(m.data.defined(), "Activation without data tensor");
    auto d = meta(b, m.data);
    payloads.push_back(&m.data);
    flatbuffers::Offset<fb::TensorMeta> l = 0;
    if (m.labels.defined()) {
      l = meta(b, m.labels);
      payloads.push_back(&m.labels);
    }
    return {fb::Body_Activation,
            fb::CreateActivation(b, m.round, m.batch, m.micro_batch, m.device, m.samples, d, l).Union()};
  }
  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const Gradient& m) {
    PIPAR_CHECK(m.data.defined(), "Gradient without data tensor");
    auto d = meta(b, m.data);
    payloads.push_back(&m.data);
    return {fb::Body_Gradient, fb::CreateGradient(b, m.round, m.batch, m.micro_batch, m.device, m.samples, d).Union()};
  }
  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const Weights& m) {
    std::vector<flatbuffers::Offset<fb::TensorMeta>> metas;
    for (const auto& t : m.tensors) {
      PIPAR_CHECK(t.tensor.defined(), "Weights tensor '", t.name, "' is undefined");
      metas.push_back(meta(b, t.tensor, t.name));
      payloads.push_back(&t.tensor);
    }
    auto v = b.CreateVector(metas);
    return {fb::Body_Weights,
            fb::CreateWeights(b, m.round, m.device, static_cast<fb::WeightsPart>(m.part), m.samples, v).Union()};
  }
  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const RoundEnd& m) {
    std::vector<flatbuffers::Offset<fb::Stat>> stats;
    for (const auto& [k, v] : m.stats) stats.push_back(fb::CreateStat(b, b.CreateString(k), v));
    auto s = b.CreateVector(stats);
    auto details = m.details.empty() ? 0 : b.CreateString(m.details);
    return {fb::Body_RoundEnd, fb::CreateRoundEnd(b, m.round, m.device, m.samples, m.loss_sum, m.correct, s, details).Union()};
  }
  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const ErrorReply& m) {
    auto t = b.CreateString(m.text);
    return {fb::Body_ErrorReply, fb::CreateErrorReply(b, static_cast<fb::ErrorCode>(m.code), t).Union()};
  }
  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const Heartbeat& m) {
    return {fb::Body_Heartbeat, fb::CreateHeartbeat(b, m.device, m.time_ns).Union()};
  }
  std::pair<fb::Body, flatbuffers::Offset<void>> operator()(const Probe& m) {
    flatbuffers::Offset<fb::TensorMeta> p = 0;
    if (m.payload.defined()) {
      p = meta(b, m.payload);
      payloads.push_back(&m.payload);
    }
    return {fb::Body_Probe, fb::CreateProbe(b, m.device, m.seq, m.reply_bytes, p).Union()};
  }
};

// --- decode helpers

struct Decoder {
  const Frames& frames;
  const Limits& limits;
  size_t next_frame = 1;  // payload frames are consumed in order
  std::string why;

  bool fail(std::string w) {
    if (why.empty()) why = std::move(w);
    return false;
  }
  bool string_ok(const flatbuffers::String* s, const char* field) {
    if (s && s->size() > limits.max_string_bytes) return fail(std::string(field) + ": string longer than the limit");
    return true;
  }
  std::string str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

  // Validates one TensorMeta against limits and its payload frame, then copies it into a tensor.
  bool tensor(const fb::TensorMeta* m, const char* field, Tensor& out) {
    if (!m) return fail(std::string(field) + ": missing tensor");
    const int64_t dims[4] = {m->n(), m->c(), m->h(), m->w()};
    for (int64_t d : dims) {
      if (d < 0) return fail(std::string(field) + ": negative dimension");
      if (d > limits.max_dim) return fail(std::string(field) + ": dimension above the limit");
    }
    if (m->dtype() != fb::DType_F32 && m->dtype() != fb::DType_I32) return fail(std::string(field) + ": unknown dtype");
    // Product with overflow checks: each step stays below max_tensor_bytes / 4. A zero dimension
    // counts as 1 here, so an empty tensor's other dimensions are bounded too (whatever order they
    // come in) and products such as c * h * w of any decoded shape cannot overflow later.
    const uint64_t max_elems = limits.max_tensor_bytes / 4;
    uint64_t bound = 1;
    bool empty = false;
    for (int64_t d : dims) {
      if (d == 0) empty = true;
      if (d <= 1) continue;
      if (bound > max_elems / static_cast<uint64_t>(d)) return fail(std::string(field) + ": tensor larger than the limit");
      bound *= static_cast<uint64_t>(d);
    }
    const uint64_t numel = empty ? 0 : bound;
    if (!string_ok(m->name(), field)) return false;
    if (next_frame >= frames.size()) return fail(std::string(field) + ": missing payload frame");
    const zmq::message_t& f = frames[next_frame++];
    if (f.size() != numel * 4)
      return fail(std::string(field) + ": payload frame of " + std::to_string(f.size()) + " bytes, shape needs " +
                  std::to_string(numel * 4));
    out = Tensor::empty(Shape4{dims[0], dims[1], dims[2], dims[3]}, Device::kCpu,
                        m->dtype() == fb::DType_I32 ? DType::kI32 : DType::kF32);
    if (f.size()) std::memcpy(out.raw(), f.data(), f.size());
    return true;
  }

  // Number of payload frames the envelope declares (checked against the frame count before any copy).
  static size_t declared_tensors(const fb::Envelope* e) {
    switch (e->body_type()) {
      case fb::Body_Activation: {
        auto a = e->body_as_Activation();
        return (a->data() ? 1 : 0) + (a->labels() ? 1 : 0);
      }
      case fb::Body_Gradient:
        return e->body_as_Gradient()->data() ? 1 : 0;
      case fb::Body_Weights: {
        auto t = e->body_as_Weights()->tensors();
        return t ? t->size() : 0;
      }
      case fb::Body_Probe:
        return e->body_as_Probe()->payload() ? 1 : 0;
      default:
        return 0;
    }
  }

  Result<Message> run() {
    if (frames.empty()) return Result<Message>::failure("no frames");
    if (frames.size() > limits.max_tensors + 1) return Result<Message>::failure("too many frames");
    uint64_t total = 0;
    for (const auto& f : frames) total += f.size();
    if (total > limits.max_message_bytes) return Result<Message>::failure("message larger than the limit");
    for (size_t i = 1; i < frames.size(); ++i)
      if (frames[i].size() > limits.max_tensor_bytes) return Result<Message>::failure("payload frame larger than the limit");

    const zmq::message_t& head = frames[0];
    if (head.size() > limits.max_envelope_bytes) return Result<Message>::failure("envelope larger than the limit");
    if (head.size() < 8) return Result<Message>::failure("envelope too short");
    if (head.size() >= FLATBUFFERS_MAX_BUFFER_SIZE) return Result<Message>::failure("envelope too large for flatbuffers");
    // The Verifier checks alignment relative to the buffer start; ZeroMQ may hand us an unaligned
    // pointer into its receive buffer, so copy the (small) envelope when needed.
    const uint8_t* buf = static_cast<const uint8_t*>(head.data());
    std::vector<uint64_t> aligned;
    if (reinterpret_cast<uintptr_t>(buf) % alignof(uint64_t) != 0) {
      aligned.resize((head.size() + 7) / 8);
      std::memcpy(aligned.data(), buf, head.size());
      buf = reinterpret_cast<const uint8_t*>(aligned.data());
    }
    if (!flatbuffers::BufferHasIdentifier(buf, kFileIdentifier)) return Result<Message>::failure("wrong file identifier");
    flatbuffers::Verifier verifier(buf, head.size(), limits.max_depth, limits.max_tables);
    if (!fb::VerifyEnvelopeBuffer(verifier)) return Result<Message>::failure("flatbuffers verification failed");
    const fb::Envelope* e = fb::GetEnvelope(buf);
    if (e->body_type() == fb::Body_NONE || e->body_type() > fb::Body_MAX || !e->body())
      return Result<Message>::failure("unknown or missing message body");
    const size_t want = declared_tensors(e);
    if (want > limits.max_tensors) return Result<Message>::failure("too many tensors");
    if (frames.size() != want + 1)
      return Result<Message>::failure("frame count " + std::to_string(frames.size()) + ", envelope declares " +
                                      std::to_string(want + 1));
    std::optional<Message> m = body(e);
    if (!m) return Result<Message>::failure(why.empty() ? "invalid message" : why);
    return std::move(*m);
  }

  std::optional<Message> body(const fb::Envelope* e) {
    switch (e->body_type()) {
      case fb::Body_Hello: {
        auto h = e->body_as_Hello();
        if (!string_ok(h->capabilities(), "hello.capabilities")) return std::nullopt;
        if (h->profile() && h->profile()->size() > limits.max_string_bytes) {
          fail("hello.profile: longer than the limit");
          return std::nullopt;
        }
        Hello m{h->device(), h->protocol_version(), str(h->capabilities()), h->capability_flags(), h->data_size(), {}};
        if (h->profile()) m.profile.assign(reinterpret_cast<const char*>(h->profile()->data()), h->profile()->size());
        return m;
      }
      case fb::Body_Plan: {
        auto p = e->body_as_Plan();
        if (!string_ok(p->mode(), "plan.mode") || !string_ok(p->config(), "plan.config")) return std::nullopt;
        Plan m;
        m.round = p->round();
        m.epoch = p->epoch();
        m.mode = str(p->mode());
        m.split_point = p->split_point();
        m.micro_batches = p->micro_batches();
        m.batch_size = p->batch_size();
        m.learning_rate = p->learning_rate();
        m.seed = p->seed();
        m.finished = p->finished();
        m.config = str(p->config());
        if (auto d = p->devices()) {
          if (d->size() > limits.max_list_entries) {
            fail("plan.devices: more entries than the limit");
            return std::nullopt;
          }
          for (const auto* x : *d)
            m.devices.push_back({x->device(), x->samples(), x->batches(), x->uplink_mbps(), x->downlink_mbps()});
        }
        return m;
      }
      case fb::Body_Activation: {
        auto a = e->body_as_Activation();
        Activation m;
        m.round = a->round();
        m.batch = a->batch();
        m.micro_batch = a->micro_batch();
        m.device = a->device();
        m.samples = a->samples();
        if (!tensor(a->data(), "activation.data", m.data)) return std::nullopt;
        if (a->labels() && !tensor(a->labels(), "activation.labels", m.labels)) return std::nullopt;
        return m;
      }
      case fb::Body_Gradient: {
        auto g = e->body_as_Gradient();
        Gradient m;
        m.round = g->round();
        m.batch = g->batch();
        m.micro_batch = g->micro_batch();
        m.device = g->device();
        m.samples = g->samples();
        if (!tensor(g->data(), "gradient.data", m.data)) return std::nullopt;
        return m;
      }
      case fb::Body_Weights: {
        auto w = e->body_as_Weights();
        if (w->part() < fb::WeightsPart_MIN || w->part() > fb::WeightsPart_MAX) {
          fail("weights.part: unknown value");
          return std::nullopt;
        }
        Weights m;
        m.round = w->round();
        m.device = w->device();
        m.part = static_cast<WeightsPart>(w->part());
        m.samples = w->samples();
        if (auto ts = w->tensors()) {
          m.tensors.reserve(ts->size());  // size already checked against the frame count
          for (const auto* t : *ts) {
            NamedTensor nt;
            if (!tensor(t, "weights.tensors", nt.tensor)) return std::nullopt;
            nt.name = str(t->name());
            m.tensors.push_back(std::move(nt));
          }
        }
        return m;
      }
      case fb::Body_RoundEnd: {
        auto r = e->body_as_RoundEnd();
        RoundEnd m;
        m.round = r->round();
        m.device = r->device();
        m.samples = r->samples();
        m.loss_sum = r->loss_sum();
        m.correct = r->correct();
        if (!string_ok(r->details(), "round_end.details")) return std::nullopt;
        m.details = str(r->details());
        if (auto s = r->stats()) {
          if (s->size() > limits.max_list_entries) {
            fail("round_end.stats: more entries than the limit");
            return std::nullopt;
          }
          for (const auto* x : *s) {
            if (!string_ok(x->name(), "round_end.stats")) return std::nullopt;
            m.stats[str(x->name())] = x->value();
          }
        }
        return m;
      }
      case fb::Body_ErrorReply: {
        auto r = e->body_as_ErrorReply();
        if (r->code() < fb::ErrorCode_MIN || r->code() > fb::ErrorCode_MAX) {
          fail("error.code: unknown value");
          return std::nullopt;
        }
        if (!string_ok(r->text(), "error.text")) return std::nullopt;
        return ErrorReply{static_cast<ErrorCode>(r->code()), str(r->text())};
      }
      case fb::Body_Heartbeat: {
        auto h = e->body_as_Heartbeat();
        return Heartbeat{h->device(), h->time_ns()};
      }
      case fb::Body_Probe: {
        auto r = e->body_as_Probe();
        Probe m;
        m.device = r->device();
        m.seq = r->seq();
        m.reply_bytes = r->reply_bytes();
        if (m.reply_bytes < 0 || static_cast<uint64_t>(m.reply_bytes) > limits.max_tensor_bytes) {
          fail("probe.reply_bytes: negative or above the limit");
          return std::nullopt;
        }
        if (r->payload() && !tensor(r->payload(), "probe.payload", m.payload)) return std::nullopt;
        return m;
      }
      default:
        fail("unknown message body");
        return std::nullopt;
    }
  }
};

}  // namespace

// --- public

const char* message_type_name(MessageType t) {
  switch (t) {
    case MessageType::kHello: return "hello";
    case MessageType::kPlan: return "plan";
    case MessageType::kActivation: return "activation";
    case MessageType::kGradient: return "gradient";
    case MessageType::kWeights: return "weights";
    case MessageType::kRoundEnd: return "round_end";
    case MessageType::kErrorReply: return "error";
    case MessageType::kHeartbeat: return "heartbeat";
    case MessageType::kProbe: return "probe";
  }
  return "?";
}

std::optional<uint32_t> message_device(const Message& m) {
  return std::visit(
      [](const auto& x) -> std::optional<uint32_t> {
        if constexpr (requires { x.device; }) {
          if constexpr (std::is_same_v<std::decay_t<decltype(x.device)>, uint32_t>) return x.device;
        }
        return std::nullopt;
      },
      m);
}

Frames encode(const Message& m) { return encode(m, Sequence{}); }

Frames encode(const Message& m, Sequence sequence) {
  flatbuffers::FlatBufferBuilder b(256);
  std::vector<const Tensor*> payloads;
  auto [type, body] = std::visit(Encoder{b, payloads}, m);
  b.Finish(fb::CreateEnvelope(b, type, body, sequence.session, sequence.seq), kFileIdentifier);
  Frames frames;
  frames.reserve(1 + payloads.size());
  frames.emplace_back(b.GetBufferPointer(), b.GetSize());
  for (const Tensor* t : payloads) frames.push_back(tensor_frame(*t));
  return frames;
}

std::optional<Sequence> peek_sequence(const zmq::message_t& envelope, const Limits& limits) {
  const size_t size = envelope.size();
  if (size < 8 || size > limits.max_envelope_bytes || size >= FLATBUFFERS_MAX_BUFFER_SIZE) return std::nullopt;
  const uint8_t* buf = static_cast<const uint8_t*>(envelope.data());
  std::vector<uint64_t> aligned;  // see Decoder::run: the Verifier wants an aligned buffer
  if (reinterpret_cast<uintptr_t>(buf) % alignof(uint64_t) != 0) {
    try {
      aligned.resize((size + 7) / 8);
    } catch (const std::bad_alloc&) {
      return std::nullopt;
    }
    std::memcpy(aligned.data(), buf, size);
    buf = reinterpret_cast<const uint8_t*>(aligned.data());
  }
  if (!flatbuffers::BufferHasIdentifier(buf, kFileIdentifier)) return std::nullopt;
  flatbuffers::Verifier verifier(buf, size, limits.max_depth, limits.max_tables);
  if (!fb::VerifyEnvelopeBuffer(verifier)) return std::nullopt;
  const fb::Envelope* e = fb::GetEnvelope(buf);
  return Sequence{e->session(), e->seq()};
}

size_t frames_bytes(const Frames& frames) {
  size_t n = 0;
  for (const auto& f : frames) n += f.size();
  return n;
}

Result<Message> decode(const Frames& frames, const Limits& limits) {
  try {
    return Decoder{frames, limits, 1, {}}.run();
  } catch (const std::exception& e) {  // allocation failure: sizes are bounded, but memory may not be
    return Result<Message>::failure(std::string("decode failed: ") + e.what());
  }
}

}  // namespace pipar::transport
