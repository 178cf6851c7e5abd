// Data sets: IDX and CIFAR-10 readers (zlib for .gz), synthetic data, iid / Dirichlet partitions,
// batch gathering with crop+flip augmentation. File sizes are checked before any allocation.
#include "runtime/data.h"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <numeric>

#include "kernels/error.h"
#include "kernels/parallel.h"
#include "kernels/rng.h"

namespace pipar::data {

namespace fs = std::filesystem;
using detail::concat;

namespace {

// Largest payload any reader accepts (CIFAR-10's largest file is 30 MiB, MNIST's 45 MiB).
constexpr uint64_t kMaxPayloadBytes = uint64_t{1} << 30;
// Deflate never expands data by more than ~1032:1, so a gzip file of s bytes holds < s * 1032 + slack.
constexpr uint64_t kMaxGzipRatio = 1032;
constexpr size_t kReadChunk = size_t{8} << 20;
constexpr int64_t kCifarRecord = 1 + 3 * 32 * 32;

// --- Byte sources: raw or gzip (detected by the 1f 8b magic), with the file name in every error.

class ByteReader {
 public:
  explicit ByteReader(const std::string& path) : path_(path) {
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) throw IoError(concat(path, ": not found or not a regular file"));
    file_size_ = fs::file_size(path, ec);
    if (ec) throw IoError(concat(path, ": cannot read its size: ", ec.message()));
    uint8_t magic[2] = {0, 0};
    {
      std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
      if (!f) throw IoError(concat(path, ": cannot open: ", std::strerror(errno)));
      gzip_ = std::fread(magic, 1, 2, f.get()) == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
    }
    if (gzip_) {
      gz_ = gzopen(path.c_str(), "rb");
      if (!gz_) throw IoError(concat(path, ": cannot open as gzip"));
      gzbuffer(gz_, 1u << 20);
    } else {
      raw_ = std::fopen(path.c_str(), "rb");
      if (!raw_) throw IoError(concat(path, ": cannot open: ", std::strerror(errno)));
    }
  }
  ~ByteReader() {
    if (gz_) gzclose(gz_);
    if (raw_) std::fclose(raw_);
  }
  ByteReader(const ByteReader&) = delete;
  ByteReader& operator=(const ByteReader&) = delete;

  bool gzip() const { return gzip_; }
  uint64_t file_size() const { return file_size_; }
  const std::string& path() const { return path_; }

  // Up to n bytes; fewer only at the end of the data. A corrupt gzip stream throws.
  size_t read(uint8_t* dst, size_t n) {
    size_t total = 0;
    while (total < n) {
      size_t want = std::min(n - total, size_t{1} << 30);
      size_t got;
      if (gzip_) {
        int r = gzread(gz_, dst + total, static_cast<unsigned>(want));
        if (r < 0) gz_fail();
        got = static_cast<size_t>(r);
      } else {
        got = std::fread(dst + total, 1, want, raw_);
        if (got < want && std::ferror(raw_)) throw IoError(concat(path_, ": read error: ", std::strerror(errno)));
      }
      total += got;
      if (got < want) break;
    }
    return total;
  }
  // After the expected bytes: the data must end here (gzip: with an intact trailer).
  bool at_clean_end() {
    uint8_t extra;
    if (read(&extra, 1) != 0) return false;
    if (gzip_) {
      int err = Z_OK;
      gzerror(gz_, &err);
      if (err != Z_OK) gz_fail();
    }
    return true;
  }
  // Throws if the gzip stream stopped early (truncated) or is corrupt; a clean EOF returns.
  void check_gzip_state() {
    if (!gzip_) return;
    int err = Z_OK;
    gzerror(gz_, &err);
    if (err != Z_OK) gz_fail();
  }

 private:
  [[noreturn]] void gz_fail() {
    int err = Z_OK;
    const char* msg = gzerror(gz_, &err);
    if (err == Z_BUF_ERROR)
      throw IoError(concat(path_, ": truncated gzip file (", msg, "); re-download or reinstall it"));
    throw IoError(concat(path_, ": corrupt gzip data (", msg ? msg : "unknown error", "); re-download or reinstall it"));
  }

  std::string path_;
  uint64_t file_size_ = 0;
  bool gzip_ = false;
  gzFile gz_ = nullptr;
  FILE* raw_ = nullptr;
};

uint32_t read_be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

std::string dims_str(const std::vector<int64_t>& dims) {
  std::string s;
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "x" : "") + std::to_string(dims[i]);
  return s;
}

