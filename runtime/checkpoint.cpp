// Checkpoint writing and reading (format in checkpoint.h).
#include "runtime/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

namespace pipar {
namespace {

constexpr char kMagic[8] = {'P', 'I', 'P', 'A', 'R', 'C', 'K', 'P'};
constexpr uint64_t kMaxMeta = 1 << 20;
// Limits on the metadata, checked before it is used to build a model: nesting depth of the JSON (the
// free-form "extra" object is copied and dumped recursively), the per-sample input shape, the class
// count and the width multiplier (each scales the model's tensors).
constexpr int kMaxMetaDepth = 64;
constexpr int64_t kMaxInputSide = int64_t{1} << 16;    // each of c, h, w
constexpr int64_t kMaxInputValues = int64_t{1} << 24;  // c * h * w
constexpr int64_t kMaxClasses = int64_t{1} << 20;
constexpr double kMaxWidth = 4.0;

struct Writer {
  std::string buf;
  template <class T>
  void put(T v) {
    buf.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void put_bytes(const void* p, size_t n) { buf.append(static_cast<const char*>(p), n); }
};

struct Reader {
  const std::string& buf;
  const std::string& path;
  size_t pos = 0;
  void need(size_t n) const {
    if (pos + n > buf.size())
      throw IoError(detail::concat("checkpoint ", path, " is truncated (needed ", n, " bytes at offset ", pos,
                                   ", file has ", buf.size(), ")"));
  }
  template <class T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, buf.data() + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string get_string(size_t n) {
    need(n);
    std::string s = buf.substr(pos, n);
    pos += n;
    return s;
  }
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw IoError("checkpoint " + path + " not found or unreadable");
  return std::string(std::istreambuf_iterator<char>(f), {});
}

nlohmann::json meta_to_json(const CheckpointMeta& m) {
  nlohmann::json j;
  j["model"] = m.model;
  j["input"] = {m.options.input.c, m.options.input.h, m.options.input.w};
  j["num_classes"] = m.options.num_classes;
  j["batch_norm"] = m.options.batch_norm;
  j["width"] = m.options.width;
  j["seed"] = m.options.seed;
  j["epoch"] = m.epoch;
  j["extra"] = nlohmann::json::parse(m.extra_json.empty() ? "{}" : m.extra_json);
  return j;
}

[[noreturn]] void bad_meta(const std::string& path, const std::string& why) {
  throw IoError("checkpoint " + path + ": bad metadata: " + why);
}

std::string shown(const nlohmann::json& v) {
  std::string s = v.dump();
  return s.size() > 40 ? s.substr(0, 40) + "..." : s;
}

// An integer metadata field in [lo, hi] (hi >= 0). A float, a string or an out-of-range value is an
// error; nlohmann's get<int>() would convert a float such as 1e300 with undefined behaviour.
int64_t int_field(const nlohmann::json& v, const char* field, int64_t lo, int64_t hi, const std::string& path) {
  bool ok = false;
  int64_t x = 0;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    ok = u <= static_cast<uint64_t>(hi);
    x = ok ? static_cast<int64_t>(u) : 0;
  } else if (v.is_number_integer()) {
    x = v.get<int64_t>();
    ok = x >= lo && x <= hi;
  }
  if (!ok) bad_meta(path, detail::concat(field, " must be an integer in [", lo, ", ", hi, "], not ", shown(v)));
  return x;
}

// Validates the header and checksum; returns the metadata and leaves the reader after it.
CheckpointMeta parse_header(Reader& r) {
  const std::string& path = r.path;
  if (r.buf.size() < sizeof(kMagic) + 12 || std::memcmp(r.buf.data(), kMagic, sizeof(kMagic)) != 0)
    throw IoError("checkpoint " + path + " is not a PiPar checkpoint (bad magic or too short)");
  uint32_t stored_crc;
  std::memcpy(&stored_crc, r.buf.data() + r.buf.size() - 4, 4);
  const uint32_t crc = static_cast<uint32_t>(
      crc32(0L, reinterpret_cast<const Bytef*>(r.buf.data()), static_cast<uInt>(r.buf.size() - 4)));
  if (crc != stored_crc) throw IoError("checkpoint " + path + " is corrupt: checksum mismatch (truncated or modified file)");
  r.pos = sizeof(kMagic);
  const uint32_t version = r.get<uint32_t>();
  if (version < 1 || version > kCheckpointVersion)
    throw IoError(detail::concat("checkpoint ", path, " has format version ", version, "; this build reads versions 1 to ",
                                 kCheckpointVersion, version > kCheckpointVersion ? " (written by a newer PiPar)" : ""));
  const uint32_t meta_len = r.get<uint32_t>();
  if (meta_len > kMaxMeta) throw IoError("checkpoint " + path + ": metadata too large");
  const std::string text = r.get_string(meta_len);
  try {
    const nlohmann::json j = nlohmann::json::parse(text, [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
      if (depth > kMaxMetaDepth) bad_meta(path, detail::concat("JSON nested deeper than ", kMaxMetaDepth, " levels"));
      return true;
    });
    if (!j.is_object()) bad_meta(path, "not a JSON object");
    CheckpointMeta m;
    m.model = j.at("model").get<std::string>();
    const nlohmann::json& input = j.at("input");
    if (!input.is_array() || input.size() != 3) bad_meta(path, "input must be [c, h, w], not " + shown(input));
    int64_t dims[3];
    const char* names[3] = {"input c", "input h", "input w"};
    for (size_t i = 0; i < 3; ++i) dims[i] = int_field(input[i], names[i], 1, kMaxInputSide, path);
    if (dims[0] * dims[1] * dims[2] > kMaxInputValues)
      bad_meta(path, detail::concat("input ", shown(input), " holds more than ", kMaxInputValues, " values per sample"));
    m.options.input = {1, dims[0], dims[1], dims[2]};
    m.options.num_classes = static_cast<int>(int_field(j.at("num_classes"), "num_classes", 1, kMaxClasses, path));
    m.options.batch_norm = j.at("batch_norm").get<bool>();
    const nlohmann::json& width = j.at("width");
    if (!width.is_number() || !(width.get<double>() > 0 && width.get<double>() <= kMaxWidth))
      bad_meta(path, detail::concat("width must be a number in (0, ", kMaxWidth, "], not ", shown(width)));
    m.options.width = width.get<float>();
    const nlohmann::json& seed = j.at("seed");
    if (!seed.is_number_unsigned()) bad_meta(path, "seed must be an unsigned integer, not " + shown(seed));
    m.options.seed = seed.get<uint64_t>();
    m.epoch = static_cast<int>(int_field(j.at("epoch"), "epoch", 0, std::numeric_limits<int>::max(), path));
    m.extra_json = j.value("extra", nlohmann::json::object()).dump();
    return m;
  } catch (const nlohmann::json::exception& e) {
    throw IoError("checkpoint " + path + ": bad metadata: " + e.what());
  }
}

}  // namespace

void save_checkpoint(const std::string& path, Model& model, const CheckpointMeta& meta,
                     const std::vector<CheckpointState>& state) {
  Writer w;
  w.put_bytes(kMagic, sizeof(kMagic));
  w.put<uint32_t>(kCheckpointVersion);
  const std::string mj = meta_to_json(meta).dump();
  w.put<uint32_t>(static_cast<uint32_t>(mj.size()));
  w.put_bytes(mj.data(), mj.size());

  struct Item {
    std::string name;
    uint8_t kind;
    const Tensor* t;
  };
  std::vector<Item> items;
  const auto params = model.params();
  const auto buffers = model.buffers();
  for (Param* p : params) {
    items.push_back({p->name, 0, &p->value});
    items.push_back({p->name, 1, &p->momentum});
  }
  for (const Buffer& b : buffers) items.push_back({b.name, 2, b.value});
  std::set<std::string> state_names;
  for (const CheckpointState& st : state) {
    if (st.name.size() > std::numeric_limits<uint16_t>::max() || !state_names.insert(st.name).second)
      throw Error("save_checkpoint: state name '" + st.name.substr(0, 64) + "' is too long or given twice");
    items.push_back({st.name, 3, &st.value});
  }
  // One allocation for the whole file: a buffer grown by doubling held up to three times its size at
  // once (a server with many replicas writes hundreds of MB of momentum).
  size_t size = w.buf.size() + 2 * sizeof(uint32_t);
  for (const Item& it : items) size += sizeof(uint16_t) + it.name.size() + 1 + 4 * sizeof(int64_t) + static_cast<size_t>(it.t->bytes());
  w.buf.reserve(size);
  w.put<uint32_t>(static_cast<uint32_t>(items.size()));
  for (const Item& it : items) {
    w.put<uint16_t>(static_cast<uint16_t>(it.name.size()));
    w.put_bytes(it.name.data(), it.name.size());
    w.put<uint8_t>(it.kind);
    const Shape4 s = it.t->shape();
    for (int64_t d : {s.n, s.c, s.h, s.w}) w.put<int64_t>(d);
    const std::vector<float> v = it.t->to_vector();
    w.put_bytes(v.data(), v.size() * sizeof(float));
  }
  w.put<uint32_t>(static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(w.buf.data()), static_cast<uInt>(w.buf.size()))));

  write_file_atomically(path, w.buf, "checkpoint");
}

