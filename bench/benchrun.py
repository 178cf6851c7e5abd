"""What the training benchmarks share (bench/planner_grid.py, bench/replan_bench.py, bench/modes_bench.py):
the options of the run they launch, the line that names the machine before any number, and running
`pipar train` with its outputs read back (metrics.jsonl and summary.json, as the trainer wrote them)."""
import json
import os
import platform
import re
import subprocess
import sys


def add_run_options(p, devices=4, limit_train=800, limit_test=200):
    """The options every benchmark passes through to `pipar train` unchanged."""
    p.add_argument("--pipar", default="build/apps/pipar")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--devices", type=int, default=devices)
    p.add_argument("--downlink-mbps", type=float, default=25)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--limit-train", type=int, default=limit_train, help="training images (0: all)")
    p.add_argument("--limit-test", type=int, default=limit_test, help="test images (0: all)")
    p.add_argument("--device-threads", type=int, default=1)
    p.add_argument("--server-threads", type=int, default=0, help="0: all cores")
    p.add_argument("--seed", type=int, default=1)


def train_command(args, mode, model, uplink_mbps, epochs, out_dir):
    """`pipar train` with the shared options; the caller appends the split, micro-batches and the rest."""
    cmd = [args.pipar, "train", "--mode", mode, "--model", model, "--dataset", args.dataset,
           "--devices", str(args.devices), "--epochs", str(epochs), "--batch-size", str(args.batch_size),
           "--uplink-mbps", str(uplink_mbps), "--downlink-mbps", str(args.downlink_mbps),
           "--device-threads", str(args.device_threads), "--threads", str(args.server_threads),
           "--seed", str(args.seed), "--out", out_dir]
    if args.limit_train:
        cmd += ["--limit-train", str(args.limit_train)]
    if args.limit_test:
        cmd += ["--limit-test", str(args.limit_test)]
    return cmd


def run_train(cmd, out_dir):
    """Runs cmd; on failure prints the end of its stderr and exits. Returns (metrics lines, summary)."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed with exit code {proc.returncode}: {' '.join(cmd)}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    return lines, summary


def machine_line(name):
    """The first line of every benchmark's output: commit, CPU, cores and load when it started."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, text=True).stdout.strip()
    return (f"# {name}: commit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.2f}")


def run_server_and_devices(server_cmd, devices, log_path):
    """Runs `pipar server` (server_cmd, which listens on an OS-chosen port) and, once it says where it
    listens, the devices: devices(endpoint) gives each device's (argv, preexec_fn or None). Everything
    they print goes to log_path. Waits for the server, then up to 30 s for each device (then kills it);
    on failure prints the log's end and exits. Returns the server's metrics.jsonl lines (its --out)."""
    out_dir = server_cmd[server_cmd.index("--out") + 1]
    os.makedirs(out_dir, exist_ok=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.PIPE, text=True)
        endpoint = None
        for line in server.stderr:
            log.write(line)
            m = re.search(r"listening on (\S+)", line)
            if m:
                endpoint = m.group(1)
                break
        if not endpoint:
            server.wait()
            raise SystemExit(f"the server did not start: see {log_path}")
        procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=pre)
                 for argv, pre in devices(endpoint)]
        for line in server.stderr:
            log.write(line)
        code = server.wait()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    if code != 0:
        sys.stderr.write(open(log_path).read()[-3000:])
        raise SystemExit(f"the server failed ({code}): {' '.join(server_cmd)}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]
