// Data layer tests: IDX / CIFAR-10 readers on files written here (raw, gzip, broken in every way the
// readers must reject), synthetic data, iid / Dirichlet partitions, batch gathering and augmentation,
// and the real Fashion-MNIST set where Debian's dataset-fashion-mnist is installed.
#include "runtime/data.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "kernels/error.h"
#include "tests/random.h"

namespace pipar::data {
namespace {

namespace fs = std::filesystem;

// --- Helpers

// A fresh directory per test, removed afterwards.
class DataFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    static int counter = 0;
    dir_ = fs::temp_directory_path() / ("pipar_data_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes, bool gzip) {
  if (gzip) {
    gzFile f = gzopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr) << path;
    if (!bytes.empty()) {
      ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
    }
    ASSERT_EQ(gzclose(f), Z_OK);
  } else {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(f.good()) << path;
  }
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// An IDX file: magic 0x0000 08 <rank>, big-endian dims, then `data` (which may disagree with dims on purpose).
std::vector<uint8_t> idx_bytes(uint32_t magic, const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out;
  auto be32 = [&](uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
  };
  be32(magic);
  for (uint32_t d : dims) be32(d);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<uint8_t> random_bytes(size_t n, uint64_t salt, int hi = 255) {
  test::Rng rng(salt);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng.integer(0, hi));
  return v;
}

// Runs fn, expects an exception of type E whose message holds every one of `parts`.
template <class E = IoError>
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << parts.front();
  } catch (const E& e) {
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "message: " << e.what() << "\nmissing: " << p;
  }
}

// Writes an MNIST-format pair (n images 28x28, labels) for `prefix` ("train"/"t10k").
void write_mnist_pair(const fs::path& dir, const std::string& prefix, const std::vector<uint8_t>& pixels,
                      const std::vector<uint8_t>& labels, bool gzip) {
  const std::string ext = gzip ? ".gz" : "";
  write_bytes((dir / (prefix + "-images-idx3-ubyte" + ext)).string(),
              idx_bytes(0x803, {static_cast<uint32_t>(pixels.size() / 784), 28, 28}, pixels), gzip);
  write_bytes((dir / (prefix + "-labels-idx1-ubyte" + ext)).string(),
              idx_bytes(0x801, {static_cast<uint32_t>(labels.size())}, labels), gzip);
}

// --- IDX

TEST_F(DataFiles, IdxRoundTripRawAndGzip) {
  SCOPED_TRACE(test::seed_trace());
  for (bool gzip : {false, true}) {
    const std::vector<uint8_t> data = random_bytes(3 * 5 * 7, 1);
    const std::string p = path(gzip ? "a.idx.gz" : "a.idx");
    write_bytes(p, idx_bytes(0x803, {3, 5, 7}, data), gzip);
    IdxArray a = read_idx(p, 3);
    EXPECT_EQ(a.dims, (std::vector<int64_t>{3, 5, 7}));
    EXPECT_EQ(a.data, data);
  }
  // Empty arrays are fine too.
  write_bytes(path("e.idx"), idx_bytes(0x801, {0}, {}), false);
  EXPECT_TRUE(read_idx(path("e.idx"), 1).data.empty());
}

