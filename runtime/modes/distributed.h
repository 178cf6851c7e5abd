// The distributed training modes: a server process and K device processes talking over the transport
// (ZeroMQ + flatbuffers, shaped links). fl: federated averaging of whole models; sl: sequential split
// learning (devices take turns through one server part); sfl: SplitFed (devices in parallel, one
// server-side replica each, whole batches); pipar: SplitFed with each batch cut into micro-batches
// whose device forward, uplink, server step, downlink and device backward overlap.
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "runtime/trainer.h"
#include "transport/auth.h"

namespace pipar {

struct NetConfig {
  std::string listen = "tcp://127.0.0.1:*";  // server endpoint; "*" port: chosen by the OS
  double uplink_mbps = 10;     // every device's uplink (0: unshaped)
  double downlink_mbps = 25;   // every device's downlink (0: unshaped)
  double latency_ms = 0;       // one-way, each direction
  double connect_timeout_s = 120;  // server: waiting for the devices' hellos
  double device_timeout_s = 60;    // a device silent this long is dropped from its round
  // (round, Mbit/s): from that round on every uplink runs at that rate (a changing network).
  std::vector<std::pair<int, double>> uplink_schedule;
  // Cross-device batching: after a micro-batch arrives, how long the server waits for other devices'
  // to train with it in one group (0: only those already arrived; a slow device never holds the rest).
  double group_wait_ms = 0;
  bool replan = true;  // with an automatic plan: re-plan at round boundaries when rates or speeds drift
  std::optional<transport::Security> security;  // CURVE keys and allow-list; unset: plain links
  // (optional) set by a launcher of device processes: "" while they run, else what went wrong, so
  // the server stops at once instead of waiting out its time-outs.
  std::function<std::string()> launched_devices_failed;
  // (optional) where the device processes run on this machine (pipar train's launcher, or pipar server
  // --shared-cores): their thread count. The planner then knows that the devices and the server share
  // this machine's cores.
  int launched_device_threads = 0;
  int shared_cores = -1;  // with launched devices: the cores they share with the server (-1: this machine's; 0: ignore)
  // The clock the devices' set-up profiles are timed by: "wall"; "cpu", their CPU time (one-thread
  // devices only: more threads keep the wall clock); "auto", CPU time where they share this machine's
  // cores with each other (launched_device_threads 1, shared_cores not 0), since all profile at once
  // and a wall-clock profile then holds however the OS shared the cores meanwhile (measured: 2.1-3.8x
  // slower than alone, four devices on 2 cores, where the cost model takes 2x).
  std::string device_profile_clock = "auto";
};

// Runs the server of a distributed run to the end: waits for cfg.devices devices, trains cfg.epochs
// rounds, evaluates the averaged model on the test set after each, writes metrics.jsonl,
// summary.json and trace.json under the output directory. on_bound receives the bound endpoint.
TrainResult run_server(const TrainConfig& cfg, const NetConfig& net, ProgressSink* progress = nullptr,
                       const std::function<void(const std::string&)>& on_bound = {});

struct DeviceOptions {
  std::string connect;          // server endpoint
  uint32_t id = 0;
  int threads = 1;              // CPU threads of this device
  std::string data_dir;         // overrides the server's data directory on this device
  double timeout_s = 60;        // server silence (it sends heartbeats every 2 s) before it counts as gone
  // A server gone (silent for timeout_s, or restarting) is looked for again on a fresh link, after
  // back-off waits of 1, 2, 4, ... up to 30 s, for this long in all before the device gives up; 0: at once.
  double reconnect_s = 600;
  std::optional<transport::Security> security;  // its CURVE key pair and the server's public key
  // (split modes, shared labels) after its first batch, write the activations and labels it sent to
  // this file: a recording for light devices.
  std::string record;
  // A light device for tests and benchmarks of many devices: no data, no model; it answers the
  // server's plans by sending the recording's activations and labels (rows taken in turn) for every
  // micro-batch of its partition, takes the gradients, and hands back the weights it was given.
  std::string replay;
};
// Runs one device until the server says training is finished; returns a process exit code.
int run_device(const DeviceOptions& options);

// `pipar train --mode fl|sl|sfl|pipar`: a server in this process and cfg.devices device processes
// (this executable, `device` subcommand) on loopback, run to the end.
TrainResult train_distributed(const TrainConfig& cfg, const NetConfig& net, ProgressSink* progress,
                              const std::string& self_exe, int device_threads);

}  // namespace pipar
