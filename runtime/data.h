// Data sets for training: IDX (MNIST, Fashion-MNIST) and CIFAR-10 binary readers, learnable synthetic
// data, partitioning across devices (iid, Dirichlet label skew), and batch gathering with CIFAR-style
// augmentation. Every file problem is a pipar::IoError naming the file, what is wrong and the fix.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace pipar::data {

// A whole data set in memory: images float [n, c, h, w] on the CPU, already normalized; labels in
// [0, num_classes).
struct Dataset {
  Tensor images;
  std::vector<int32_t> labels;
  int num_classes = 0;
  std::string name;

  Shape4 sample_shape() const { return {1, images.shape().c, images.shape().h, images.shape().w}; }  // [1, c, h, w]
  int64_t size() const { return static_cast<int64_t>(labels.size()); }
};

// Per-channel normalization: x = (pixel / 255 - mean[c]) / std[c].
struct Normalization {
  std::vector<float> mean, std;
};
inline const Normalization kMnistNorm{{0.1307f}, {0.3081f}};
inline const Normalization kFashionMnistNorm{{0.2860f}, {0.3530f}};
inline const Normalization kCifar10Norm{{0.4914f, 0.4822f, 0.4465f}, {0.2470f, 0.2435f, 0.2616f}};

inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";  // Debian dataset-fashion-mnist
inline constexpr const char* kMnistDir = "/usr/share/datasets/mnist";
inline constexpr const char* kCifar10Dir = "data/cifar-10-batches-bin";

// --- Readers

// An IDX file of unsigned bytes (magic 0x0000 08 <rank>, big-endian dims), gzip or raw.
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;  // product(dims) bytes, row-major
};
// Reads `path` (gzip detected by its 1f 8b magic) and checks the magic's rank is `rank`. Sizes are
// checked against the file (and a 1 GiB cap) before anything is allocated; truncation is an error.
IdxArray read_idx(const std::string& path, int rank);

// MNIST-format directory: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; images must be 28x28,
// labels 0..9. `name` picks the normalization ("mnist" or "fashion-mnist") and the fix hint.
Dataset load_mnist_like(const std::string& dir, bool train, const std::string& name);
Dataset load_fashion_mnist(const std::string& dir = kFashionMnistDir, bool train = true);
Dataset load_mnist(const std::string& dir = kMnistDir, bool train = true);

// CIFAR-10 binary version: data_batch_1..5.bin (train) or test_batch.bin, records of 1 label byte +
// 3072 pixel bytes (R, G, B planes of 32x32). `dir` may also be the parent of cifar-10-batches-bin/.
Dataset load_cifar10(const std::string& dir = kCifar10Dir, bool train = true);
// The same for an explicit list of batch files (concatenated in order).
Dataset read_cifar10_files(const std::vector<std::string>& paths);

// --- Synthetic data

// n samples of sample_shape ({1, c, h, w}; n is ignored), labels i % num_classes. Each class has a
// blocky random prototype; a sample is its prototype plus per-pixel noise of the same variance, scaled
// to zero mean and unit variance, so a small net learns it easily. Prototypes depend only on (seed,
// shape, num_classes); the noise also on `stream` (train 0, test 1) and the sample index. Bit-identical
// across runs, thread counts and platforms (integer arithmetic, one rounding per value).
Dataset make_synthetic(int64_t n, Shape4 sample_shape, int num_classes, uint64_t seed, uint64_t stream = 0);

// By name: "fmnist" (or "fashion-mnist"), "mnist", "cifar10", "synthetic" (1x28x28, 10 classes,
// 60000 train / 10000 test) and "synthetic-cifar" (3x32x32, 10 classes, 50000 / 10000). data_dir ""
// means the default directory. limit > 0 keeps the first `limit` samples. Unknown name: pipar::Error.
Dataset load_dataset(const std::string& name, const std::string& data_dir, bool train, uint64_t seed,
                     int64_t limit = 0);
std::vector<std::string> dataset_names();

// A new data set holding the samples at `indices` (in that order).
Dataset subset(const Dataset& ds, const std::vector<int64_t>& indices);

// --- Partitioning across k devices (every index 0..n-1 appears exactly once overall)

// Shuffle, then split into k parts whose sizes differ by at most one.
std::vector<std::vector<int64_t>> partition_iid(int64_t n, int k, uint64_t seed);
// Label skew: for each class, proportions over devices ~ Dirichlet(alpha), that class's (shuffled)
// indices split accordingly. Small alpha: each device sees few classes; large alpha: near iid. Every
// device gets at least one sample (needs n >= k). Each part is sorted ascending.
std::vector<std::vector<int64_t>> partition_dirichlet(const std::vector<int32_t>& labels, int num_classes, int k,
                                                      double alpha, uint64_t seed);

// Deterministic permutation of 0..n-1 (or of `base`) by seed: a new seed per epoch.
std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed);
std::vector<int64_t> shuffled_indices(const std::vector<int64_t>& base, uint64_t seed);

// Proportions over k devices ~ Dirichlet(alpha), from Gamma(alpha) draws (Marsaglia–Tsang) on a
// counter-based stream: deterministic by seed. Exposed for tests.
std::vector<double> sample_dirichlet(double alpha, int k, uint64_t seed);

// --- Batches and augmentation

// CIFAR-style augmentation. The crop pads with 0 in normalized space, i.e. with the data set's mean
// pixel (what torchvision's RandomCrop does on normalized tensors).
struct Augment {
  bool random_crop = false;
  int pad = 4;
  bool hflip = false;
};

// Copies samples indices[begin .. begin+count) of ds into images_out (CPU float, [>= count, c, h, w])
// and labels_out (CPU int32, [>= count, 1, 1, 1]); rows past count are left as they are. With aug, each
// sample gets a crop offset and flip drawn from hash64(seed, begin + i): deterministic by (seed, position).
void gather_batch(const Dataset& ds, const std::vector<int64_t>& indices, int64_t begin, int64_t count,
                  Tensor& images_out, Tensor& labels_out, const Augment* aug = nullptr, uint64_t seed = 0);

// One sample [c, h, w] → out: out(y, x) = in(y + dy - pad, x + dx - pad) (0 outside), then mirrored
// left-right if flip. dy, dx in [0, 2 pad]; dy = dx = pad with flip false is a copy. in != out.
void crop_flip(const float* in, float* out, int64_t c, int64_t h, int64_t w, int pad, int dy, int dx, bool flip);

}  // namespace pipar::data
