// The tiny model behind the checkpoint fuzz target and its seed: vgg5 on 1x4x4 inputs, 3 classes,
// width 1/16 (4 channels per conv, 8 hidden units: ~500 parameters, so a checkpoint is ~5 KB).
#pragma once
#include <memory>

#include "runtime/model.h"

namespace pipar::fuzz {

inline ModelOptions seed_model_options() {
  ModelOptions o;
  o.input = {1, 1, 4, 4};
  o.num_classes = 3;
  o.width = 0.0625f;
  o.seed = 7;
  return o;
}
inline std::unique_ptr<Model> seed_model() { return build_model("vgg5", seed_model_options()); }

}  // namespace pipar::fuzz