// Reads `payload` bytes (already checked against the file and the cap) in chunks, so a gzip stream
// that ends early fails before the whole claimed size is ever allocated.
std::vector<uint8_t> read_payload(ByteReader& in, uint64_t payload, const std::string& what) {
  std::vector<uint8_t> data;
  if (!in.gzip()) data.reserve(payload);  // raw: the file size was checked to hold it
  uint64_t have = 0;
  while (have < payload) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(payload - have, kReadChunk));
    data.resize(have + chunk);
    size_t got = in.read(data.data() + have, chunk);
    have += got;
    if (got < chunk) {
      in.check_gzip_state();  // a truncated gzip reports itself here
      throw IoError(concat(in.path(), ": truncated: header says ", what, " (", payload, " bytes of data) but the file",
                           in.gzip() ? "'s gzip stream" : "", " holds only ", have,
                           "; re-download or reinstall it"));
    }
  }
  if (!in.at_clean_end())
    throw IoError(concat(in.path(), ": holds more data than its header says (", what,
                         "); is it the right file? re-download or reinstall it"));
  return data;
}

// --- Normalization and assembly

// One float per byte value per channel: (v / 255 - mean) / std.
std::vector<float> norm_table(const Normalization& norm, int64_t c) {
  std::vector<float> lut(static_cast<size_t>(c) * 256);
  for (int64_t ch = 0; ch < c; ++ch)
    for (int v = 0; v < 256; ++v)
      lut[ch * 256 + v] = (static_cast<float>(v) / 255.0f - norm.mean[ch]) / norm.std[ch];
  return lut;
}

void check_labels(const std::vector<int32_t>& labels, int num_classes, const std::string& path) {
  for (size_t i = 0; i < labels.size(); ++i)
    if (labels[i] < 0 || labels[i] >= num_classes)
      throw IoError(concat(path, ": label ", labels[i], " of item ", i,
                           " is out of range [0, ", num_classes, "); is it the right file? re-download or reinstall it"));
}

std::string missing_fix(const std::string& name) {
  if (name == "fashion-mnist")
    return "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data-dir";
  if (name == "cifar10") return "download the CIFAR-10 binary version (cifar-10-binary.tar.gz) and pass --data-dir";
  return "download the four MNIST idx files (train-images-idx3-ubyte.gz, ...) into one directory and pass --data-dir";
}

// dir/base.gz, else dir/base, else an IoError naming both and the fix.
std::string find_file(const std::string& dir, const std::string& base, const std::string& name) {
  std::error_code ec;
  fs::path gz = fs::path(dir) / (base + ".gz"), raw = fs::path(dir) / base;
  if (fs::exists(gz, ec)) return gz.string();
  if (fs::exists(raw, ec)) return raw.string();
  throw IoError(concat(name, ": ", raw.string(), "[.gz] not found", fs::is_directory(dir, ec) ? "" : " (no such directory)",
                       "; ", missing_fix(name)));
}

// --- Synthetic data helpers: integer arithmetic only, so values agree bit for bit everywhere.

// A roughly Gaussian integer: the sum of four 16-bit uniforms, centred (Irwin–Hall, n = 4).
inline int32_t gauss_int(uint64_t h) {
  int32_t s = static_cast<int32_t>(h & 0xffff) + static_cast<int32_t>((h >> 16) & 0xffff) +
              static_cast<int32_t>((h >> 32) & 0xffff) + static_cast<int32_t>(h >> 48);
  return s - 2 * 65535;  // in [-131070, 131070], mean 0
}
constexpr int32_t kNoiseFactor = 2;  // noise std = 2 x prototype std: visibly noisy, still easily learnable

// --- Random streams for partitioning (counter-based, so the same on every platform)

class Stream {
 public:
  explicit Stream(uint64_t seed) : seed_(seed) {}
  uint64_t next() { return hash64(seed_, counter_++); }
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1p-53; }  // (0, 1), never 0
  double normal() {  // Box–Muller
    double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  // Gamma(a, 1), Marsaglia & Tsang (2000); a < 1 via Gamma(a + 1) * U^(1/a).
  double gamma(double a) {
    if (a < 1.0) return gamma(a + 1.0) * std::pow(uniform(), 1.0 / a);
    const double d = a - 1.0 / 3.0, c = 1.0 / std::sqrt(9.0 * d);
    for (;;) {
      double x = normal(), v = 1.0 + c * x;
      if (v <= 0.0) continue;
      v = v * v * v;
      double u = uniform();
      if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;
      if (std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v))) return d * v;
    }
  }

 private:
  uint64_t seed_;
  uint64_t counter_ = 0;
};

