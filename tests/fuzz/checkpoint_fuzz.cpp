// libFuzzer target: read_checkpoint_meta() and load_checkpoint() on hostile files. Each input is tried
// as it is and with its last 4 bytes replaced by the right CRC-32 (so the fuzzer gets past the
// checksum into the metadata and tensor records). load_checkpoint fills a tiny fixed model, the one
// make_seeds saves (seed_model.h), and reads the state records beside it; a load that succeeds must
// have filled every one of the model's tensors.
// pipar::Error is the expected rejection; anything else is a bug.
#include <zlib.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "runtime/checkpoint.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/seed_model.h"

namespace {

// The storage of every tensor a checkpoint fills (load_checkpoint gives each a new one).
std::vector<const void*> storages(pipar::Model& model) {
  std::vector<const void*> out;
  for (pipar::Param* p : model.params()) out.push_back(p->value.raw()), out.push_back(p->momentum.raw());
  for (const pipar::Buffer& b : model.buffers()) out.push_back(b.value->raw());
  return out;
}

void try_file(const std::vector<uint8_t>& bytes, pipar::Model& model) {
  const std::string path = pipar::fuzz::write_scratch("fuzz.ckpt", bytes.data(), bytes.size());
  try {
    (void)pipar::read_checkpoint_meta(path);
  } catch (const pipar::Error&) {
  }
  const std::vector<const void*> before = storages(model);
  std::vector<pipar::CheckpointState> state;  // version 2's state records, read in full
  try {
    (void)pipar::load_checkpoint(path, model, &state);
  } catch (const pipar::Error&) {
    return;
  }
  // A load that succeeds has filled every tensor of the model (none left as it was).
  const std::vector<const void*> after = storages(model);
  for (size_t i = 0; i < before.size(); ++i)
    if (after[i] == before[i]) {
      std::fprintf(stderr, "load_checkpoint succeeded but left tensor %zu of the model unloaded\n", i);
      std::abort();
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::unique_ptr<pipar::Model> model = pipar::fuzz::seed_model();
  std::vector<uint8_t> bytes(data, data + size);
  try_file(bytes, *model);
  if (size >= 4) {
    const uint32_t crc = static_cast<uint32_t>(crc32(0L, bytes.data(), static_cast<uInt>(size - 4)));
    std::memcpy(bytes.data() + size - 4, &crc, 4);
    try_file(bytes, *model);
  }
  return 0;
}
