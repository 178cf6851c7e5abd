// The pipar program as a user runs it: a distributed run launched by `pipar train` (real device
// processes on loopback), and clear failures for bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "kernels/device.h"
#include "tests/scratch.h"

namespace {

namespace fs = std::filesystem;

struct Outcome {
  int code;
  std::string output;
};

Outcome run(const std::string& args) {
  const std::string cmd = std::string(PIPAR_BINARY) + " " + args + " 2>&1";
  Outcome r{-1, ""};
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) r.output.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string temp_dir(const std::string& name) {
  return pipar::test::scratch_dir("cli", name);
}

TEST(Cli, TrainLaunchesDeviceProcesses) {
  const std::string out = temp_dir("pipar");
  const Outcome r = run("train --mode pipar --devices 2 --dataset synthetic --limit-train 400 --limit-test 100 --epochs 1 "
                    "--split 2 --micro-batches 3 --batch-size 50 --uplink-mbps 0 --downlink-mbps 0 --out " + out);
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(out + "/summary.json")) << r.output;
  EXPECT_TRUE(fs::exists(out + "/trace.json")) << r.output;
  EXPECT_EQ(r.output.find("WARNING"), std::string::npos) << "loopback runs need no plain-link warning";
}

// A server whose devices run beside it (pipar server --shared-cores) plans for the shared cores, as
// pipar train does for the devices it launches.
TEST(Cli, ServerPlansForDevicesThatShareItsCores) {
  const std::string dir = temp_dir("shared_cores"), bin = PIPAR_BINARY, ep = "ipc://" + dir + "/server.ipc";
  const std::string data = " --dataset synthetic --limit-train 200 --limit-test 50";
  const std::string cmd = "(" + bin + " server --insecure --listen " + ep + " --mode pipar --devices 2 --epochs 1 " +
                          "--batch-size 50 --uplink-mbps 0 --downlink-mbps 0 --shared-cores 2 --out " + dir + data +
                          " & for k in 0 1; do " + bin + " device --insecure --reconnect 0 --connect " + ep + " --id $k" +
                          " & done; wait) 2>&1";
  std::string output;
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) output.append(buf, n);
  pclose(p);
  EXPECT_TRUE(fs::exists(dir + "/summary.json")) << output;
  EXPECT_NE(output.find("planning for devices that share this machine's 2 cores with the server (1 thread(s) each; "
                        "their profiles alone, in CPU time)"),
            std::string::npos)
      << output;
  Outcome r = run("server --insecure --shared-cores -1 --devices 1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--shared-cores"), std::string::npos) << r.output;
  r = run("server --insecure --shared-cores 2 --devices 1 --device-profile-clock sundial");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--device-profile-clock"), std::string::npos) << r.output;
}