// Unbiased enough (bias < m / 2^64) bounded integer in [0, m).
inline uint64_t bounded(uint64_t x, uint64_t m) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * m) >> 64);
}

}  // namespace

// --- IDX

IdxArray read_idx(const std::string& path, int rank) {
  PIPAR_CHECK(rank >= 1 && rank <= 4, "read_idx: rank ", rank, " not in 1..4");
  ByteReader in(path);
  uint8_t header[4 + 4 * 4];
  const size_t header_bytes = 4 + 4 * static_cast<size_t>(rank);
  size_t got = in.read(header, 4);
  if (got < 4) {
    in.check_gzip_state();
    throw IoError(concat(path, ": truncated: ", got, " bytes, too short for an IDX header; re-download or reinstall it"));
  }
  const uint32_t magic = read_be32(header), want_magic = 0x00000800u | static_cast<uint32_t>(rank);
  if (magic != want_magic) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "bad magic 0x%08x, expected 0x%08x", magic, want_magic);
    throw IoError(concat(path, ": ", buf, " (IDX unsigned bytes, rank ", rank,
                         "); is it the right file (images idx3 / labels idx1)?",
                         in.gzip() ? "" : " (a .gz file must start with 1f 8b)"));
  }
  got = in.read(header + 4, header_bytes - 4);
  if (got < header_bytes - 4) {
    in.check_gzip_state();
    throw IoError(concat(path, ": truncated inside the IDX header; re-download or reinstall it"));
  }
  IdxArray out;
  uint64_t payload = 1;
  for (int i = 0; i < rank; ++i) {
    uint32_t d = read_be32(header + 4 + 4 * i);
    out.dims.push_back(d);
    payload *= d;  // each factor < 2^32 and the running product stays <= the cap, so no overflow
    if (payload > kMaxPayloadBytes)
      throw IoError(concat(path, ": header dims ", i + 1 < rank ? "start " : "", dims_str(out.dims), " claim more than ",
                           kMaxPayloadBytes, " bytes; corrupt header? re-download or reinstall it"));
  }
  const std::string what = concat(dims_str(out.dims), " bytes");
  if (!in.gzip()) {
    const uint64_t need = header_bytes + payload;
    if (in.file_size() < need)
      throw IoError(concat(path, ": truncated: header says ", what, " (", need, " bytes with the header) but the file has ",
                           in.file_size(), "; re-download or reinstall it"));
  } else if (payload > in.file_size() * kMaxGzipRatio + 4096) {
    throw IoError(concat(path, ": header says ", what, ", more than a ", in.file_size(),
                         "-byte gzip file can hold; corrupt or truncated; re-download or reinstall it"));
  }
  out.data = read_payload(in, payload, what);
  return out;
}

// --- MNIST-like

Dataset load_mnist_like(const std::string& dir, bool train, const std::string& name) {
  const bool fashion = name == "fashion-mnist" || name == "fmnist";
  const std::string canon = fashion ? "fashion-mnist" : "mnist";
  const std::string prefix = train ? "train" : "t10k";
  const std::string img_path = find_file(dir, prefix + "-images-idx3-ubyte", canon);
  const std::string lbl_path = find_file(dir, prefix + "-labels-idx1-ubyte", canon);

  IdxArray img = read_idx(img_path, 3);
  if (img.dims[1] != 28 || img.dims[2] != 28)
    throw IoError(concat(img_path, ": wrong dims: images are ", img.dims[1], "x", img.dims[2],
                         ", expected 28x28; is it the right file?"));
  IdxArray lbl = read_idx(lbl_path, 1);
  const int64_t n = img.dims[0];
  if (lbl.dims[0] != n)
    throw IoError(concat(lbl_path, ": label count ", lbl.dims[0], " != image count ", n, " in ", img_path,
                         "; the two files do not belong together"));

  Dataset ds;
  ds.name = canon;
  ds.num_classes = 10;
  ds.labels.assign(lbl.data.begin(), lbl.data.end());
  check_labels(ds.labels, ds.num_classes, lbl_path);

  ds.images = Tensor::empty(Shape4{n, 1, 28, 28});
  const std::vector<float> lut = norm_table(fashion ? kFashionMnistNorm : kMnistNorm, 1);
  float* dst = ds.images.data();
  const uint8_t* src = img.data.data();
  const int64_t total = n * 28 * 28;
  for (int64_t i = 0; i < total; ++i) dst[i] = lut[src[i]];
  return ds;
}