TEST_F(DataFiles, MnistLikeLoadsAndNormalizes) {
  SCOPED_TRACE(test::seed_trace());
  for (bool gzip : {false, true}) {
    const std::vector<uint8_t> pixels = random_bytes(4 * 784, 2);
    const std::vector<uint8_t> labels = {3, 0, 9, 3};
    write_mnist_pair(dir_, "t10k", pixels, labels, gzip);
    Dataset ds = load_fashion_mnist(dir_.string(), false);
    EXPECT_EQ(ds.size(), 4);
    EXPECT_EQ(ds.num_classes, 10);
    EXPECT_EQ(ds.images.shape(), (Shape4{4, 1, 28, 28}));
    EXPECT_EQ(ds.sample_shape(), (Shape4{1, 1, 28, 28}));
    EXPECT_EQ(ds.labels, (std::vector<int32_t>{3, 0, 9, 3}));
    const float* x = ds.images.data();
    for (size_t i = 0; i < pixels.size(); ++i) {
      const float want = (pixels[i] / 255.0f - 0.2860f) / 0.3530f;
      ASSERT_NEAR(x[i], want, 1e-5f) << "pixel " << i;
    }
    fs::remove(dir_ / ("t10k-images-idx3-ubyte" + std::string(gzip ? ".gz" : "")));
    fs::remove(dir_ / ("t10k-labels-idx1-ubyte" + std::string(gzip ? ".gz" : "")));
  }
  // MNIST's own normalization.
  write_mnist_pair(dir_, "train", std::vector<uint8_t>(784, 255), {1}, true);
  Dataset m = load_mnist(dir_.string(), true);
  EXPECT_NEAR(m.images.data()[0], (1.0f - 0.1307f) / 0.3081f, 1e-5f);
}

TEST_F(DataFiles, IdxTruncatedRaw) {
  const std::string p = path("t.idx");
  write_bytes(p, idx_bytes(0x803, {5, 28, 28}, std::vector<uint8_t>(4 * 784)), false);
  expect_error([&] { read_idx(p, 3); }, {p, "truncated", "5x28x28"});
  // Too short for even the header.
  write_bytes(p, {0, 0, 8}, false);
  expect_error([&] { read_idx(p, 3); }, {p, "truncated"});
  write_bytes(p, {0, 0, 8, 3, 0, 0}, false);
  expect_error([&] { read_idx(p, 3); }, {p, "truncated"});
}

TEST_F(DataFiles, IdxTruncatedGzip) {
  const std::string p = path("t.idx.gz");
  write_bytes(p, idx_bytes(0x803, {50, 28, 28}, random_bytes(50 * 784, 3)), true);
  std::vector<uint8_t> full = read_bytes(p);
  ASSERT_GT(full.size(), 100u);
  // Cut in the middle of the deflate stream, and cut only the 8-byte trailer (CRC + length).
  for (size_t keep : {full.size() / 2, full.size() - 8, full.size() - 1}) {
    write_bytes(p, std::vector<uint8_t>(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(keep)), false);
    expect_error([&] { read_idx(p, 3); }, {p, "truncated"});
  }
  // Header says more items than the stream holds (stream itself intact).
  write_bytes(p, idx_bytes(0x803, {50, 28, 28}, random_bytes(49 * 784, 3)), true);
  expect_error([&] { read_idx(p, 3); }, {p, "truncated", "50x28x28"});
}

TEST_F(DataFiles, IdxCorruptGzip) {
  const std::string p = path("c.idx.gz");
  write_bytes(p, idx_bytes(0x803, {20, 28, 28}, random_bytes(20 * 784, 4)), true);
  std::vector<uint8_t> bytes = read_bytes(p);
  for (size_t i = bytes.size() / 3; i < bytes.size() / 3 + 16; ++i) bytes[i] ^= 0x5a;
  write_bytes(p, bytes, false);
  expect_error([&] { read_idx(p, 3); }, {p});
}

TEST_F(DataFiles, IdxBadMagicAndExtraData) {
  const std::string p = path("m.idx");
  write_bytes(p, idx_bytes(0x801, {2, 28, 28}, std::vector<uint8_t>(2 * 784)), false);  // labels magic on images
  expect_error([&] { read_idx(p, 3); }, {p, "bad magic", "0x00000801", "0x00000803"});
  write_bytes(p, idx_bytes(0x0d03, {2, 28, 28}, std::vector<uint8_t>(2 * 784)), true);  // float IDX type
  expect_error([&] { read_idx(p, 3); }, {p, "bad magic"});
  write_bytes(p, idx_bytes(0x801, {3}, {1, 2, 3, 4}), false);  // one byte too many
  expect_error([&] { read_idx(p, 1); }, {p, "more data"});
  write_bytes(p, idx_bytes(0x801, {3}, {1, 2, 3, 4}), true);
  expect_error([&] { read_idx(p, 1); }, {p, "more data"});
}

