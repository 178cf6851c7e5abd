// Writes the seed corpora of the fuzz targets: make_seeds <dir> fills <dir>/{decode,checkpoint,idx,
// cifar,payload,keys}/ with small valid inputs (every message type, checkpoints of seed_model() in
// format version 2 with state records and version 1, raw and gzip IDX files, an MNIST pair, CIFAR-10
// records, a device profile and trace events, key files and an allow-list). The output is deterministic and committed as tests/fuzz/corpus/;
// after a format change regenerate it with
//   cmake --build build-fuzz --target pipar_fuzz_seeds && rm -rf tests/fuzz/corpus &&
//   build-fuzz/tests/fuzz/pipar_fuzz_seeds tests/fuzz/corpus
#include <zlib.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "planner/profile.h"
#include "runtime/checkpoint.h"
#include "runtime/trace.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/seed_model.h"
#include "transport/codec.h"

namespace fs = std::filesystem;
using namespace pipar;
using namespace pipar::transport;

namespace {

fs::path out_dir;

void save(const std::string& sub, const std::string& name, const std::vector<uint8_t>& bytes) {
  fs::create_directories(out_dir / sub);
  std::ofstream f(out_dir / sub / name, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void message(const std::string& name, const Message& m, Sequence seq = {}) {
  std::vector<uint8_t> out;
  for (const auto& f : encode(m, seq)) fuzz::append_frame(out, f.data(), f.size());
  save("decode", name, out);
}

Tensor ramp(Shape4 s) {
  std::vector<float> v(static_cast<size_t>(s.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.25f * static_cast<float>(i);
  return Tensor::from_vector(v, s);
}
Tensor labels(int64_t n) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int32_t>(i % 10);
  return Tensor::from_vector(v, Shape4{n, 1, 1, 1});
}

void decode_seeds() {
  message("hello", Hello{3, kProtocolVersion, "cpu,avx2", 5, 600, "{\"gflops\":12}"});
  Plan p;
  p.round = 1;
  p.mode = "pipar";
  p.split_point = 2;
  p.micro_batches = 4;
  p.batch_size = 32;
  p.learning_rate = 0.01;
  p.seed = 9;
  p.devices = {{1, 100, 4, 10.0, 20.0}, {2, 50, 2, 5.0, 5.0}};
  p.config = "{\"epochs\":1}";
  message("plan", p);
  Activation a;
  a.round = 1, a.batch = 2, a.micro_batch = 1, a.device = 1, a.samples = 2;
  a.data = ramp({2, 2, 2, 2});
  a.labels = labels(2);
  message("activation_labels", a, Sequence{1000, 7});
  a.labels = Tensor();
  message("activation", a);
  Gradient g;
  g.round = 1, g.device = 1, g.samples = 2;
  g.data = ramp({2, 3, 1, 1});
  message("gradient", g);
  Weights w;
  w.round = 2, w.device = 1, w.part = WeightsPart::kServer, w.samples = 100;
  w.tensors = {{"conv.weight", ramp({2, 1, 3, 3})}, {"conv.bias", ramp({1, 2, 1, 1})}, {"empty", Tensor::empty({0, 4, 1, 1})}};
  message("weights", w);
  message("weights_none", Weights{});
  RoundEnd r;
  r.round = 3, r.device = 2, r.samples = 100, r.loss_sum = 12.5, r.correct = 80;
  r.stats = {{"busy_s", 1.5}, {"idle_s", 0.25}};
  r.details = "[{\"ev\":1}]";
  message("round_end", r);
  message("error", ErrorReply{ErrorCode::kVersion, "protocol 2 not supported"});
  message("heartbeat", Heartbeat{4, 123456789}, Sequence{1000, 8});
  message("probe", Probe{2, 5, 256, ramp({16, 1, 1, 1})}, Sequence{1000, 9});
}

void checkpoint_seed() {
  auto m = fuzz::seed_model();
  CheckpointMeta meta;
  meta.model = m->name();
  meta.options = m->options();
  meta.epoch = 2;
  meta.extra_json = R"({"lr": 0.01, "mode": "sl"})";
  const fs::path tmp = out_dir / "seed.ckpt";
  auto bytes = [&] {
    std::ifstream f(tmp, std::ios::binary);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
  };
  // Version 2 with state records (a server's replica momentum), as distributed servers write them.
  save_checkpoint(tmp.string(), *m, meta,
                  {{"replica0/fc.weight/momentum", Tensor::from_vector(std::vector<float>{0.5f, -1.0f, 2.0f, 0.25f}, {2, 2, 1, 1})},
                   {"replica1/fc.bias/momentum", Tensor::from_vector(std::vector<float>{3.0f}, {1, 1, 1, 1})}});
  save("checkpoint", "vgg5_tiny", bytes());
  // Version 1 (no state records): version 2 without them, labelled 1, with its CRC-32 redone.
  save_checkpoint(tmp.string(), *m, meta);
  std::vector<uint8_t> v1 = bytes();
  const uint32_t one = 1;
  std::memcpy(v1.data() + 8, &one, 4);
  const uint32_t crc = static_cast<uint32_t>(crc32(0L, v1.data(), static_cast<uInt>(v1.size() - 4)));
  std::memcpy(v1.data() + v1.size() - 4, &crc, 4);
  save("checkpoint", "vgg5_tiny_v1", v1);
  fs::remove(tmp);
}

std::vector<uint8_t> idx(const std::vector<uint32_t>& dims) {
  std::vector<uint8_t> out = {0, 0, 8, static_cast<uint8_t>(dims.size())};
  size_t n = 1;
  for (uint32_t d : dims) {
    out.insert(out.end(), {static_cast<uint8_t>(d >> 24), static_cast<uint8_t>(d >> 16), static_cast<uint8_t>(d >> 8),
                           static_cast<uint8_t>(d)});
    n *= d;
  }
  for (size_t i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>(i % 10));
  return out;
}
std::vector<uint8_t> gzip(const std::vector<uint8_t>& raw) {
  const fs::path tmp = out_dir / "seed.gz";
  gzFile gz = gzopen(tmp.c_str(), "wb9");
  gzwrite(gz, raw.data(), static_cast<unsigned>(raw.size()));
  gzclose(gz);
  std::ifstream f(tmp, std::ios::binary);
  std::vector<uint8_t> out(std::istreambuf_iterator<char>(f), {});
  fs::remove(tmp);
  return out;
}
std::vector<uint8_t> with_mode(uint8_t mode, std::vector<uint8_t> body) {
  body.insert(body.begin(), mode);
  return body;
}

void idx_seeds() {  // mode byte: bit 0 = MNIST pair, bits 1-2 = rank - 1, bit 3 = gzip it (idx_fuzz.cpp)
  save("idx", "rank1_raw", with_mode(0 << 1, idx({5})));
  save("idx", "rank2_raw", with_mode(1 << 1, idx({3, 4})));
  save("idx", "rank3_raw", with_mode(2 << 1, idx({2, 3, 3})));
  save("idx", "rank4_raw", with_mode(3 << 1, idx({1, 2, 2, 2})));
  save("idx", "rank3_gzip", with_mode(2 << 1, gzip(idx({2, 28, 28}))));
  save("idx", "rank1_gzip", with_mode(0 << 1, gzip(idx({7}))));
  save("idx", "rank3_gzip_by_target", with_mode(8 | 2 << 1, idx({2, 4, 4})));
  const std::vector<uint8_t> images = idx({1, 28, 28}), lbls = idx({1});
  std::vector<uint8_t> pair;
  fuzz::append_frame(pair, images.data(), images.size());
  pair.insert(pair.end(), lbls.begin(), lbls.end());
  save("idx", "mnist_pair", with_mode(1, pair));
  const std::vector<uint8_t> gz_images = gzip(idx({2, 28, 28})), gz_lbls = gzip(idx({2}));
  pair.clear();
  fuzz::append_frame(pair, gz_images.data(), gz_images.size());
  pair.insert(pair.end(), gz_lbls.begin(), gz_lbls.end());
  save("idx", "mnist_pair_gzip", with_mode(1, pair));
  pair.clear();
  fuzz::append_frame(pair, images.data(), images.size());
  pair.insert(pair.end(), lbls.begin(), lbls.end());
  save("idx", "mnist_pair_gzip_by_target", with_mode(8 | 1, pair));
}

void cifar_seeds() {
  for (int records : {1, 2}) {
    std::vector<uint8_t> out;
    for (int r = 0; r < records; ++r) {
      out.push_back(static_cast<uint8_t>(r * 7 % 10));
      for (int i = 0; i < 3072; ++i) out.push_back(static_cast<uint8_t>((i * 31 + r) & 0xff));
    }
    save("cifar", "records_" + std::to_string(records), out);
  }
}

std::vector<uint8_t> with_mode(uint8_t mode, const std::string& text) {
  return with_mode(mode, std::vector<uint8_t>(text.begin(), text.end()));
}

void payload_seeds() {  // mode byte: even = profile, odd = trace events (payload_fuzz.cpp)
  auto m = fuzz::seed_model();
  planner::Profile p = planner::estimate_profile(*m, 1e9, 1e-4, {1, 4, 16});
  p.isa = "avx2";
  p.seconds = 0.5;
  save("payload", "profile", with_mode(0, p.to_json()));
  save("payload", "trace_events",
       with_mode(1, events_to_json({{"device 0", "b0 m0", 0.5, 0.75}, {"device 0 uplink", "activation", 0.75, 1.0},
                                    {"device 0", "b0 m1", 1.0, 1.25}})));
}

// A fixed key pair (written once by `pipar keygen`, a throwaway: it guards nothing) so that the seeds
// stay deterministic. Mode byte: 0 secret key file, 4 the same left readable by others, 1 public key
// file, 2 allow-list, 3 a key as a string (keys_fuzz.cpp).
void keys_seeds() {
  const std::string pub = "HEC(vt%PsIyr8ryPLJIFlUX#vuo0$VIa(.hKdJ9+", sec = "c1gU(g{0(S6/U+}V#E/JpUg<V=F#kaRC0)lLv*#6";
  const std::string secret_file = "# pipar CURVE secret key (ZeroMQ Z85).\npublic-key = " + pub + "\nsecret-key = " + sec + "\n";
  save("keys", "secret_key", with_mode(0, secret_file));
  save("keys", "secret_key_open", with_mode(4, secret_file));
  save("keys", "public_key", with_mode(1, "# pipar CURVE public key (ZeroMQ Z85).\npublic-key = " + pub + "\n"));
  save("keys", "allow_list", with_mode(2, "# devices\n" + pub + " 0 # device zero\n\n"));
  save("keys", "key_string", with_mode(3, pub));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  out_dir = argv[1];
  decode_seeds();
  checkpoint_seed();
  idx_seeds();
  cifar_seeds();
  payload_seeds();
  keys_seeds();
  return 0;
}
