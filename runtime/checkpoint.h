// Checkpoints: a model's weights, optimizer state and training position in one binary file, written
// atomically (temp file, fsync, rename). Format (little-endian), version 1:
//   "PIPARCKP" (8 bytes) | u32 version | u32 meta_len | meta: UTF-8 JSON (model, options, epoch, ...)
//   | u32 tensor_count | tensor_count × { u16 name_len | name | u8 kind (0 weight, 1 momentum,
//   2 buffer) | 4 × i64 shape (n, c, h, w) | n*c*h*w × f32 } | u32 CRC-32 (zlib) of all bytes before it
#pragma once
#include <string>

#include "runtime/model.h"

namespace pipar {

struct CheckpointMeta {
  std::string model;
  ModelOptions options;
  int epoch = 0;                // epochs completed
  std::string extra_json = "{}";  // free-form JSON object (training configuration, optimizer settings)
};

constexpr uint32_t kCheckpointVersion = 1;

void save_checkpoint(const std::string& path, Model& model, const CheckpointMeta& meta);
// Reads only the header and metadata (to build the right model before loading). The metadata is checked
// before use: integer fields must be integers, the input shape, class count and width stay within fixed
// limits and its JSON nests at most 64 levels; anything else is a pipar::IoError.
CheckpointMeta read_checkpoint_meta(const std::string& path);
// Loads weights, momentum and buffers into a model built from the same meta. A missing, truncated or
// corrupt file, a checksum mismatch or a tensor that does not match the model throws pipar::IoError.
CheckpointMeta load_checkpoint(const std::string& path, Model& model);

}  // namespace pipar