TEST_F(DataFiles, IdxHugeHeaderDoesNotAllocate) {
  // A 16-byte file claiming 4e9 * 4e9 * ... bytes must fail on the size check, not on a bad_alloc.
  const std::string p = path("h.idx");
  write_bytes(p, idx_bytes(0x803, {0xffffffffu, 0xffffffffu, 0xffffffffu}, {}), false);
  expect_error([&] { read_idx(p, 3); }, {p, "corrupt header"});
  // Under the 1 GiB cap but far beyond what a small gzip file can expand to.
  write_bytes(p, idx_bytes(0x803, {1000000, 28, 28}, {1, 2, 3}), true);
  expect_error([&] { read_idx(p, 3); }, {p, "gzip file can hold"});
  // Raw: under the cap but bigger than the file.
  write_bytes(p, idx_bytes(0x803, {1000000, 28, 28}, {1, 2, 3}), false);
  expect_error([&] { read_idx(p, 3); }, {p, "truncated"});
}

TEST_F(DataFiles, MnistLikeRejectsBadPairs) {
  // Wrong image dims.
  write_bytes(path("train-images-idx3-ubyte"), idx_bytes(0x803, {2, 27, 28}, std::vector<uint8_t>(2 * 27 * 28)), false);
  write_bytes(path("train-labels-idx1-ubyte"), idx_bytes(0x801, {2}, {1, 2}), false);
  expect_error([&] { load_fashion_mnist(dir_.string(), true); }, {path("train-images-idx3-ubyte"), "wrong dims", "28x28"});
  // Label count != image count.
  write_mnist_pair(dir_, "train", std::vector<uint8_t>(3 * 784), {1, 2}, false);
  expect_error([&] { load_fashion_mnist(dir_.string(), true); },
               {path("train-labels-idx1-ubyte"), "label count 2 != image count 3"});
  // Label out of range.
  write_mnist_pair(dir_, "train", std::vector<uint8_t>(3 * 784), {1, 10, 2}, false);
  expect_error([&] { load_fashion_mnist(dir_.string(), true); }, {path("train-labels-idx1-ubyte"), "label 10", "out of range"});
  // Missing file: names it and the fix.
  fs::remove(path("train-labels-idx1-ubyte"));
  expect_error([&] { load_fashion_mnist(dir_.string(), true); },
               {path("train-labels-idx1-ubyte"), "not found", "apt-get install dataset-fashion-mnist", "--data-dir"});
  expect_error([&] { load_fashion_mnist(path("nope"), false); }, {path("nope"), "not found", "no such directory"});
  expect_error([&] { load_mnist(path("nope"), false); }, {path("nope"), "not found", "--data-dir"});
}

// --- CIFAR-10

std::vector<uint8_t> cifar_records(int n, uint64_t salt, std::vector<int32_t>* labels) {
  std::vector<uint8_t> bytes = random_bytes(static_cast<size_t>(n) * 3073, salt);
  for (int r = 0; r < n; ++r) {
    bytes[r * 3073] = static_cast<uint8_t>(bytes[r * 3073] % 10);
    if (labels) labels->push_back(bytes[r * 3073]);
  }
  return bytes;
}

