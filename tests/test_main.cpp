// Test entry point: prints the seed every randomized test derives from (PIPAR_TEST_SEED reproduces it),
// and removes the process's scratch directory (tests/scratch.h) when every test passed.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <system_error>

#include "tests/random.h"
#include "tests/scratch.h"

namespace {

class Scratch : public ::testing::Environment {
 public:
  void TearDown() override {
    const std::filesystem::path root = pipar::test::scratch_root();
    std::error_code ec;
    if (!std::filesystem::exists(root, ec)) return;
    if (::testing::UnitTest::GetInstance()->Passed()) {
      std::filesystem::remove_all(root, ec);
    } else {
      std::fprintf(stderr, "test files kept in %s\n", root.c_str());
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::AddGlobalTestEnvironment(new Scratch);  // gtest owns it
  return RUN_ALL_TESTS();
}
