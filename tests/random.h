// Seeded random inputs for tests: a fresh seed each run unless PIPAR_TEST_SEED is set; every test
// prints its seed on failure (use SCOPED_TRACE(seed_trace())) so a failure can be reproduced.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace pipar::test {

// The base seed of this process: PIPAR_TEST_SEED, or the clock.
inline uint64_t base_seed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("PIPAR_TEST_SEED")) return static_cast<uint64_t>(std::strtoull(s, nullptr, 10));
    return static_cast<uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count() % 1000000007);
  }();
  return seed;
}
inline std::string seed_trace() { return "PIPAR_TEST_SEED=" + std::to_string(base_seed()); }

class Rng {
 public:
  explicit Rng(uint64_t salt = 0) : gen_(base_seed() * 6364136223846793005ull + salt) {}
  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen_); }
  int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen_); }  // inclusive
  std::vector<float> uniform_vec(size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform(lo, hi);
    return v;
  }
  // Small integers, so that sums of products are exact in float32 (exact-comparison tests).
  std::vector<float> small_int_vec(size_t n, int lo = -3, int hi = 3) {
    std::vector<float> v(n);
    for (auto& x : v) x = static_cast<float>(integer(lo, hi));
    return v;
  }
  std::mt19937_64& engine() { return gen_; }

 private:
  std::mt19937_64 gen_;
};

}  // namespace pipar::test
