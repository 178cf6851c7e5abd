// libFuzzer target: the IDX reader (raw and gzip) and the MNIST-format loader on hostile files.
// Byte 0 picks what runs: bit 0 clear → read_idx(rest, rank = bits 1-2 + 1); bit 0 set → the rest is
// u32 LE length L, L bytes of train-images-idx3-ubyte, then train-labels-idx1-ubyte, and
// load_mnist_like() reads the pair. Bit 3 set: each file is written gzip-compressed (so the fuzzer
// mutates what the gzip stream holds, not only its compressed bytes), and with bit 4 also set, the
// compressed file loses its last 9 bytes (a truncated stream). pipar::Error is the expected rejection;
// anything else is a bug.
#include <zlib.h>

#include <algorithm>
#include <filesystem>

#include "kernels/error.h"
#include "runtime/data.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

void write_file(const std::string& name, const uint8_t* data, size_t size, uint8_t mode) {
  if (!(mode & 8)) {
    pipar::fuzz::write_scratch(name, data, size);
    return;
  }
  std::vector<uint8_t> gz(compressBound(static_cast<uLong>(size)) + 64);
  z_stream z{};
  if (deflateInit2(&z, 1, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) std::abort();  // gzip wrapper
  z.next_in = const_cast<Bytef*>(data);
  z.avail_in = static_cast<uInt>(size);
  z.next_out = gz.data();
  z.avail_out = static_cast<uInt>(gz.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END) std::abort();
  size_t out = z.total_out;
  deflateEnd(&z);
  if (mode & 16) out -= std::min<size_t>(out, 9);
  pipar::fuzz::write_scratch(name, gz.data(), out);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  ++data, --size;
  try {
    if ((mode & 1) == 0) {
      write_file("fuzz.idx", data, size, mode);
      const std::string path = (pipar::fuzz::scratch_dir() / "fuzz.idx").string();
      const int rank = ((mode >> 1) & 3) + 1;
      const pipar::data::IdxArray a = pipar::data::read_idx(path, rank);
      uint64_t n = 1;
      for (int64_t d : a.dims) n *= static_cast<uint64_t>(d);
      if (a.dims.size() != static_cast<size_t>(rank) || a.data.size() != n) std::abort();
    } else {
      if (size < 4) return 0;
      const size_t len = std::min<size_t>(pipar::fuzz::load_le32(data), size - 4);
      write_file("train-images-idx3-ubyte", data + 4, len, mode);
      write_file("train-labels-idx1-ubyte", data + 4 + len, size - 4 - len, mode);
      const pipar::data::Dataset ds = pipar::data::load_mnist_like(pipar::fuzz::scratch_dir().string(), true, "mnist");
      if (ds.images.shape().n != ds.size()) std::abort();
    }
  } catch (const pipar::Error&) {
  }
  return 0;
}