Dataset load_fashion_mnist(const std::string& dir, bool train) { return load_mnist_like(dir, train, "fashion-mnist"); }
Dataset load_mnist(const std::string& dir, bool train) { return load_mnist_like(dir, train, "mnist"); }

// --- CIFAR-10

Dataset read_cifar10_files(const std::vector<std::string>& paths) {
  const std::string fix = "download the CIFAR-10 binary version (cifar-10-binary.tar.gz) and pass --data-dir";
  std::vector<uint64_t> sizes;
  uint64_t total_records = 0;
  for (const auto& p : paths) {
    std::error_code ec;
    if (!fs::is_regular_file(p, ec)) throw IoError(concat("cifar10: ", p, " not found; ", fix));
    uint64_t size = fs::file_size(p, ec);
    if (ec) throw IoError(concat(p, ": cannot read its size: ", ec.message()));
    if (size == 0 || size % kCifarRecord != 0)
      throw IoError(concat(p, ": size ", size, " is not a positive multiple of ", kCifarRecord,
                           " (1 label byte + 3072 pixel bytes per record): truncated or not the binary version; ", fix));
    sizes.push_back(size);
    total_records += size / kCifarRecord;
  }
  if (total_records * kCifarRecord > 4 * kMaxPayloadBytes)
    throw IoError(concat("cifar10: ", total_records, " records is more than any CIFAR-10 file set holds"));

  Dataset ds;
  ds.name = "cifar10";
  ds.num_classes = 10;
  const int64_t n = static_cast<int64_t>(total_records);
  ds.images = Tensor::empty(Shape4{n, 3, 32, 32});
  ds.labels.resize(static_cast<size_t>(n));
  const std::vector<float> lut = norm_table(kCifar10Norm, 3);
  float* dst = ds.images.data();
  int64_t row = 0;
  for (size_t f = 0; f < paths.size(); ++f) {
    std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(paths[f].c_str(), "rb"), &std::fclose);
    if (!file) throw IoError(concat(paths[f], ": cannot open: ", std::strerror(errno)));
    std::vector<uint8_t> bytes(static_cast<size_t>(sizes[f]));
    if (std::fread(bytes.data(), 1, bytes.size(), file.get()) != bytes.size())
      throw IoError(concat(paths[f], ": short read (changed while reading?); ", fix));
    const int64_t records = static_cast<int64_t>(sizes[f]) / kCifarRecord;
    for (int64_t r = 0; r < records; ++r, ++row) {
      const uint8_t* rec = bytes.data() + r * kCifarRecord;
      if (rec[0] >= 10)
        throw IoError(concat(paths[f], ": label ", int{rec[0]}, " of record ", r, " is out of range [0, 10); ", fix));
      ds.labels[row] = rec[0];
      float* out = dst + row * 3072;
      for (int64_t i = 0; i < 3072; ++i) out[i] = lut[(i / 1024) * 256 + rec[1 + i]];
    }
  }
  return ds;
}

Dataset load_cifar10(const std::string& dir, bool train) {
  // The files themselves, or the directory the CIFAR-10 tarball unpacks into (cifar-10-batches-bin/).
  std::error_code ec;
  const std::string first = train ? "data_batch_1.bin" : "test_batch.bin";
  std::string base = dir;
  if (!fs::exists(fs::path(dir) / first, ec) && fs::exists(fs::path(dir) / "cifar-10-batches-bin" / first, ec))
    base = (fs::path(dir) / "cifar-10-batches-bin").string();
  std::vector<std::string> paths;
  if (train) {
    for (int i = 1; i <= 5; ++i) paths.push_back((fs::path(base) / concat("data_batch_", i, ".bin")).string());
  } else {
    paths.push_back((fs::path(base) / "test_batch.bin").string());
  }
  return read_cifar10_files(paths);
}

// --- Synthetic