TEST_F(DataFiles, Cifar10Reads) {
  SCOPED_TRACE(test::seed_trace());
  std::vector<int32_t> labels;
  const std::vector<uint8_t> bytes = cifar_records(7, 5, &labels);
  write_bytes(path("test_batch.bin"), bytes, false);
  Dataset ds = load_cifar10(dir_.string(), false);
  EXPECT_EQ(ds.images.shape(), (Shape4{7, 3, 32, 32}));
  EXPECT_EQ(ds.labels, labels);
  const float mean[3] = {0.4914f, 0.4822f, 0.4465f}, stdv[3] = {0.2470f, 0.2435f, 0.2616f};
  const float* x = ds.images.data();
  for (int r = 0; r < 7; ++r)
    for (int i = 0; i < 3072; ++i) {
      const int ch = i / 1024;
      ASSERT_NEAR(x[r * 3072 + i], (bytes[r * 3073 + 1 + i] / 255.0f - mean[ch]) / stdv[ch], 1e-5f) << r << " " << i;
    }
  // Train: five files concatenated in order; the parent of cifar-10-batches-bin/ works too.
  fs::create_directories(dir_ / "cifar-10-batches-bin");
  std::vector<int32_t> train_labels;
  for (int b = 1; b <= 5; ++b)
    write_bytes((dir_ / "cifar-10-batches-bin" / ("data_batch_" + std::to_string(b) + ".bin")).string(),
                cifar_records(b, 10 + b, &train_labels), false);
  Dataset tr = load_cifar10(dir_.string(), true);
  EXPECT_EQ(tr.size(), 15);
  EXPECT_EQ(tr.labels, train_labels);
}

TEST_F(DataFiles, Cifar10Errors) {
  std::vector<uint8_t> bytes = cifar_records(3, 6, nullptr);
  bytes.pop_back();
  write_bytes(path("test_batch.bin"), bytes, false);
  expect_error([&] { load_cifar10(dir_.string(), false); }, {path("test_batch.bin"), "3073", "binary version", "--data-dir"});
  write_bytes(path("test_batch.bin"), {}, false);
  expect_error([&] { load_cifar10(dir_.string(), false); }, {path("test_batch.bin"), "3073"});
  bytes = cifar_records(3, 6, nullptr);
  bytes[3073] = 10;
  write_bytes(path("test_batch.bin"), bytes, false);
  expect_error([&] { load_cifar10(dir_.string(), false); }, {path("test_batch.bin"), "label 10", "record 1"});
  expect_error([&] { load_cifar10(dir_.string(), true); }, {path("data_batch_1.bin"), "not found", "--data-dir"});
}

// --- Synthetic

uint64_t fnv1a(const void* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 0x100000001b3ull;
  return h;
}

TEST(DataSynthetic, DeterministicBySeed) {
  const Shape4 shape{1, 3, 9, 11};
  Dataset a = make_synthetic(50, shape, 4, 7), b = make_synthetic(50, shape, 4, 7), c = make_synthetic(50, shape, 4, 8);
  ASSERT_EQ(a.images.shape(), (Shape4{50, 3, 9, 11}));
  EXPECT_EQ(std::memcmp(a.images.raw(), b.images.raw(), a.images.bytes()), 0);
  EXPECT_NE(std::memcmp(a.images.raw(), c.images.raw(), a.images.bytes()), 0);
  EXPECT_EQ(a.labels, b.labels);
  // A prefix is the same whatever n: load_dataset's limit keeps the first samples of the full set.
  Dataset p = make_synthetic(20, shape, 4, 7);
  EXPECT_EQ(std::memcmp(a.images.raw(), p.images.raw(), p.images.bytes()), 0);
  // Pinned bits: the generator uses integer arithmetic and one rounding per value, so this checksum
  // must hold on every platform; a change here changes every synthetic experiment.
  Dataset g = make_synthetic(10, Shape4{1, 1, 28, 28}, 10, 42);
  EXPECT_EQ(fnv1a(g.images.raw(), g.images.bytes()), 0xd4f0df74c674a573ull) << std::hex << fnv1a(g.images.raw(), g.images.bytes());
}

