// Checkpoints: exact round trip of weights, momentum and buffers; every damaged file is a clear
// IoError naming the file, never a crash.
#include <gtest/gtest.h>
#include <unistd.h>

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
  std::string write_model(const std::string& name, Model& m, int epoch) {
    CheckpointMeta meta;
    meta.model = m.name();
    meta.options = m.options();
    meta.epoch = epoch;
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
  CheckpointMeta meta;
  meta.model = r->name();
  meta.options = r->options();
  save_checkpoint(path("other.ckpt"), *r, meta);
  expect_io_error(path("other.ckpt"), "holds model resnet18");
}

}  // namespace
}  // namespace pipar
