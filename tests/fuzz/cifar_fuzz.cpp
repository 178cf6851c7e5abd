// libFuzzer target: the CIFAR-10 binary reader on a hostile file, via load_cifar10(dir, train=false)
// (test_batch.bin; also covers the directory lookup) and read_cifar10_files() on the same file twice.
// pipar::Error is the expected rejection; anything else is a bug.
#include "kernels/error.h"
#include "runtime/data.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = pipar::fuzz::write_scratch("test_batch.bin", data, size);
  try {
    const pipar::data::Dataset ds = pipar::data::load_cifar10(pipar::fuzz::scratch_dir().string(), false);
    if (ds.images.shape().n != ds.size() || ds.size() * 3073 != static_cast<int64_t>(size)) std::abort();
  } catch (const pipar::Error&) {
  }
  try {
    (void)pipar::data::read_cifar10_files({path, path});
  } catch (const pipar::Error&) {
  }
  return 0;
}