TEST(DataSynthetic, BalancedNormalizedAndLearnable) {
  const int classes = 10;
  Dataset tr = make_synthetic(2000, Shape4{1, 1, 28, 28}, classes, 3, 0);
  Dataset te = make_synthetic(500, Shape4{1, 1, 28, 28}, classes, 3, 1);
  std::vector<int> count(classes, 0);
  for (int32_t l : tr.labels) ++count[l];
  for (int k = 0; k < classes; ++k) EXPECT_EQ(count[k], 200) << "class " << k;
  double sum = 0, sq = 0;
  const auto v = tr.images.to_vector();
  for (float x : v) sum += x, sq += double(x) * x;
  const double mean = sum / v.size(), var = sq / v.size() - mean * mean;
  EXPECT_LT(std::abs(mean), 0.05);  // 49 prototype blocks per class x 10 classes: mean of ~490 draws
  EXPECT_NEAR(var, 1.0, 0.15);
  // Nearest class mean (fit on train, scored on the test stream) must be near perfect: learnable.
  const int64_t per = 784;
  std::vector<double> centroid(classes * per, 0.0);
  for (int64_t i = 0; i < tr.size(); ++i)
    for (int64_t e = 0; e < per; ++e) centroid[tr.labels[i] * per + e] += v[i * per + e] / 200.0;
  const auto t = te.images.to_vector();
  int correct = 0;
  for (int64_t i = 0; i < te.size(); ++i) {
    int best = -1;
    double best_d = 1e300;
    for (int k = 0; k < classes; ++k) {
      double d = 0;
      for (int64_t e = 0; e < per; ++e) d += (t[i * per + e] - centroid[k * per + e]) * (t[i * per + e] - centroid[k * per + e]);
      if (d < best_d) best_d = d, best = k;
    }
    correct += best == te.labels[i];
  }
  EXPECT_GE(correct, 490) << "nearest-centroid accuracy " << correct << "/500";
  // Test stream differs from the train stream.
  EXPECT_NE(std::memcmp(tr.images.raw(), te.images.raw(), 500 * per * 4), 0);
}

TEST(DataSynthetic, LoadDatasetByName) {
  Dataset s = load_dataset("synthetic", "", true, 5, 100);
  EXPECT_EQ(s.images.shape(), (Shape4{100, 1, 28, 28}));
  EXPECT_EQ(s.name, "synthetic");
  Dataset c = load_dataset("synthetic-cifar", "", false, 5, 30);
  EXPECT_EQ(c.images.shape(), (Shape4{30, 3, 32, 32}));
  EXPECT_EQ(load_dataset("synthetic", "", false, 5).size(), 10000);
  expect_error<Error>([] { load_dataset("imagenet", "", true, 0); }, {"imagenet", "fmnist", "mnist", "cifar10", "synthetic-cifar"});
}

