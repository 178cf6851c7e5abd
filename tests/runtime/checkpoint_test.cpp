// Checkpoints: exact round trip of weights, momentum and buffers; every damaged file is a clear
// IoError naming the file, never a crash.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "runtime/checkpoint.h"
#include "tests/random.h"

namespace pipar {
namespace {

namespace fs = std::filesystem;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("pipar_ckpt_test_" + std::to_string(getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  std::unique_ptr<Model> trained_model(uint64_t seed) {
    ModelOptions o;
    o.seed = seed;
    auto m = build_model("vgg5", o);
    test::Rng rng(seed);
    for (Param* p : m->params()) {
      p->value = Tensor::from_vector(rng.uniform_vec(p->value.numel()), p->value.shape());
      p->momentum = Tensor::from_vector(rng.uniform_vec(p->value.numel()), p->value.shape());
    }
    for (const Buffer& b : m->buffers()) *b.value = Tensor::from_vector(rng.uniform_vec(b.value->numel(), 0.5f, 2.0f), b.value->shape());
    return m;
  }
  // The meta a checkpoint of m names: its zoo name and options, and the epoch.
  static CheckpointMeta meta_of(const Model& m, int epoch = 0) {
    CheckpointMeta meta;
    meta.model = m.name();
    meta.options = m.options();
    meta.epoch = epoch;
    return meta;
  }
  std::string write_model(const std::string& name, Model& m, int epoch) {
    CheckpointMeta meta = meta_of(m, epoch);
    meta.extra_json = R"({"lr": 0.01})";
    save_checkpoint(path(name), m, meta);
    return path(name);
  }
  static std::string read(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  }
  static void write(const std::string& p, const std::string& bytes) {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f << bytes;
  }
  void expect_io_error(const std::string& file, const std::string& what) {
    auto m = build_model("vgg5", ModelOptions{});
    try {
      load_checkpoint(file, *m);
      FAIL() << "no error for " << what;
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  }
  fs::path dir_;
};

// --- hostile files with a valid checksum (found by tests/fuzz/checkpoint_fuzz)

uint32_t load_u32(const std::string& b, size_t at) {
  uint32_t v;
  std::memcpy(&v, b.data() + at, 4);
  return v;
}
// Recomputes the trailing CRC-32, as a forger would.
std::string with_crc(std::string b) {
  const uint32_t crc = static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(b.data()), static_cast<uInt>(b.size() - 4)));
  std::memcpy(b.data() + b.size() - 4, &crc, 4);
  return b;
}
// The file with its metadata JSON replaced.
std::string with_meta(const std::string& good, const std::string& meta) {
  const uint32_t len = load_u32(good, 12), new_len = static_cast<uint32_t>(meta.size());
  std::string b = good.substr(0, 12);
  b.append(reinterpret_cast<const char*>(&new_len), 4);
  b += meta;
  b += good.substr(16 + len);
  return with_crc(b);
}

TEST_F(CheckpointTest, RoundTripIsExact) {
  SCOPED_TRACE(test::seed_trace());
  auto a = trained_model(7);
  const std::string p = write_model("a.ckpt", *a, 3);
  EXPECT_FALSE(fs::exists(p + ".tmp"));
  auto b = build_model("vgg5", ModelOptions{});
  const CheckpointMeta meta = load_checkpoint(p, *b);
  EXPECT_EQ(meta.epoch, 3);
  EXPECT_EQ(meta.model, "vgg5");
  EXPECT_NE(meta.extra_json.find("0.01"), std::string::npos);
  auto pa = a->params(), pb = b->params();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i]->value.to_vector(), pb[i]->value.to_vector()) << pa[i]->name;
    EXPECT_EQ(pa[i]->momentum.to_vector(), pb[i]->momentum.to_vector()) << pa[i]->name;
  }
  auto ba = a->buffers(), bb = b->buffers();
  ASSERT_EQ(ba.size(), bb.size());
  for (size_t i = 0; i < ba.size(); ++i) EXPECT_EQ(ba[i].value->to_vector(), bb[i].value->to_vector()) << ba[i].name;
}

