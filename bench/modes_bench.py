#!/usr/bin/env python3
"""Runs every training mode (fl, sl, sfl, pipar) on the same model, data, links and kernels, one
after the other in this script, and prints one table: epoch time, server idle time, pipeline
efficiency, accuracy, and pipar's ratios against sfl and fl.

  bench/modes_bench.py --pipar build/apps/pipar --devices 4 --uplink-mbps 10 --downlink-mbps 25 \
      --split 2 --micro-batches 4 --epochs 2 --limit-train 8000 [--json out.json]

Every figure comes from the runs' summary.json (measured by the trainer: monotonic clocks, bytes on
the shaped links); nothing is estimated here.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def run_mode(args, mode, out_dir, split, micro):
    cmd = [args.pipar, "train", "--mode", mode, "--model", args.model, "--dataset", args.dataset,
           "--devices", str(args.devices), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--uplink-mbps", str(args.uplink_mbps), "--downlink-mbps", str(args.downlink_mbps),
           "--latency-ms", str(args.latency_ms), "--device-threads", str(args.device_threads),
           "--threads", str(args.server_threads), "--seed", str(args.seed), "--out", out_dir]
    if args.limit_train:
        cmd += ["--limit-train", str(args.limit_train)]
    if args.limit_test:
        cmd += ["--limit-test", str(args.limit_test)]
    extra = args.extra.split()
    if mode == "fl" and any(a.startswith("--dp-") for a in extra):
        raise SystemExit("--extra with --dp-* options applies to the split modes only (--modes sl,sfl,pipar)")
    cmd += extra
    if mode != "fl":
        cmd += ["--split", str(split)]
    if mode == "pipar":
        cmd += ["--micro-batches", str(micro)]
    elif mode != "fl" and split == "auto":
        cmd += ["--micro-batches", "1"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{mode} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    with open(os.path.join(out_dir, "summary.json")) as f:
        s = json.load(f)
    s["script_wall_seconds"] = wall
    s["command"] = " ".join(cmd)
    return s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipar", default="build/apps/pipar")
    p.add_argument("--model", default="vgg5")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--uplink-mbps", type=float, default=10)
    p.add_argument("--downlink-mbps", type=float, default=25)
    p.add_argument("--latency-ms", type=float, default=0)
    p.add_argument("--split", default="2", help="block number or auto (planner)")
    p.add_argument("--micro-batches", default="4", help="count or auto (planner)")
    p.add_argument("--device-threads", type=int, default=1)
    p.add_argument("--server-threads", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=0)
    p.add_argument("--limit-test", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--modes", default="fl,sl,sfl,pipar")
    p.add_argument("--extra", default="", help="more pipar train options for every mode, e.g. \"--dp-clip 10 --dp-sigma 0.1\" "
                   "(split modes only when they name --dp-*)")
    p.add_argument("--json", help="write all summaries here")
    args = p.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, text=True).stdout.strip()
    print(f"# modes_bench: commit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"# {args.model} on {args.dataset} (train limit {args.limit_train or 'all'}), {args.devices} devices, "
          f"batch {args.batch_size}, {args.epochs} epochs, uplink {args.uplink_mbps} Mbit/s, downlink "
          f"{args.downlink_mbps} Mbit/s, latency {args.latency_ms} ms, split {args.split}, pipar micro-batches "
          f"{args.micro_batches}, device threads {args.device_threads}" + (f", extra options: {args.extra}" if args.extra else ""))
    rows = {}
    root = tempfile.mkdtemp(prefix="pipar_modes_")
    for mode in args.modes.split(","):
        rows[mode] = run_mode(args, mode, os.path.join(root, mode), args.split, args.micro_batches)
        s = rows[mode]
        print(f"#   {mode} done: {s['train_seconds']:.1f} s, accuracy {100 * s['test_accuracy']:.2f}%", flush=True)

    print()
    for mode, s in rows.items():
        if "plan" in s:
            print(f"# {mode}: planner chose split {s['split']}, {s['micro_batches']} micro-batches; predicted round "
                  f"{s['plan'].get('round_s', 0):.2f} s, measured {s['train_seconds'] / max(1, len(s['epoch_seconds'])):.2f} s")
    print(f"| mode | epoch time (s) | server busy (s) | server idle (s) | pipeline efficiency | MB up | MB down | test accuracy |")
    print(f"|---|---|---|---|---|---|---|---|")
    for mode, s in rows.items():
        e = max(1, len(s["epoch_seconds"]))
        print(f"| {mode} | {s['train_seconds'] / e:.2f} | {s['server_busy_seconds'] / e:.2f} | "
              f"{s['server_idle_seconds'] / e:.2f} | {s['pipeline_efficiency']:.3f} | {s['bytes_up'] / 1e6 / e:.1f} | "
              f"{s['bytes_down'] / 1e6 / e:.1f} | {100 * s['test_accuracy']:.2f}% |")
    if "pipar" in rows:
        pp = rows["pipar"]
        for peer in ("sfl", "fl", "sl"):
            if peer in rows:
                r = rows[peer]
                print(f"pipar vs {peer}: epoch time {pp['train_seconds'] / r['train_seconds']:.3f}x "
                      f"(speed-up {r['train_seconds'] / pp['train_seconds']:.2f}x), server idle "
                      f"{pp['server_idle_seconds'] / max(1e-9, r['server_idle_seconds']):.3f}x, accuracy "
                      f"{100 * (pp['test_accuracy'] - r['test_accuracy']):+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
