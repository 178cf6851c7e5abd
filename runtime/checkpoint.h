// Checkpoints: a model's weights, optimizer state and training position in one binary file, written
// atomically (temp file, fsync, rename). Format (little-endian), version 2:
//   "PIPARCKP" (8 bytes) | u32 version | u32 meta_len | meta: UTF-8 JSON (model, options, epoch, ...)
//   | u32 tensor_count | tensor_count × { u16 name_len | name | u8 kind (0 weight, 1 momentum,
//   2 buffer, 3 state) | 4 × i64 shape (n, c, h, w) | n*c*h*w × f32 } | u32 CRC-32 (zlib) of all bytes before it
// Kinds 0-2 are the model's own tensors, each exactly once. Kind 3 (new in version 2) is state kept
// beside the model, named freely (unique), e.g. a distributed server's per-device optimizer state.
// Version 1 is version 2 without kind-3 records; files of either version are read.
#pragma once
#include <string>
#include <vector>

#include "runtime/model.h"

namespace pipar {

struct CheckpointMeta {
  std::string model;
  ModelOptions options;
  int epoch = 0;                // epochs completed
  std::string extra_json = "{}";  // free-form JSON object (training configuration, optimizer settings)
};

constexpr uint32_t kCheckpointVersion = 2;   // written; versions 1 and 2 are read

// A kind-3 record: state beside the model's tensors (CPU, f32).
struct CheckpointState {
  std::string name;
  Tensor value;
};

// Writes bytes to path atomically: a temp file beside it, fsync, rename (parent directories created).
// `what` names the file in errors ("checkpoint", "privacy journal").
void write_file_atomically(const std::string& path, const std::string& bytes, const std::string& what);

void save_checkpoint(const std::string& path, Model& model, const CheckpointMeta& meta,
                     const std::vector<CheckpointState>& state = {});
// Reads only the header and metadata (to build the right model before loading). The metadata is checked
// before use: integer fields must be integers, the input shape, class count and width stay within fixed
// limits and its JSON nests at most 64 levels; anything else is a pipar::IoError.
CheckpointMeta read_checkpoint_meta(const std::string& path);
// Loads weights, momentum and buffers into a model built from the same meta. A missing, truncated or
// corrupt file, a checksum mismatch or a tensor that does not match the model throws pipar::IoError.
// The kind-3 records go to *state when given (in file order), else they are skipped; their shapes are
// checked against the file's size and their names must be unique.
CheckpointMeta load_checkpoint(const std::string& path, Model& model, std::vector<CheckpointState>* state = nullptr);

}  // namespace pipar
