// Short training runs that must learn: synthetic data, and a few thousand Fashion-MNIST images where
// Debian's dataset-fashion-mnist is installed. Also the run outputs and resuming from a checkpoint.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/trainer.h"
#include "tests/scratch.h"

namespace pipar {
namespace {

namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  return test::scratch_dir("trainer", name);
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

TEST(Trainer, LearnsSyntheticDataAndWritesOutputs) {
  TrainConfig c;
  c.model = "vgg5";
  c.dataset = "synthetic";
  c.limit_train = 2000;
  c.limit_test = 500;
  c.epochs = 2;
  c.batch_size = 50;
  c.seed = 3;
  c.out_dir = temp_dir("synthetic");
  const TrainResult r = train_local(c);
  // The synthetic classes are prototypes plus noise: a VGG5 separates them almost perfectly.
  EXPECT_GE(r.test_accuracy, 0.90);
  ASSERT_EQ(r.epochs.size(), 2u);
  const auto s = read_json(c.out_dir + "/summary.json");
  for (const char* key : {"mode", "model", "dataset", "devices", "split", "micro_batches", "epochs", "batch_size",
                          "test_accuracy", "train_seconds"})
    EXPECT_TRUE(s.contains(key)) << key;
  EXPECT_EQ(s["mode"], "local");
  EXPECT_DOUBLE_EQ(s["test_accuracy"].get<double>(), r.test_accuracy);
  std::ifstream m(c.out_dir + "/metrics.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(m, line)) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["epoch"], ++lines);
  }
  EXPECT_EQ(lines, 2);
}

TEST(Trainer, SameSeedSameResult) {
  TrainConfig c;
  c.dataset = "synthetic";
  c.limit_train = 300;
  c.limit_test = 100;
  c.epochs = 1;
  c.batch_size = 30;
  c.out_dir = temp_dir("seed_a");
  const TrainResult a = train_local(c);
  c.out_dir = temp_dir("seed_b");
  const TrainResult b = train_local(c);
  EXPECT_EQ(a.epochs[0].train_loss, b.epochs[0].train_loss);
  EXPECT_EQ(a.epochs[0].test_loss, b.epochs[0].test_loss);
}

TEST(Trainer, ResumesFromCheckpoint) {
  TrainConfig c;
  c.dataset = "synthetic";
  c.limit_train = 300;
  c.limit_test = 100;
  c.batch_size = 30;
  c.epochs = 1;
  c.out_dir = temp_dir("resume");
  c.save_path = c.out_dir + "/model.ckpt";
  train_local(c);
  ASSERT_TRUE(fs::exists(c.save_path));
  c.load_path = c.save_path;
  c.epochs = 2;
  const TrainResult r = train_local(c);
  ASSERT_EQ(r.epochs.size(), 1u);  // only the second epoch ran
  EXPECT_EQ(r.epochs[0].epoch, 2);
  EXPECT_EQ(read_json(c.out_dir + "/summary.json")["epochs_completed"], 2);
}

// Cosine: lr at step 0, lr/2 halfway, 0 at the end, never above lr; constant: lr throughout (exact
// float comparisons where the formula is exact, 1e-7 relative elsewhere).
TEST(Trainer, LearningRateSchedules) {
  TrainConfig c;
  EXPECT_EQ(c.lr_schedule, "cosine");  // the default
  c.lr = 0.02f;
  c.lr_schedule = "constant";
  for (int64_t t : {0, 7, 99}) EXPECT_EQ(scheduled_lr(c, t, 100), 0.02f);
  c.lr_schedule = "cosine";
  EXPECT_EQ(scheduled_lr(c, 0, 100), 0.02f);
  EXPECT_NEAR(scheduled_lr(c, 50, 100), 0.01f, 1e-9);
  EXPECT_NEAR(scheduled_lr(c, 100, 100), 0.0f, 1e-9);
  float prev = 1;
  for (int64_t t = 0; t <= 100; ++t) {
    const float lr = scheduled_lr(c, t, 100);
    EXPECT_LE(lr, prev) << t;
    EXPECT_GE(lr, 0.0f) << t;
    prev = lr;
  }
  EXPECT_NEAR(scheduled_lr(c, 25, 100), 0.02 * 0.5 * (1 + std::cos(M_PI / 4)), 0.02 * 1e-7);
  c.lr_schedule = "step";
  try {
    scheduled_lr(c, 0, 1);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'step'"), std::string::npos) << e.what();
  }
}

TEST(Trainer, BadConfigurationsGiveClearErrors) {
  TrainConfig c;
  c.dataset = "synthetic";
  c.limit_train = 100;
  c.limit_test = 10;
  c.out_dir = temp_dir("bad");
  c.lr_schedule = "linear";
  EXPECT_THROW(train_local(c), Error);
  c.lr_schedule = "constant";
  c.model = "nosuchnet";
  EXPECT_THROW(train_local(c), Error);
  c.model = "vgg5";
  c.dataset = "imagenet";
  EXPECT_THROW(train_local(c), Error);
  c.dataset = "fmnist";
  c.data_dir = "/nonexistent/dir";
  try {
    train_local(c);
    FAIL();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/dir"), std::string::npos) << e.what();
  }
}

TEST(Trainer, LearnsFashionMnistSubset) {
  if (!fs::exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)";
  TrainConfig c;
  c.dataset = "fmnist";
  c.limit_train = 4000;
  c.limit_test = 1000;
  c.epochs = 2;
  c.out_dir = temp_dir("fmnist");
  const TrainResult r = train_local(c);
  // 4000 images, 2 epochs of VGG5 at lr 0.01: about 80%; 0.75 leaves room for seed noise.
  EXPECT_GE(r.test_accuracy, 0.75);
}

}  // namespace
}  // namespace pipar
