// Skip helper for GPU tests: every CUDA test body starts with PIPAR_REQUIRE_CUDA(), which skips it
// (with the reason) where the build has no CUDA ops or no CUDA device is usable. On the GPU machine
// .ci/gpu sets PIPAR_TESTS_REQUIRE_GPU=1, and the same reason fails the test instead: a GPU run whose
// tests skipped would look green without having run anything.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "kernels/device.h"

namespace pipar::test {

// "" when the CUDA backend is built and a device is usable, else why not.
inline std::string cuda_unavailable_reason() {
  if (!kernels::cuda_built()) return "built without CUDA (PIPAR_CUDA=OFF or no nvcc at configure time)";
  if (!kernels::cuda_ops_built()) return "the CUDA ops are not built (PIPAR_CUDA_OPS=0)";
  return kernels::cuda_unavailable_reason();
}

// PIPAR_TESTS_REQUIRE_GPU=1 (set by .ci/gpu): a GPU test that cannot run fails instead of skipping.
inline bool gpu_required() {
  const char* v = std::getenv("PIPAR_TESTS_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

}  // namespace pipar::test

#define PIPAR_REQUIRE_CUDA()                                                              \
  do {                                                                                    \
    if (const std::string pipar_reason_ = ::pipar::test::cuda_unavailable_reason();       \
        !pipar_reason_.empty())                                                           \
    {                                                                                     \
      if (::pipar::test::gpu_required()) FAIL() << "PIPAR_TESTS_REQUIRE_GPU is set, but no usable CUDA: " \
                                                 << pipar_reason_;                        \
      GTEST_SKIP() << "no usable CUDA: " << pipar_reason_;                                \
    }                                                                                     \
  } while (0)