Dataset make_synthetic(int64_t n, Shape4 sample_shape, int num_classes, uint64_t seed, uint64_t stream) {
  const int64_t c = sample_shape.c, h = sample_shape.h, w = sample_shape.w;
  PIPAR_CHECK(n >= 0 && c > 0 && h > 0 && w > 0 && num_classes > 0, "make_synthetic: bad arguments n=", n,
              " shape ", sample_shape.str(), " classes ", num_classes);
  const int64_t per = c * h * w;
  // Prototypes: one Gaussian value per (class, channel, block) with blocks of ~1/7 of the side, so
  // the pattern survives pooling; upsampled to pixels.
  const int64_t bh = std::max<int64_t>(1, h / 7), bw = std::max<int64_t>(1, w / 7);
  const int64_t nby = (h + bh - 1) / bh, nbx = (w + bw - 1) / bw;
  const uint64_t proto_seed = hash64(seed, 0x5052'4f54'4fULL);  // "PROTO"
  std::vector<int32_t> proto(static_cast<size_t>(num_classes * per));
  for (int64_t k = 0; k < num_classes; ++k)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x)
          proto[((k * c + ch) * h + y) * w + x] =
              gauss_int(hash64(proto_seed, static_cast<uint64_t>(((k * c + ch) * nby + y / bh) * nbx + x / bw)));

  // Scale so proto + kNoiseFactor * noise has unit variance: var(gauss_int) = 4 (65536^2 - 1) / 12.
  const double var_g = 4.0 * (65536.0 * 65536.0 - 1.0) / 12.0;
  const float scale = static_cast<float>(1.0 / std::sqrt(var_g * (1.0 + kNoiseFactor * kNoiseFactor)));
  const uint64_t noise_seed = hash64(hash64(seed, 0x4e4f'4953'45ULL), stream);  // "NOISE"

  Dataset ds;
  ds.name = "synthetic";
  ds.num_classes = num_classes;
  ds.images = Tensor::empty(Shape4{n, c, h, w});
  ds.labels.resize(static_cast<size_t>(n));
  float* dst = ds.images.data();
#pragma omp parallel for schedule(static) num_threads(kernels::num_threads())
  for (int64_t i = 0; i < n; ++i) {
    const int32_t label = static_cast<int32_t>(i % num_classes);
    ds.labels[i] = label;
    const int32_t* p = proto.data() + label * per;
    float* out = dst + i * per;
    for (int64_t e = 0; e < per; ++e) {
      // |sum| <= 3 * 131070 < 2^24: exact in float, so one rounding (the multiply) per value.
      int32_t sum = p[e] + kNoiseFactor * gauss_int(hash64(noise_seed, static_cast<uint64_t>(i * per + e)));
      out[e] = static_cast<float>(sum) * scale;
    }
  }
  return ds;
}

// --- By name

std::vector<std::string> dataset_names() { return {"fmnist", "fashion-mnist", "mnist", "cifar10", "synthetic", "synthetic-cifar"}; }

Dataset load_dataset(const std::string& name, const std::string& data_dir, bool train, uint64_t seed, int64_t limit) {
  PIPAR_CHECK(limit >= 0, "load_dataset: negative limit ", limit);
  auto dir_or = [&](const char* def) { return data_dir.empty() ? std::string(def) : data_dir; };
  auto synth = [&](Shape4 shape, int64_t n_train, int64_t n_test, const char* nm) {
    const int64_t n = limit > 0 ? limit : (train ? n_train : n_test);
    Dataset ds = make_synthetic(n, shape, 10, seed, train ? 0 : 1);
    ds.name = nm;
    return ds;
  };
  Dataset ds;
  if (name == "fmnist" || name == "fashion-mnist") {
    ds = load_fashion_mnist(dir_or(kFashionMnistDir), train);
  } else if (name == "mnist") {
    ds = load_mnist(dir_or(kMnistDir), train);
  } else if (name == "cifar10") {
    ds = load_cifar10(dir_or(kCifar10Dir), train);
  } else if (name == "synthetic") {
    return synth(Shape4{1, 1, 28, 28}, 60000, 10000, "synthetic");
  } else if (name == "synthetic-cifar") {
    return synth(Shape4{1, 3, 32, 32}, 50000, 10000, "synthetic-cifar");
  } else {
    std::string known;
    for (const auto& s : dataset_names()) known += (known.empty() ? "" : ", ") + s;
    throw Error(concat("unknown data set '", name, "'; known: ", known));
  }
  if (limit > 0 && limit < ds.size()) {
    std::vector<int64_t> first(static_cast<size_t>(limit));
    std::iota(first.begin(), first.end(), 0);
    ds = subset(ds, first);
  }
  return ds;
}

