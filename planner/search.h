// Selection: the split point(s) P and micro-batch count N with the smallest predicted time, within
// memory limits. Every shared (P, N) is scored with the cost model's cheap round estimate; per-device
// split points are then refined by coordinate descent from the best shared plans; the leaders are
// re-scored with the exact round simulation and ranked.
#pragma once
#include <limits>
#include <string>
#include <vector>

#include "planner/cost_model.h"

namespace pipar::planner {

struct Plan {
  Mode mode = Mode::kPipar;
  std::vector<int> split;      // per device split point (all equal for a shared plan); empty for fl
  int micro_batches = 1;       // N (1 for sfl, sl, fl)
  double batch_s = 0;          // predicted: one batch of every device, starting together
  double round_s = 0;          // predicted: a whole round (weights down, all batches, weights up)
  std::string bottleneck;      // busiest resource over the round: "server", "device 2 uplink", ...
  double bottleneck_busy_s = 0;
  int64_t device_memory_bytes = 0;  // the largest device's estimate
  int64_t server_memory_bytes = 0;

  bool shared_split() const;   // every device splits at the same block
  std::string label() const;     // "pipar P=2 N=8"
  std::string describe() const;  // "pipar P=2 N=8: batch 0.123 s, round 4.56 s, bottleneck server"
  std::string to_json() const;   // {"mode","split":[..],"micro_batches","batch_s","round_s","bottleneck",...}
  static Plan from_json(const std::string& text);  // what to_json wrote; throws pipar::Error otherwise
};

struct SearchOptions {
  Mode mode = Mode::kPipar;
  std::vector<int> splits;          // candidate split points; empty: 1..B-1
  std::vector<int> micro_batches;   // candidate N (pipar); empty: 1..min(batch, 64)
  bool per_device_split = true;     // refine split points per device (heterogeneous devices)
  int descent_starts = 2;           // best shared plans (distinct P) that coordinate descent starts from
  double device_memory_limit = std::numeric_limits<double>::infinity();  // bytes, every device
  double server_memory_limit = std::numeric_limits<double>::infinity();  // bytes
  size_t runners_up = 5;            // plans ranked after the best
  size_t exact_rescore = 12;        // leaders re-scored with the exact round simulation
  // pipar: a plan with more micro-batches is chosen over one with fewer only when it is predicted
  // faster by more than this fraction: a tie-break below the cost model's resolution (every
  // micro-batch adds messages, smaller kernels and batch-norm updates on fewer samples). 2%, as the
  // re-planner's min_gain: a 5% margin, measured against none on the CPU test bed, gained nothing
  // there (bench/RESULTS.md, the paper's experiment on this CPU). 0: the fastest predicted.
  double micro_batch_margin = 0.02;
};

struct SearchResult {
  Plan best;
  std::vector<Plan> ranked;   // best first, then the runners-up (distinct plans), by round_s
  int evaluated = 0;          // cost-model evaluations
  // Where micro_batch_margin kept a plan of fewer micro-batches over a faster-predicted one: says which
  // and by how much ("kept P=2 N=1 over P=2 N=2, predicted 1.6% faster: under the 5% margin ..."); else empty.
  std::string margin_note;
  double seconds = 0;         // search time
};

// What to try when no plan fits the memory limits: the options every such error names (search's, the
// server's for a fixed plan).
std::string memory_options(const Cluster& cluster, Mode mode);

// Whether a choice of more concurrency (more server lanes) predicted to take candidate_s is worth it
// over the current one's current_s: faster by more than `margin` (a fraction; TrainConfig::plan_margin).
bool gains_beyond(double candidate_s, double current_s, double margin);

// Fills a plan's predicted times, bottleneck and memory from the cost model.
Plan evaluate_plan(const CostModel& model, Mode mode, std::vector<int> split, int micro_batches);
// The best plan of options.mode. Throws pipar::Error when no candidate fits the memory limits
// (naming the smallest need found).
SearchResult search(const CostModel& model, const SearchOptions& options = {});
// The best plan of every mode (pipar, sfl, sl, fl) that fits the memory limits, fastest first.
std::vector<Plan> compare_modes(const CostModel& model, const SearchOptions& options = {});

}  // namespace pipar::planner
