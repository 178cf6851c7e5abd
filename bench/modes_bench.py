#!/usr/bin/env python3
"""Runs every training mode (fl, sl, sfl, pipar) on the same model, data, links and kernels, one
after the other in this script, and prints one table: epoch time, server idle time, pipeline
efficiency, accuracy, and pipar's ratios against sfl and fl.

  bench/modes_bench.py --pipar build/apps/pipar --devices 4 --uplink-mbps 10 --downlink-mbps 25 \
      --split 2 --micro-batches 4 --epochs 2 --limit-train 8000 [--json out.json]

Every figure comes from the runs' summary.json (measured by the trainer: monotonic clocks, bytes on
the shaped links); nothing is estimated here.

With --device-cpus Q (or Q0,Q1,... one per device) each mode runs as `pipar server` and `pipar device`
processes instead of `pipar train`, every device in a Linux cgroup with that CPU quota in cores (what
`docker run --cpus` sets; needs root): devices as slow as the paper's, by less CPU, never by sleeps.

  bench/modes_bench.py --pipar build/apps/pipar --devices 4 --device-cpus 0.1 --split auto \
      --micro-batches auto --epochs 1 --limit-train 8000 --limit-test 2000
"""
import argparse
import atexit
import json
import os
import shutil
import tempfile
import time

from benchrun import add_run_options, machine_line, run_train, train_command
from hetero_bench import CpuGroups, run as hetero_run


def run_mode(args, mode, out_dir, split, micro, groups=None):
    if groups:  # server and device processes, each device in its cgroup
        extra = args.extra.split() + ["--latency-ms", str(args.latency_ms)]
        t0 = time.monotonic()
        r = hetero_run(argparse.Namespace(**{**vars(args), "extra": " ".join(extra)}), groups, out_dir, str(split),
                       str(micro) if mode == "pipar" else "1", mode=mode)
        s = r["summary"]
        s["script_wall_seconds"] = time.monotonic() - t0
        s["command"] = r["command"]
        return s
    cmd = train_command(args, mode, args.model, args.uplink_mbps, args.epochs, out_dir)
    cmd += ["--latency-ms", str(args.latency_ms)]
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
    _, s = run_train(cmd, out_dir)
    wall = time.monotonic() - t0
    s["script_wall_seconds"] = wall
    s["command"] = " ".join(cmd)
    return s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, limit_train=0, limit_test=0)
    p.add_argument("--model", default="vgg5")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--uplink-mbps", type=float, default=10)
    p.add_argument("--latency-ms", type=float, default=0)
    p.add_argument("--split", default="2", help="block number or auto (planner)")
    p.add_argument("--micro-batches", default="4", help="count or auto (planner)")
    p.add_argument("--modes", default="fl,sl,sfl,pipar")
    p.add_argument("--extra", default="", help="more pipar train options for every mode, e.g. \"--dp-clip 10 --dp-sigma 0.1\" "
                   "(split modes only when they name --dp-*)")
    p.add_argument("--device-cpus", help="each device's CPU quota in cores: one value for all, or one per device "
                   "(runs server and device processes; needs root and a cgroup cpu controller)")
    p.add_argument("--period-us", type=int, default=10000, help="CFS period of the quotas")
    p.add_argument("--json", help="write all summaries here")
    args = p.parse_args()
    quotas = None
    if args.device_cpus:
        quotas = [float(x) for x in args.device_cpus.split(",")]
        if len(quotas) == 1:
            quotas *= args.devices
        if len(quotas) != args.devices:
            raise SystemExit(f"--device-cpus names {len(quotas)} quotas for {args.devices} devices")

    print(machine_line("modes_bench"))
    print(f"# {args.model} on {args.dataset} (train limit {args.limit_train or 'all'}), {args.devices} devices, "
          f"batch {args.batch_size}, {args.epochs} epochs, uplink {args.uplink_mbps} Mbit/s, downlink "
          f"{args.downlink_mbps} Mbit/s, latency {args.latency_ms} ms, split {args.split}, pipar micro-batches "
          f"{args.micro_batches}, device threads {args.device_threads}" + (f", extra options: {args.extra}" if args.extra else "")
          + (f", device CPU quotas {','.join(f'{q:g}' for q in quotas)} cores (period {args.period_us} us), "
             f"server and devices as separate processes" if quotas else ""))
    rows = {}
    root = tempfile.mkdtemp(prefix="pipar_modes_")
    atexit.register(shutil.rmtree, root, True)  # runs of hundreds of MiB each (checkpoints, traces)
    groups = CpuGroups(quotas, args.period_us) if quotas else None
    try:
        for mode in args.modes.split(","):
            rows[mode] = run_mode(args, mode, os.path.join(root, mode), args.split, args.micro_batches, groups)
            s = rows[mode]
            print(f"#   {mode} done: {s['train_seconds']:.1f} s, accuracy {100 * s['test_accuracy']:.2f}%", flush=True)
    finally:
        if groups:
            groups.close()

    print()
    for mode, s in rows.items():
        if "plan" in s:
            print(f"# {mode}: planner chose split {s['split']}, {s['micro_batches']} micro-batches; predicted round "
                  f"{s['plan'].get('round_s', 0):.2f} s, measured {s['train_seconds'] / max(1, len(s['epoch_seconds'])):.2f} s")
    print("| mode | epoch time (s) | server busy (s) | server idle (s) | pipeline efficiency | MB up | MB down | test accuracy |")
    print("|---|---|---|---|---|---|---|---|")
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
