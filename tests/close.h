// Closeness of two result vectors, for tests that compare backends (CUDA against the CPU).
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

namespace pipar::test {

// ||a - b|| / ||b|| over two equally long vectors (b's norm floored at 1e-12).
inline double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]), n += double(b[i]) * b[i];
  return std::sqrt(d) / std::max(std::sqrt(n), 1e-12);
}

}  // namespace pipar::test
