// The kernel-choice cache (kernels/kernel_cache.h): round trip through the file, merging with entries
// another process wrote, and damaged or unwritable files degrading to a warning, never a failure.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "kernels/error.h"
#include "kernels/kernel_cache.h"
#include "tests/scratch.h"

namespace pipar::kernels {
namespace {

namespace fs = std::filesystem;

std::string temp_file(const std::string& name) {
  const fs::path d = test::scratch_dir("kernel_cache", "");
  fs::remove(d / name);
  return (d / name).string();
}

TEST(KernelCache, RoundTripsThroughItsFile) {
  const std::string path = temp_file("a/b/kernels.tsv");  // directories created on the first write
  {
    KernelCache c(path);
    EXPECT_TRUE(c.entries().empty());
    EXPECT_FALSE(c.get("conv.fwd|x=10,64,7,7").has_value());
    c.put("conv.fwd|x=10,64,7,7", "cudnn:1 0.0123");
    c.put("linear.bwd_w|x=10,3136", "cublas 0.004");
    c.put("conv.fwd|x=10,64,7,7", "handwritten 0.010");  // a later measurement replaces the entry
  }
  KernelCache again(path);
  EXPECT_EQ(again.entries().size(), 2u);
  EXPECT_EQ(again.get("conv.fwd|x=10,64,7,7").value_or(""), "handwritten 0.010");
  EXPECT_EQ(again.get("linear.bwd_w|x=10,3136").value_or(""), "cublas 0.004");
  std::ifstream f(path);
  std::string first;
  std::getline(f, first);
  EXPECT_EQ(first, "# pipar kernel cache v1");
}

TEST(KernelCache, MergesWhatAnotherProcessWrote) {
  const std::string path = temp_file("merge.tsv");
  KernelCache a(path), b(path);  // both loaded while the file was empty
  a.put("k1", "v1");
  b.put("k2", "v2");  // must not drop k1, which a wrote after b had read the file
  KernelCache c(path);
  EXPECT_EQ(c.get("k1").value_or(""), "v1");
  EXPECT_EQ(c.get("k2").value_or(""), "v2");
}

TEST(KernelCache, DamagedFilesAreReadAsFarAsTheyAreValid) {
  const std::string path = temp_file("damaged.tsv");
  {
    std::ofstream f(path);
    f << "# pipar kernel cache v1\ngood\tone\n\nbad line without a tab\nlater\ttwo\n";
  }
  KernelCache c(path);
  EXPECT_EQ(c.get("good").value_or(""), "one");
  EXPECT_FALSE(c.get("later").has_value());
  {
    std::ofstream f(path);
    f << "something else\nk\tv\n";
  }
  EXPECT_TRUE(KernelCache(path).entries().empty());
  {
    std::ofstream f(path, std::ios::binary);
    f << std::string("\0\xff\t\x01", 4);
  }
  EXPECT_TRUE(KernelCache(path).entries().empty());
}

TEST(KernelCache, UnwritableFileKeepsTheEntryInMemory) {
  KernelCache c("/proc/pipar-no-such-dir/kernels.tsv");
  EXPECT_NO_THROW(c.put("k", "v"));
  EXPECT_EQ(c.get("k").value_or(""), "v");
  KernelCache memory("");
  memory.put("k", "v");
  EXPECT_EQ(memory.get("k").value_or(""), "v");
}

TEST(KernelCache, KeysAndValuesMustFitTheFormat) {
  KernelCache c("");
  EXPECT_THROW(c.put("a\tb", "v"), Error);
  EXPECT_THROW(c.put("k", "v\nw"), Error);
  EXPECT_THROW(c.put("", "v"), Error);
}

TEST(KernelCache, DefaultPathFollowsTheEnvironment) {
  const char* saved = std::getenv("PIPAR_KERNEL_CACHE");
  const std::string keep = saved ? saved : "";
  setenv("PIPAR_KERNEL_CACHE", "/tmp/x/kernels.tsv", 1);
  EXPECT_EQ(KernelCache::default_path(), "/tmp/x/kernels.tsv");
  unsetenv("PIPAR_KERNEL_CACHE");
  EXPECT_NE(KernelCache::default_path().find("pipar/kernels.tsv"), std::string::npos);
  if (saved) setenv("PIPAR_KERNEL_CACHE", keep.c_str(), 1);
}

}  // namespace
}  // namespace pipar::kernels