TEST_F(DataFiles, LoadDatasetLimitOnFiles) {
  const std::vector<uint8_t> pixels = random_bytes(6 * 784, 7);
  write_mnist_pair(dir_, "train", pixels, {0, 1, 2, 3, 4, 5}, true);
  Dataset full = load_dataset("fmnist", dir_.string(), true, 0);
  Dataset lim = load_dataset("fashion-mnist", dir_.string(), true, 0, 4);
  EXPECT_EQ(full.size(), 6);
  ASSERT_EQ(lim.size(), 4);
  EXPECT_EQ(lim.labels, (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(std::memcmp(lim.images.raw(), full.images.raw(), lim.images.bytes()), 0);
}

// --- Partitioning

void expect_exact_cover(const std::vector<std::vector<int64_t>>& parts, int64_t n) {
  std::vector<int> seen(static_cast<size_t>(n), 0);
  for (const auto& p : parts)
    for (int64_t i : p) {
      ASSERT_TRUE(i >= 0 && i < n) << i;
      ++seen[i];
    }
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1) << "index " << i;
}

TEST(DataPartition, ShuffledIndicesIsPermutation) {
  const uint64_t seed = test::base_seed();
  SCOPED_TRACE(test::seed_trace());
  auto a = shuffled_indices(1001, seed), b = shuffled_indices(1001, seed), c = shuffled_indices(1001, seed + 1);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  auto s = a;
  std::sort(s.begin(), s.end());
  for (int64_t i = 0; i < 1001; ++i) ASSERT_EQ(s[i], i);
  EXPECT_EQ(shuffled_indices(0, seed).size(), 0u);
  const std::vector<int64_t> base = {10, 20, 30, 40};
  auto p = shuffled_indices(base, seed);
  std::sort(p.begin(), p.end());
  EXPECT_EQ(p, base);
}

TEST(DataPartition, IidCoversOnceAndBalances) {
  const uint64_t seed = test::base_seed();
  SCOPED_TRACE(test::seed_trace());
  for (auto [n, k] : {std::pair<int64_t, int>{1000, 3}, {17, 5}, {3, 5}, {60000, 7}, {0, 2}}) {
    auto parts = partition_iid(n, k, seed);
    ASSERT_EQ(parts.size(), static_cast<size_t>(k));
    expect_exact_cover(parts, n);
    size_t lo = SIZE_MAX, hi = 0;
    for (const auto& p : parts) lo = std::min(lo, p.size()), hi = std::max(hi, p.size());
    EXPECT_LE(hi - lo, 1u) << "n=" << n << " k=" << k;
    EXPECT_EQ(parts, partition_iid(n, k, seed));
  }
  EXPECT_NE(partition_iid(100, 2, seed), partition_iid(100, 2, seed + 1));
}

TEST(DataPartition, DirichletSampler) {
  // Dirichlet(alpha) over k: mean 1/k, variance (1/k)(1 - 1/k) / (k alpha + 1). Checks the Gamma sampler
  // for alpha < 1 (boosted branch) and alpha > 1. 4000 draws: the variance estimate is within ~5%.
  const uint64_t seed = test::base_seed();
  SCOPED_TRACE(test::seed_trace());
  for (double alpha : {0.3, 2.5}) {
    const int k = 4, draws = 4000;
    double m = 0, m2 = 0;
    for (int i = 0; i < draws; ++i) {
      auto p = sample_dirichlet(alpha, k, seed * 1000 + i);
      double s = 0;
      for (double x : p) {
        ASSERT_GE(x, 0.0);
        s += x;
      }
      ASSERT_NEAR(s, 1.0, 1e-12);
      m += p[0], m2 += p[0] * p[0];
    }
    m /= draws, m2 /= draws;
    const double var = m2 - m * m, want = 0.25 * 0.75 / (k * alpha + 1);
    EXPECT_NEAR(m, 0.25, 0.02) << "alpha " << alpha;
    EXPECT_NEAR(var, want, 0.2 * want) << "alpha " << alpha;
  }
}

// Mean over devices of the share of its samples in its two most frequent classes.
double top2_share(const std::vector<std::vector<int64_t>>& parts, const std::vector<int32_t>& labels, int classes) {
  double total = 0;
  for (const auto& p : parts) {
    std::vector<int> c(classes, 0);
    for (int64_t i : p) ++c[labels[i]];
    std::partial_sort(c.begin(), c.begin() + 2, c.end(), std::greater<>());
    total += double(c[0] + c[1]) / p.size();
  }
  return total / parts.size();
}

TEST(DataPartition, DirichletCoversOnceDeterministicAndSkewed) {
  const uint64_t seed = test::base_seed();
  SCOPED_TRACE(test::seed_trace());
  const int classes = 10, k = 10;
  std::vector<int32_t> labels(6000);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int32_t>((i * 7) % classes);
  for (double alpha : {0.1, 1.0, 1000.0}) {
    auto parts = partition_dirichlet(labels, classes, k, alpha, seed);
    ASSERT_EQ(parts.size(), static_cast<size_t>(k));
    expect_exact_cover(parts, 6000);
    for (const auto& p : parts) EXPECT_FALSE(p.empty());
    EXPECT_EQ(parts, partition_dirichlet(labels, classes, k, alpha, seed));
    EXPECT_NE(parts, partition_dirichlet(labels, classes, k, alpha, seed + 1));
  }
  // Mean share of a device's two biggest classes (uniform labels would give exactly 0.2). Over 3000
  // seeds: alpha 0.1 gave 0.695..0.959, alpha 1 0.382..0.574, alpha 1000 0.205..0.211.
  EXPECT_GT(top2_share(partition_dirichlet(labels, classes, k, 0.1, seed), labels, classes), 0.6);
  const double mid = top2_share(partition_dirichlet(labels, classes, k, 1.0, seed), labels, classes);
  EXPECT_GT(mid, 0.3);
  EXPECT_LT(mid, 0.65);
  EXPECT_LT(top2_share(partition_dirichlet(labels, classes, k, 1000.0, seed), labels, classes), 0.23);
  // alpha 1000: every class is 0.1 +- 0.03 of every device (max deviation seen over 3000 seeds: 0.014).
  for (const auto& p : partition_dirichlet(labels, classes, k, 1000.0, seed)) {
    std::vector<int> c(classes, 0);
    for (int64_t i : p) ++c[labels[i]];
    for (int x : c) EXPECT_NEAR(double(x) / p.size(), 0.1, 0.03);
  }
  // Tiny sets: every device still gets one sample.
  std::vector<int32_t> few = {0, 0, 0, 1, 1};
  for (double alpha : {0.01, 0.1}) {
    auto parts = partition_dirichlet(few, 2, 5, alpha, seed);
    expect_exact_cover(parts, 5);
    for (const auto& p : parts) EXPECT_EQ(p.size(), 1u);
  }
  expect_error<Error>([&] { partition_dirichlet(few, 2, 6, 0.5, seed); }, {"6 devices"});
}

// --- Batches and augmentation

TEST(DataBatch, GatherCopiesSamplesAndLabels) {
  Dataset ds = make_synthetic(20, Shape4{1, 2, 3, 4}, 5, 9);
  std::vector<int64_t> idx = {19, 3, 7, 0, 11};
  Tensor x = Tensor::empty(Shape4{4, 2, 3, 4}), y = Tensor::empty(Shape4{4, 1, 1, 1}, Device::kCpu, DType::kI32);
  gather_batch(ds, idx, 1, 3, x, y);
  const float* src = ds.images.data();
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(y.idata()[i], ds.labels[idx[1 + i]]);
    EXPECT_EQ(std::memcmp(x.data() + i * 24, src + idx[1 + i] * 24, 24 * sizeof(float)), 0) << i;
  }
  expect_error<Error>([&] { gather_batch(ds, idx, 3, 3, x, y); }, {"outside"});
  Tensor bad = Tensor::empty(Shape4{4, 2, 4, 3});
  expect_error<Error>([&] { gather_batch(ds, idx, 0, 3, bad, y); }, {"images_out"});
}