Dataset subset(const Dataset& ds, const std::vector<int64_t>& indices) {
  const Shape4 s = ds.images.shape();
  const int64_t per = s.per_sample(), m = static_cast<int64_t>(indices.size());
  Dataset out;
  out.name = ds.name;
  out.num_classes = ds.num_classes;
  out.images = Tensor::empty(Shape4{m, s.c, s.h, s.w});
  out.labels.resize(indices.size());
  const float* src = ds.images.data();
  float* dst = out.images.data();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = indices[i];
    PIPAR_CHECK(j >= 0 && j < ds.size(), "subset: index ", j, " out of range [0, ", ds.size(), ")");
    std::memcpy(dst + i * per, src + j * per, static_cast<size_t>(per) * sizeof(float));
    out.labels[i] = ds.labels[j];
  }
  return out;
}

// --- Partitioning

std::vector<int64_t> shuffled_indices(const std::vector<int64_t>& base, uint64_t seed) {
  std::vector<int64_t> v = base;
  for (size_t i = v.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(bounded(hash64(seed, i), i));  // Fisher–Yates: j in [0, i)
    std::swap(v[i - 1], v[j]);
  }
  return v;
}

std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed) {
  PIPAR_CHECK(n >= 0, "shuffled_indices: negative n ", n);
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return shuffled_indices(v, seed);
}

std::vector<std::vector<int64_t>> partition_iid(int64_t n, int k, uint64_t seed) {
  PIPAR_CHECK(k >= 1 && n >= 0, "partition_iid: need k >= 1 and n >= 0 (n=", n, ", k=", k, ")");
  const std::vector<int64_t> perm = shuffled_indices(n, seed);
  std::vector<std::vector<int64_t>> parts(static_cast<size_t>(k));
  int64_t pos = 0;
  for (int d = 0; d < k; ++d) {
    const int64_t size = n / k + (d < n % k ? 1 : 0);
    parts[d].assign(perm.begin() + pos, perm.begin() + pos + size);
    std::sort(parts[d].begin(), parts[d].end());
    pos += size;
  }
  return parts;
}

std::vector<double> sample_dirichlet(double alpha, int k, uint64_t seed) {
  PIPAR_CHECK(alpha > 0.0 && k >= 1, "sample_dirichlet: need alpha > 0 and k >= 1 (alpha=", alpha, ", k=", k, ")");
  Stream rng(seed);
  std::vector<double> p(static_cast<size_t>(k));
  double sum = 0.0;
  for (auto& x : p) sum += (x = rng.gamma(alpha));
  if (!(sum > 0.0)) {  // every Gamma draw underflowed (alpha ~ 0.01): all mass on one device
    std::fill(p.begin(), p.end(), 0.0);
    p[bounded(rng.next(), static_cast<uint64_t>(k))] = 1.0;
    return p;
  }
  for (auto& x : p) x /= sum;
  return p;
}

std::vector<std::vector<int64_t>> partition_dirichlet(const std::vector<int32_t>& labels, int num_classes, int k,
                                                      double alpha, uint64_t seed) {
  const int64_t n = static_cast<int64_t>(labels.size());
  PIPAR_CHECK(k >= 1 && num_classes >= 1 && alpha > 0.0, "partition_dirichlet: need k >= 1, classes >= 1, alpha > 0 (k=",
              k, ", classes=", num_classes, ", alpha=", alpha, ")");
  PIPAR_CHECK(n >= k, "partition_dirichlet: ", n, " samples cannot give each of ", k, " devices one");
  std::vector<std::vector<int64_t>> by_class(static_cast<size_t>(num_classes));
  for (int64_t i = 0; i < n; ++i) {
    PIPAR_CHECK(labels[i] >= 0 && labels[i] < num_classes, "partition_dirichlet: label ", labels[i], " at ", i,
                " out of range [0, ", num_classes, ")");
    by_class[labels[i]].push_back(i);
  }
  std::vector<std::vector<int64_t>> parts(static_cast<size_t>(k));
  for (int cls = 0; cls < num_classes; ++cls) {
    const std::vector<int64_t> idx = shuffled_indices(by_class[cls], hash64(seed, 2 * cls));
    const std::vector<double> p = sample_dirichlet(alpha, k, hash64(seed, 2 * cls + 1));
    const int64_t m = static_cast<int64_t>(idx.size());
    double cum = 0.0;
    int64_t start = 0;
    for (int d = 0; d < k; ++d) {
      cum += p[d];
      const int64_t end = d == k - 1 ? m : std::min<int64_t>(m, std::llround(cum * static_cast<double>(m)));
      for (int64_t j = start; j < end; ++j) parts[d].push_back(idx[j]);
      start = std::max(start, end);
    }
  }
  // Every device needs a sample: an empty one takes the last-assigned sample of the largest device.
  for (int d = 0; d < k; ++d) {
    if (!parts[d].empty()) continue;
    auto donor = std::max_element(parts.begin(), parts.end(),
                                  [](const auto& a, const auto& b) { return a.size() < b.size(); });
    parts[d].push_back(donor->back());
    donor->pop_back();
  }
  for (auto& part : parts) std::sort(part.begin(), part.end());
  return parts;
}