TEST_F(CheckpointTest, DamagedFilesGiveClearErrors) {
  auto a = trained_model(8);
  const std::string good = read(write_model("good.ckpt", *a, 1));

  expect_io_error(path("missing.ckpt"), "not found");

  write(path("trunc.ckpt"), good.substr(0, good.size() / 2));
  expect_io_error(path("trunc.ckpt"), "checksum");

  std::string flipped = good;
  flipped[flipped.size() / 3] ^= 0x5a;
  write(path("flip.ckpt"), flipped);
  expect_io_error(path("flip.ckpt"), "checksum");

  write(path("magic.ckpt"), "NOTPIPAR and more bytes here");
  expect_io_error(path("magic.ckpt"), "not a PiPar checkpoint");

  write(path("tiny.ckpt"), "PI");
  expect_io_error(path("tiny.ckpt"), "not a PiPar checkpoint");

  // A valid file of another model.
  auto r = build_model("resnet18", ModelOptions{});
  const CheckpointMeta meta = meta_of(*r);
  save_checkpoint(path("other.ckpt"), *r, meta);
  expect_io_error(path("other.ckpt"), "holds model resnet18");
}

TEST_F(CheckpointTest, MetadataIsCheckedBeforeUse) {
  auto a = trained_model(9);
  const std::string good = read(write_model("good.ckpt", *a, 2));
  const std::string meta = good.substr(16, load_u32(good, 12));
  auto replaced = [&](const std::string& from, const std::string& to) {
    const size_t at = meta.find(from);
    EXPECT_NE(at, std::string::npos) << from << " not in " << meta;
    return std::string(meta).replace(at, from.size(), to);
  };
  ASSERT_EQ(read_checkpoint_meta(path("good.ckpt")).epoch, 2);
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::vector<std::pair<std::string, std::string>> cases = {
      // Floats where integers belong: converting them was undefined behaviour (UBSan).
      {replaced("\"num_classes\":10", "\"num_classes\":1e300"), "num_classes"},
      {replaced("\"epoch\":2", "\"epoch\":-1e300"), "epoch"},
      {replaced("\"epoch\":2", "\"epoch\":-1"), "epoch"},
      {replaced("\"seed\":9", "\"seed\":-5.5e300"), "seed"},
      {replaced("\"input\":[1,28,28]", "\"input\":[1e300,28,28]"), "input c"},
      // Sizes that would build an unbounded model.
      {replaced("\"input\":[1,28,28]", "\"input\":[1,100000,28]"), "input h"},
      {replaced("\"input\":[1,28,28]", "\"input\":[64,4096,4096]"), "values per sample"},
      {replaced("\"input\":[1,28,28]", "\"input\":[1,28]"), "input must be"},
      {replaced("\"num_classes\":10", "\"num_classes\":4294967296"), "num_classes"},
      {replaced("\"width\":1.0", "\"width\":1e30"), "width"},
      {replaced("\"width\":1.0", "\"width\":0"), "width"},
      // Deep nesting overflowed the stack when the metadata was copied.
      {replaced("\"extra\":{\"lr\":0.01}", "\"extra\":" + deep), "nested deeper"},
      {"[1, 2]", "not a JSON object"},
  };
  auto m = build_model("vgg5", ModelOptions{});
  for (const auto& [bad_meta, what] : cases) {
    write(path("bad.ckpt"), with_meta(good, bad_meta));
    for (int load = 0; load < 2; ++load) {
      try {
        if (load) load_checkpoint(path("bad.ckpt"), *m);
        else read_checkpoint_meta(path("bad.ckpt"));
        ADD_FAILURE() << "no error for " << bad_meta.substr(0, 200);
      } catch (const IoError& e) {
        EXPECT_NE(std::string(e.what()).find(path("bad.ckpt")), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("bad metadata"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      }
    }
  }
}

TEST_F(CheckpointTest, RepeatedTensorIsAnError) {
  // The second record (the first parameter's momentum) relabelled as its weight: the tensor count
  // still matches the model, and the momentum used to be left silently unloaded.
  auto a = trained_model(10);
  std::string b = read(write_model("good.ckpt", *a, 1));
  const size_t first = 16 + load_u32(b, 12) + 4;
  uint16_t name_len;
  std::memcpy(&name_len, b.data() + first, 2);
  const Param* p0 = a->params().at(0);
  ASSERT_EQ(b.substr(first + 2, name_len), p0->name);
  const size_t second = first + 2 + name_len + 1 + 32 + static_cast<size_t>(p0->value.numel()) * 4;
  ASSERT_EQ(b.substr(second + 2, name_len), p0->name);
  ASSERT_EQ(b[second + 2 + name_len], 1);  // momentum
  b[second + 2 + name_len] = 0;
  write(path("twice.ckpt"), with_crc(b));
  expect_io_error(path("twice.ckpt"), "twice");
}

// Version 2: state records (kind 3) beside the model's tensors round-trip exactly, in order; a reader
// that does not ask for them skips them; version-1 files (no state records) still load.
TEST_F(CheckpointTest, StateRecordsRoundTripAndVersionOneStillLoads) {
  auto a = trained_model(11);
  const CheckpointMeta meta = meta_of(*a, 4);
  const std::vector<CheckpointState> state = {
      {"replica1/fc.weight/momentum", Tensor::from_vector(std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, 5.0f, 6.0f}, {2, 3, 1, 1})},
      {"replica0/conv.bias/momentum", Tensor::from_vector(std::vector<float>{7.0f}, {1, 1, 1, 1})}};
  save_checkpoint(path("state.ckpt"), *a, meta, state);
  const std::string bytes = read(path("state.ckpt"));
  EXPECT_EQ(load_u32(bytes, 8), kCheckpointVersion);

  auto b = build_model("vgg5", ModelOptions{});
  std::vector<CheckpointState> got;
  EXPECT_EQ(load_checkpoint(path("state.ckpt"), *b, &got).epoch, 4);
  ASSERT_EQ(got.size(), state.size());
  for (size_t i = 0; i < state.size(); ++i) {
    EXPECT_EQ(got[i].name, state[i].name);
    EXPECT_EQ(got[i].value.shape(), state[i].value.shape());
    EXPECT_EQ(got[i].value.to_vector(), state[i].value.to_vector());
  }
  for (size_t i = 0; i < a->params().size(); ++i)
    EXPECT_EQ(a->params()[i]->momentum.to_vector(), b->params()[i]->momentum.to_vector());
  auto c = build_model("vgg5", ModelOptions{});
  load_checkpoint(path("state.ckpt"), *c);  // state not asked for: skipped
  EXPECT_EQ(a->params()[0]->value.to_vector(), c->params()[0]->value.to_vector());

  // Version 1 is version 2 without state records: such a file, labelled 1, loads as before.
  save_checkpoint(path("v1.ckpt"), *a, meta);
  std::string v1 = read(path("v1.ckpt"));
  const uint32_t one = 1;
  std::memcpy(v1.data() + 8, &one, 4);
  write(path("v1.ckpt"), with_crc(v1));
  auto d = build_model("vgg5", ModelOptions{});
  EXPECT_EQ(load_checkpoint(path("v1.ckpt"), *d, &got).epoch, 4);
  EXPECT_TRUE(got.empty());
  EXPECT_EQ(a->params()[1]->momentum.to_vector(), d->params()[1]->momentum.to_vector());

  // A newer version is refused, saying so.
  std::string v3 = bytes;
  const uint32_t three = 3;
  std::memcpy(v3.data() + 8, &three, 4);
  write(path("v3.ckpt"), with_crc(v3));
  expect_io_error(path("v3.ckpt"), "format version 3");
  expect_io_error(path("v3.ckpt"), "newer");
}

// Hostile state records: a shape larger than the file (or overflowing int64) and a repeated name are
// IoErrors, never a huge allocation.
TEST_F(CheckpointTest, HostileStateRecordsAreRejected) {
  auto a = trained_model(12);
  const CheckpointMeta meta = meta_of(*a);
  save_checkpoint(path("s.ckpt"), *a, meta, {{"s", Tensor::from_vector(std::vector<float>{1.0f, 2.0f}, {2, 1, 1, 1})}});
  const std::string good = read(path("s.ckpt"));
  // The state record is the last: u16 name_len, "s", u8 kind, 4 x i64 shape, 2 x f32, then the CRC.
  const size_t rec = good.size() - 4 - 8 - 32 - 1 - 1 - 2;
  ASSERT_EQ(good.substr(rec + 2, 1), "s");
  ASSERT_EQ(good[rec + 3], 3);
  auto with_shape = [&](std::vector<int64_t> dims) {
    std::string b = good;
    std::memcpy(b.data() + rec + 4, dims.data(), 32);
    return with_crc(b);
  };
  for (const auto& dims : std::vector<std::vector<int64_t>>{{3, 1, 1, 1},
                                                            {int64_t{1} << 40, 1, 1, 1},
                                                            {int64_t{1} << 33, int64_t{1} << 33, int64_t{1} << 33, 2},
                                                            {0, 1, 1, 1},
                                                            {-2, -1, 1, 1}}) {
    write(path("shape.ckpt"), with_shape(dims));
    expect_io_error(path("shape.ckpt"), "more than the file holds");
  }
  // The same record twice (count + 1, record appended again).
  std::string twice = good.substr(0, good.size() - 4) + good.substr(rec, good.size() - 4 - rec) + "CRC!";
  const size_t count_at = 16 + load_u32(good, 12);
  const uint32_t count = load_u32(good, count_at) + 1;
  std::memcpy(twice.data() + count_at, &count, 4);
  write(path("twice.ckpt"), with_crc(twice));
  expect_io_error(path("twice.ckpt"), "state s twice");
}

}  // namespace
}  // namespace pipar