TEST(DataBatch, CropFlipManual) {
  // 1 channel 2x3: [[1 2 3] [4 5 6]].
  const float in[6] = {1, 2, 3, 4, 5, 6};
  float out[6], back[6];
  crop_flip(in, out, 1, 2, 3, 1, 1, 1, false);  // centred crop = copy
  EXPECT_EQ(std::vector<float>(out, out + 6), std::vector<float>(in, in + 6));
  crop_flip(in, out, 1, 2, 3, 1, 1, 1, true);
  EXPECT_EQ(std::vector<float>(out, out + 6), (std::vector<float>{3, 2, 1, 6, 5, 4}));
  crop_flip(out, back, 1, 2, 3, 1, 1, 1, true);  // flip twice = identity
  EXPECT_EQ(std::vector<float>(back, back + 6), std::vector<float>(in, in + 6));
  crop_flip(in, out, 1, 2, 3, 1, 0, 2, false);  // shift: out(y, x) = in(y - 1, x + 1)
  EXPECT_EQ(std::vector<float>(out, out + 6), (std::vector<float>{0, 0, 0, 2, 3, 0}));
}

TEST(DataBatch, AugmentKeepsShapeAndIsACropFlip) {
  const uint64_t seed = test::base_seed();
  SCOPED_TRACE(test::seed_trace());
  Dataset ds = make_synthetic(64, Shape4{1, 3, 8, 8}, 10, 1);
  const std::vector<int64_t> idx = shuffled_indices(64, seed);
  const Augment aug{.random_crop = true, .pad = 2, .hflip = true};
  Tensor x = Tensor::empty(Shape4{64, 3, 8, 8}), y = Tensor::empty(Shape4{64, 1, 1, 1}, Device::kCpu, DType::kI32);
  Tensor x2 = Tensor::empty(Shape4{64, 3, 8, 8});
  gather_batch(ds, idx, 0, 64, x, y, &aug, seed);
  gather_batch(ds, idx, 0, 64, x2, y, &aug, seed);
  EXPECT_EQ(x.shape(), (Shape4{64, 3, 8, 8}));
  EXPECT_EQ(std::memcmp(x.raw(), x2.raw(), x.bytes()), 0) << "same seed, same batch";
  gather_batch(ds, idx, 0, 64, x2, y, &aug, seed + 1);
  EXPECT_NE(std::memcmp(x.raw(), x2.raw(), x.bytes()), 0) << "another seed, another batch";
  // Each output is exactly one (dy, dx, flip) of its source; over 64 samples several occur.
  std::set<std::tuple<int, int, bool>> used;
  std::vector<float> cand(192);
  for (int i = 0; i < 64; ++i) {
    bool found = false;
    for (int dy = 0; dy <= 4 && !found; ++dy)
      for (int dx = 0; dx <= 4 && !found; ++dx)
        for (bool flip : {false, true}) {
          crop_flip(ds.images.data() + idx[i] * 192, cand.data(), 3, 8, 8, 2, dy, dx, flip);
          if (std::memcmp(cand.data(), x.data() + i * 192, 192 * sizeof(float)) == 0) {
            used.insert({dy, dx, flip});
            found = true;
            break;
          }
        }
    EXPECT_TRUE(found) << "sample " << i << " is no crop/flip of its source";
    EXPECT_EQ(y.idata()[i], ds.labels[idx[i]]);
  }
  EXPECT_GE(used.size(), 10u);
  bool any_flip = false, any_plain = false;
  for (auto& [dy, dx, f] : used) (f ? any_flip : any_plain) = true;
  EXPECT_TRUE(any_flip && any_plain);
}