// --- Batches and augmentation

void crop_flip(const float* in, float* out, int64_t c, int64_t h, int64_t w, int pad, int dy, int dx, bool flip) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* src = in + ch * h * w;
    float* dst = out + ch * h * w;
    for (int64_t y = 0; y < h; ++y) {
      const int64_t sy = y + dy - pad;
      float* row = dst + y * w;
      if (sy < 0 || sy >= h) {
        std::fill(row, row + w, 0.0f);
        continue;
      }
      for (int64_t x = 0; x < w; ++x) {
        const int64_t sx = x + dx - pad;
        row[flip ? w - 1 - x : x] = (sx >= 0 && sx < w) ? src[sy * w + sx] : 0.0f;
      }
    }
  }
}

void gather_batch(const Dataset& ds, const std::vector<int64_t>& indices, int64_t begin, int64_t count,
                  Tensor& images_out, Tensor& labels_out, const Augment* aug, uint64_t seed) {
  const Shape4 s = ds.images.shape(), o = images_out.shape(), l = labels_out.shape();
  PIPAR_CHECK(begin >= 0 && count >= 0 && begin + count <= static_cast<int64_t>(indices.size()), "gather_batch: range [",
              begin, ", ", begin + count, ") outside ", indices.size(), " indices");
  PIPAR_CHECK(images_out.device() == Device::kCpu && images_out.dtype() == DType::kF32 && o.c == s.c && o.h == s.h &&
                  o.w == s.w && o.n >= count,
              "gather_batch: images_out ", o.str(), " must be CPU float [>= ", count, ", ", s.c, ", ", s.h, ", ", s.w, "]");
  PIPAR_CHECK(labels_out.device() == Device::kCpu && labels_out.dtype() == DType::kI32 && l.n >= count && l.per_sample() == 1,
              "gather_batch: labels_out ", l.str(), " must be CPU int32 [>= ", count, ", 1, 1, 1]");
  PIPAR_CHECK(ds.images.device() == Device::kCpu, "gather_batch: data set images must be on the CPU");
  PIPAR_CHECK(!aug || (aug->pad >= 0 && aug->pad <= s.h && aug->pad <= s.w), "gather_batch: crop pad ",
              aug ? aug->pad : 0, " must be in [0, min(h, w)]");
  const int64_t per = s.per_sample();
  const float* src = ds.images.data();
  float* dst = images_out.data();
  int32_t* lab = labels_out.idata();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = indices[begin + i];
    PIPAR_CHECK(j >= 0 && j < ds.size(), "gather_batch: index ", j, " out of range [0, ", ds.size(), ")");
    lab[i] = ds.labels[j];
    if (!aug || (!aug->random_crop && !aug->hflip)) {
      std::memcpy(dst + i * per, src + j * per, static_cast<size_t>(per) * sizeof(float));
      continue;
    }
    const uint64_t r = hash64(seed, static_cast<uint64_t>(begin + i));
    const uint64_t span = 2 * static_cast<uint64_t>(aug->pad) + 1;
    const int pad = aug->random_crop ? aug->pad : 0;
    const int dy = aug->random_crop ? static_cast<int>(bounded(r, span)) : 0;
    const int dx = aug->random_crop ? static_cast<int>(bounded(hash64(r, 1), span)) : 0;
    const bool flip = aug->hflip && ((r >> 7) & 1);
    crop_flip(src + j * per, dst + i * per, s.c, s.h, s.w, pad, dy, dx, flip);
  }
}

}  // namespace pipar::data
