// Scratch files of tests: one directory per test process, <temp>/pipar_tests_<pid>, that test_main.cpp
// removes when every test of the process passed and keeps (naming it) when one failed. Distributed
// runs leave checkpoints and traces of hundreds of MiB; left behind by every ctest process they had
// filled a development machine's disk.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <string>

namespace pipar::test {

inline std::filesystem::path scratch_root() {
  return std::filesystem::temp_directory_path() / ("pipar_tests_" + std::to_string(::getpid()));
}

// <root>/<group>/<name>, created (empty where `fresh`).
inline std::string scratch_dir(const std::string& group, const std::string& name, bool fresh = false) {
  const std::filesystem::path d = scratch_root() / group / name;
  if (fresh) std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}

}  // namespace pipar::test