void write_file_atomically(const std::string& path, const std::string& bytes, const std::string& what) {
  const std::filesystem::path target(path);
  if (target.has_parent_path()) std::filesystem::create_directories(target.parent_path());
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw IoError("cannot write " + what + " " + tmp + ": " + std::strerror(errno));
  size_t off = 0;
  while (off < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string err = std::strerror(errno);
      ::close(fd);
      throw IoError("cannot write " + what + " " + tmp + ": " + err);
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) throw IoError("cannot flush " + what + " " + tmp + ": " + std::strerror(errno));
  std::filesystem::rename(tmp, target);
}

CheckpointMeta read_checkpoint_meta(const std::string& path) {
  const std::string buf = read_file(path);
  Reader r{buf, path};
  return parse_header(r);
}

CheckpointMeta load_checkpoint(const std::string& path, Model& model, std::vector<CheckpointState>* state) {
  const std::string buf = read_file(path);
  Reader r{buf, path};
  CheckpointMeta meta = parse_header(r);
  if (meta.model != model.name())
    throw IoError("checkpoint " + path + " holds model " + meta.model + ", not " + model.name());

  std::map<std::pair<std::string, uint8_t>, Tensor*> targets;
  for (Param* p : model.params()) {
    targets[{p->name, 0}] = &p->value;
    targets[{p->name, 1}] = &p->momentum;
  }
  for (const Buffer& b : model.buffers()) targets[{b.name, 2}] = b.value;

  const uint32_t count = r.get<uint32_t>();
  // Each of the model's tensors exactly once (a repeated record would otherwise leave another tensor
  // silently unloaded); state records (kind 3) besides, each name once.
  std::set<std::pair<std::string, uint8_t>> loaded;
  std::set<std::string> state_names;
  std::vector<CheckpointState> states;
  for (uint32_t i = 0; i < count; ++i) {
    const uint16_t name_len = r.get<uint16_t>();
    const std::string name = r.get_string(name_len);
    const uint8_t kind = r.get<uint8_t>();
    Shape4 s;
    s.n = r.get<int64_t>(), s.c = r.get<int64_t>(), s.h = r.get<int64_t>(), s.w = r.get<int64_t>();
    if (kind == 3) {
      // Nothing to check the shape against but the bytes left (each dimension >= 1, the product
      // without overflow).
      const size_t end = r.buf.size() - 4;  // the CRC
      const int64_t room = static_cast<int64_t>(r.pos < end ? (end - r.pos) / sizeof(float) : 0);
      int64_t numel = 1;
      for (int64_t d : {s.n, s.c, s.h, s.w}) {
        if (d < 1 || d > room || numel > room / d)
          throw IoError("checkpoint " + path + ": state " + name + " has shape " + s.str() + ", more than the file holds");
        numel *= d;
      }
      if (!state_names.insert(name).second)
        throw IoError("checkpoint " + path + " holds state " + name + " twice; the file is corrupt");
      const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
      r.need(bytes);
      if (state) {
        Tensor host = Tensor::empty(s);
        std::memcpy(host.data(), buf.data() + r.pos, bytes);
        states.push_back({name, std::move(host)});
      }
      r.pos += bytes;
      continue;
    }
    auto it = targets.find({name, kind});
    if (it == targets.end())
      throw IoError("checkpoint " + path + " has tensor " + name + " that model " + model.name() + " lacks");
    if (!loaded.insert(it->first).second)
      throw IoError(detail::concat("checkpoint ", path, " holds tensor ", name, " (", kind == 0 ? "weight" : kind == 1 ? "momentum" : "buffer",
                                   ") twice; the file is corrupt"));
    Tensor* t = it->second;
    if (!(t->shape() == s))
      throw IoError("checkpoint " + path + ": tensor " + name + " has shape " + s.str() + " but the model expects " +
                    t->shape().str());
    const size_t bytes = static_cast<size_t>(s.numel()) * sizeof(float);
    r.need(bytes);
    Tensor host = Tensor::empty(s);
    std::memcpy(host.data(), buf.data() + r.pos, bytes);
    r.pos += bytes;
    *t = host.to(t->device());
  }
  if (loaded.size() != targets.size())
    throw IoError(detail::concat("checkpoint ", path, " holds ", loaded.size(), " of the ", targets.size(), " tensors of model ",
                                 model.name()));
  if (r.pos + 4 != buf.size()) throw IoError("checkpoint " + path + " has trailing bytes after its tensors");
  if (state) *state = std::move(states);
  return meta;
}

}  // namespace pipar