// --- Real Fashion-MNIST (Debian's dataset-fashion-mnist)

TEST(DataFashionMnist, RealFiles) {
  if (!fs::exists(std::string(kFashionMnistDir) + "/train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << kFashionMnistDir << " not found (apt-get install dataset-fashion-mnist)";
  auto t0 = std::chrono::steady_clock::now();
  Dataset tr = load_fashion_mnist(kFashionMnistDir, true);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ info ] Fashion-MNIST train (60000 images) loaded in %.3f s\n", secs);
  EXPECT_LT(secs, 2.0);
  Dataset te = load_fashion_mnist(kFashionMnistDir, false);
  EXPECT_EQ(tr.images.shape(), (Shape4{60000, 1, 28, 28}));
  EXPECT_EQ(te.images.shape(), (Shape4{10000, 1, 28, 28}));
  std::vector<int> count(10, 0);
  for (int32_t l : tr.labels) {
    ASSERT_TRUE(l >= 0 && l < 10);
    ++count[l];
  }
  for (int k = 0; k < 10; ++k) EXPECT_EQ(count[k], 6000) << "class " << k;
  for (int32_t l : te.labels) ASSERT_TRUE(l >= 0 && l < 10);
  double sum = 0;
  const float* x = tr.images.data();
  for (int64_t i = 0; i < tr.images.numel(); ++i) sum += x[i];
  EXPECT_LT(std::abs(sum / tr.images.numel()), 0.05);
}

}  // namespace
}  // namespace pipar::data
