// Synthetic profiles for the planner tests: per-sample block times that are exactly affine in the
// micro-batch size (so interpolation is exact), chosen byte counts, no measurement.
#pragma once
#include <string>
#include <vector>

#include "planner/profile.h"

namespace pipar::planner::test {

struct SyntheticBlock {
  double forward_per_sample = 0;   // seconds per sample
  double backward_per_sample = 0;
  int64_t out_floats = 1;          // per-sample output floats
  double fixed = 0;                // seconds per call, independent of the size
  double step = 0;                 // SGD step seconds
  int64_t params = 0;
};

inline Profile synthetic_profile(const std::vector<SyntheticBlock>& blocks, const std::string& model = "synthetic") {
  Profile p;
  p.model = model;
  p.source = "synthetic";
  p.threads = 1;
  p.sizes = {1, 100};
  p.loss_s = {0, 0};
  for (const SyntheticBlock& s : blocks) {
    BlockProfile b;
    b.kind = "conv";
    for (int64_t m : p.sizes) {
      b.forward_s.push_back(s.fixed + s.forward_per_sample * static_cast<double>(m));
      b.backward_s.push_back(s.fixed + s.backward_per_sample * static_cast<double>(m));
    }
    b.step_s = s.step;
    b.params = s.params;
    b.out_floats = s.out_floats;
    b.tape_bytes = s.out_floats * 4;
    p.blocks.push_back(b);
  }
  return p;
}

}  // namespace pipar::planner::test
