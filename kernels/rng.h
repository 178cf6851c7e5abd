// Counter-based random numbers shared by host and device code: the value for (seed, index) is the
// same on every backend and thread count, so dropout masks and synthetic data agree bit for bit.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PIPAR_HOST_DEVICE __host__ __device__
#else
#define PIPAR_HOST_DEVICE
#endif

namespace pipar {

// splitmix64 finalizer of (seed, index): a well-mixed 64-bit value.
PIPAR_HOST_DEVICE inline uint64_t hash64(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform float in [0, 1) with 24 random bits.
PIPAR_HOST_DEVICE inline float uniform01(uint64_t seed, uint64_t index) {
  return static_cast<float>(hash64(seed, index) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace pipar