TEST(Cli, BadInputGivesClearErrors) {
  Outcome r = run("train --model nosuchnet --dataset synthetic --out " + temp_dir("bad"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("unknown model 'nosuchnet'"), std::string::npos) << r.output;
  r = run("train --dataset fmnist --data-dir /nonexistent/dir --out " + temp_dir("bad2"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("/nonexistent/dir"), std::string::npos) << r.output;
  r = run("server --listen tcp://127.0.0.1:0 --mode pipar --devices 2");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--insecure"), std::string::npos) << r.output;
  r = run("device --connect tcp://127.0.0.1:1 --id 0");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--keys"), std::string::npos) << r.output;
  // Private labels need a split mode, and a known value.
  r = run("train --mode local --labels private --dataset synthetic --out " + temp_dir("bad3"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("--labels private applies to --mode sl, sfl or pipar"), std::string::npos) << r.output;
  r = run("train --mode sfl --labels public --dataset synthetic --out " + temp_dir("bad4"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--labels"), std::string::npos) << r.output;
  // --backend cuda where no GPU is usable: a clear refusal in every mode, not a silent CPU run.
  if (!pipar::kernels::cuda_available() || !pipar::kernels::cuda_ops_built()) {
    for (const char* mode : {"pipar", "fl"}) {
      r = run(std::string("train --mode ") + mode + " --backend cuda --dataset synthetic --devices 1 --out " +
              temp_dir("bad5"));
      EXPECT_EQ(r.code, 1) << mode;
      EXPECT_NE(r.output.find("--backend cuda: "), std::string::npos) << r.output;
    }
  }
  r = run("plan --model vgg5 --plan-margin 2");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--plan-margin"), std::string::npos) << r.output;
  r = run("train --mode local --backend gpu --dataset synthetic --out " + temp_dir("bad6"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("unknown backend 'gpu'"), std::string::npos) << r.output;
}

// A plan that does not fit the server's memory is refused before training, naming the need, the
// limit and the options; `pipar plan` the same. Malformed --split and --micro-batches values too.
TEST(Cli, MemoryThatDoesNotFitIsRefusedWithOptions) {
  const std::string common = "--devices 2 --dataset synthetic --limit-train 400 --limit-test 100 --epochs 1 --batch-size 50 "
                             "--uplink-mbps 0 --downlink-mbps 0 --server-memory-gb 0.000001 ";
  Outcome r = run("train --mode pipar --split 2 --micro-batches 3 " + common + "--out " + temp_dir("mem_fixed"));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("MiB on the server for 2 devices"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--server-model shared"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--micro-batches"), std::string::npos) << r.output;
  r = run("train --mode sfl " + common + "--out " + temp_dir("mem_auto"));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("no plan fits the memory limits"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--server-model shared"), std::string::npos) << r.output;
  r = run("plan --model vgg5 --devices 4 --server-memory-gb 0.000001");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("no plan fits the memory limits"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("options:"), std::string::npos) << r.output;
  r = run("train --mode pipar --split 2,x --micro-batches 3 --devices 2 --out " + temp_dir("bad_split"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("--split: expected a whole number of at least 1 (or auto), got 'x'"), std::string::npos) << r.output;
  r = run("train --mode pipar --micro-batches 0 --out " + temp_dir("bad_micro"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("--micro-batches: expected a whole number"), std::string::npos) << r.output;
}

// pipar plan models the server's lanes as the server chooses them: given (--server-lanes L, on the
// server's threads / L each), or both ways and the faster kept; a shared server-side model has one.
TEST(Cli, PlanModelsTheServerLanes) {
  Outcome r = run("plan --model vgg5 --devices 4 --top 1 --threads 2 --server-lanes 2");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("(1 thread(s) per lane"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(", 2 server lanes"), std::string::npos) << r.output;
  r = run("plan --model vgg5 --devices 4 --top 1 --threads 2");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("1 server lane(s) of 2 thread(s): best round"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("2 server lane(s) of 1 thread(s): best round"), std::string::npos) << r.output;
  // The margin more micro-batches must gain: at 90%, one micro-batch is kept and the plan says so.
  r = run("plan --model vgg5 --devices 4 --top 2 --threads 2 --server-lanes 1 --uplink-mbps 100 --downlink-mbps 250 "
          "--plan-margin 0.9");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find(" 1. pipar P="), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" N=1: batch"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("N=1 over pipar P="), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("under the 90.0% margin"), std::string::npos) << r.output;
  r = run("plan --model vgg5 --devices 4 --top 1 --server-lanes 2 --server-model shared");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("one shared server-side model trains one micro-batch at a time"), std::string::npos) << r.output;
  // Stacked replicas: the stacks measured as such (5 devices in one stack), one split point.
  r = run("plan --model vgg5 --devices 5 --top 1 --threads 2 --server-batching stack");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("measured a stack of 5 replicas on this machine's cpu"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(", server replicas in stacks of up to 64"), std::string::npos) << r.output;
  r = run("plan --model vgg5 --devices 4 --top 1 --server-batching stack --server-model shared");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("--server-batching stack needs"), std::string::npos) << r.output;
  // A CUDA server's plan: profiled on this GPU; where there is none, said at once.
  if (!pipar::kernels::cuda_available() || !pipar::kernels::cuda_ops_built()) {
    r = run("plan --model vgg5 --devices 4 --top 1 --backend cuda");
    EXPECT_EQ(r.code, 1) << r.output;
    EXPECT_NE(r.output.find("--backend cuda: "), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("measured the device profile"), std::string::npos) << "the error comes first: " << r.output;
  } else {
    r = run("plan --model vgg5 --devices 4 --top 1 --backend cuda");
    EXPECT_EQ(r.code, 0) << r.output;
    EXPECT_NE(r.output.find("measured the server profile on this machine's cuda"), std::string::npos) << r.output;
  }
}

}  // namespace
