// Test helpers for runs of the pipar binary as processes of their own: start one, wait for its exit.
#pragma once
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace pipar::test {

// Starts the pipar binary with args, its output into log (appended).
inline pid_t spawn(const std::vector<std::string>& args, const std::string& log) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  std::vector<std::string> all = {PIPAR_BINARY};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  if (FILE* f = std::fopen(log.c_str(), "a")) {
    dup2(fileno(f), 1);
    dup2(fileno(f), 2);
  }
  execv(PIPAR_BINARY, argv.data());
  _exit(127);
}

// Exit code of pid, waiting at most `seconds` (then it is killed and -1 returned).
inline int wait_exit(pid_t pid, double seconds) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  return -1;
}

}  // namespace pipar::test
