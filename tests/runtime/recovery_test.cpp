// Crash recovery with real processes (the pipar binary): a server killed with SIGKILL in the middle of
// a round and restarted with --resume goes on from its last finished round, its devices reconnect by
// themselves, and the run ends exactly as one that was never interrupted; a device killed in the
// middle of a round and restarted rejoins at the next round.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "tests/runtime/process_util.h"
#include "tests/scratch.h"

namespace {

using pipar::test::spawn;
using pipar::test::wait_exit;

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::string temp_dir(const std::string& name) {
  return pipar::test::scratch_dir("recovery", name, /*fresh=*/true);
}

// A loopback port free now (bound to port 0 and released): the restarted server must bind the same one.
int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  close(fd);
  return ntohs(a.sin_port);
}

int lines(const std::string& path) {
  std::ifstream f(path);
  int n = 0;
  for (std::string l; std::getline(f, l);) n += !l.empty();
  return n;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

std::vector<nlohmann::json> metrics(const std::string& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> out;
  for (std::string l; std::getline(f, l);)
    if (!l.empty()) out.push_back(nlohmann::json::parse(l));
  return out;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// The run both ways: sfl, 2 devices, 4 rounds on 1200 Fashion-MNIST images, unshaped loopback links.
std::vector<std::string> server_args(int port, const std::string& out) {
  return {"server", "--listen", "tcp://127.0.0.1:" + std::to_string(port), "--insecure", "--mode", "sfl", "--model",
          "vgg5", "--dataset", "fmnist", "--limit-train", "1200", "--limit-test", "1000", "--epochs", "4",
          "--batch-size", "25", "--devices", "2", "--split", "2", "--threads", "1", "--uplink-mbps", "0",
          "--downlink-mbps", "0", "--seed", "5", "--out", out};
}
std::vector<std::string> device_args(int port, int id) {
  return {"device", "--connect", "tcp://127.0.0.1:" + std::to_string(port), "--id", std::to_string(id), "--threads", "1",
          "--insecure", "--timeout", "5", "--reconnect", "120"};
}

TEST(Recovery, ServerKilledMidRoundResumesAndDevicesReconnect) {
  if (!fs::exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "needs Debian's dataset-fashion-mnist (install.sh installs it)";
  // Uninterrupted reference.
  const std::string ref = temp_dir("reference");
  {
    const int port = free_port();
    ASSERT_GT(port, 0);
    const pid_t s = spawn(server_args(port, ref), ref + "/log");
    const pid_t d0 = spawn(device_args(port, 0), ref + "/log"), d1 = spawn(device_args(port, 1), ref + "/log");
    ASSERT_EQ(wait_exit(s, 240), 0) << slurp(ref + "/log");
    EXPECT_EQ(wait_exit(d0, 30), 0) << slurp(ref + "/log");
    EXPECT_EQ(wait_exit(d1, 30), 0) << slurp(ref + "/log");
  }

  // Killed after its first round, in the second, and restarted with --resume; the devices stay up.
  const std::string out = temp_dir("killed");
  const int port = free_port();
  ASSERT_GT(port, 0);
  const std::string log = out + "/log";
  const pid_t d0 = spawn(device_args(port, 0), log), d1 = spawn(device_args(port, 1), log);
  pid_t s = spawn(server_args(port, out), log);
  const auto deadline = Clock::now() + std::chrono::seconds(240);
  while (lines(out + "/metrics.jsonl") < 1 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_EQ(lines(out + "/metrics.jsonl"), 1) << slurp(log);
  ASSERT_TRUE(fs::exists(out + "/server.ckpt"));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // into round 2
  ASSERT_EQ(kill(s, SIGKILL), 0);
  waitpid(s, nullptr, 0);
  EXPECT_EQ(lines(out + "/metrics.jsonl"), 1) << "round 2 finished before the kill: not a mid-round crash";

  std::vector<std::string> again = server_args(port, out);
  again.push_back("--resume");
  s = spawn(again, log);
  ASSERT_EQ(wait_exit(s, 240), 0) << slurp(log);
  EXPECT_EQ(wait_exit(d0, 30), 0) << slurp(log);
  EXPECT_EQ(wait_exit(d1, 30), 0) << slurp(log);
  const std::string text = slurp(log);
  EXPECT_NE(text.find("resuming from"), std::string::npos) << text;
  EXPECT_NE(text.find("reconnecting in"), std::string::npos) << text;
  EXPECT_NE(text.find("momentum tensors of the server-side replicas"), std::string::npos) << text;

  // Rounds 1 (before the kill) and 2-4 (after), once each, and exactly as without the crash (every
  // round's losses and accuracies, bitwise): the restarted server restores all it carried from round 1
  // (the model, each replica's momentum), the devices roll their momentum back to the start of round 2,
  // which they had begun, and each process runs one thread, so every sum runs in the same order.
  const std::vector<nlohmann::json> a = metrics(ref + "/metrics.jsonl"), b = metrics(out + "/metrics.jsonl");
  std::vector<int> rounds;
  for (const auto& l : b) rounds.push_back(l.at("epoch").get<int>());
  EXPECT_EQ(rounds, (std::vector<int>{1, 2, 3, 4}));
  ASSERT_EQ(a.size(), b.size());
  for (size_t r = 0; r < a.size(); ++r)
    for (const char* key : {"train_loss", "train_accuracy", "test_loss", "test_accuracy"})
      EXPECT_EQ(a[r].at(key), b[r].at(key)) << "round " << r + 1 << " " << key;
  const double acc = read_json(ref + "/summary.json").at("test_accuracy");
  EXPECT_GT(acc, 0.6);
  EXPECT_EQ(read_json(out + "/summary.json").at("test_accuracy").get<double>(), acc);
}

// Device 1 killed with SIGKILL in the middle of round 2 and started again at once: the server hears
// its new hello, takes it out of round 2 (which ends with device 0 alone) and gives it rounds 3 and 4.
TEST(Recovery, DeviceKilledAndRestartedRejoinsAtTheNextRound) {
  if (!fs::exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "needs Debian's dataset-fashion-mnist (install.sh installs it)";
  const std::string out = temp_dir("device_killed");
  const int port = free_port();
  ASSERT_GT(port, 0);
  const std::string log = out + "/log";
  const pid_t s = spawn(server_args(port, out), log);
  const pid_t d0 = spawn(device_args(port, 0), log);
  pid_t d1 = spawn(device_args(port, 1), log);
  const auto deadline = Clock::now() + std::chrono::seconds(240);
  while (lines(out + "/metrics.jsonl") < 1 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_EQ(lines(out + "/metrics.jsonl"), 1) << slurp(log);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // into round 2
  ASSERT_EQ(kill(d1, SIGKILL), 0);
  waitpid(d1, nullptr, 0);
  EXPECT_EQ(lines(out + "/metrics.jsonl"), 1) << "round 2 finished before the kill: not a mid-round crash";
  d1 = spawn(device_args(port, 1), log);
  ASSERT_EQ(wait_exit(s, 240), 0) << slurp(log);
  EXPECT_EQ(wait_exit(d0, 30), 0) << slurp(log);
  EXPECT_EQ(wait_exit(d1, 30), 0) << slurp(log);
  const std::string text = slurp(log);
  EXPECT_NE(text.find("device 1 restarted in the middle of the round"), std::string::npos) << text;

  const std::vector<nlohmann::json> m = metrics(out + "/metrics.jsonl");
  ASSERT_EQ(m.size(), 4u) << text;
  std::vector<int> finished;
  for (const auto& l : m) finished.push_back(l.at("devices_finished").get<int>());
  EXPECT_EQ(finished, (std::vector<int>{2, 1, 2, 2}));
  EXPECT_GT(read_json(out + "/summary.json").at("test_accuracy").get<double>(), 0.6);
}

}  // namespace
