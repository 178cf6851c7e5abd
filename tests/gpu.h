// Skip helper for GPU tests: every CUDA test body starts with PIPAR_REQUIRE_CUDA(), which skips it
// (with the reason) where the build has no CUDA ops or no CUDA device is usable.
#pragma once
#include <gtest/gtest.h>

#include <string>

#include "kernels/device.h"

namespace pipar::test {

// "" when the CUDA backend is built and a device is usable, else why not.
inline std::string cuda_unavailable_reason() {
  if (!kernels::cuda_built()) return "built without CUDA (PIPAR_CUDA=OFF or no nvcc at configure time)";
  if (!kernels::cuda_ops_built()) return "the CUDA ops are not built (PIPAR_CUDA_OPS=0)";
  return kernels::cuda_unavailable_reason();
}

}  // namespace pipar::test

#define PIPAR_REQUIRE_CUDA()                                                              \
  do {                                                                                    \
    if (const std::string pipar_reason_ = ::pipar::test::cuda_unavailable_reason();       \
        !pipar_reason_.empty())                                                           \
      GTEST_SKIP() << "no usable CUDA: " << pipar_reason_;                                \
  } while (0)
