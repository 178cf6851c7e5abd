// Test entry point: prints the seed every randomized test derives from (PIPAR_TEST_SEED reproduces it).
#include <gtest/gtest.h>

#include "tests/random.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
