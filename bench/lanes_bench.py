#!/usr/bin/env python3
"""Cross-device batching end to end (issue #8): one `pipar server` and K light devices
(`pipar device --replay`, which send a real device's recorded activations and labels and compute
nothing), so that the server is the bottleneck. The server trains the micro-batches one at a time on
all its threads (--server-lanes 1) or side by side on lanes (--server-lanes L, default min(K, threads)),
alternating, --repeats times each. Per run: the training time (sum of metrics.jsonl's round_seconds),
micro-batches per second, the server's busy fraction and the mean group size; then medians and the
ratio lanes / one-at-a-time.

  bench/lanes_bench.py --pipar build/apps/pipar --devices 4,16,64 --micro 10 --epochs 2 --repeats 3

The recording comes from one real device (VGG5 at --split, batch --micro * --micro-batches).
"""
import argparse
import os
import shutil
import statistics
import tempfile

from benchrun import machine_line, run_server_and_devices


def server_run(args, out_dir, devices, lanes, replay=None, record=None, samples=None):
    """A server and its devices (replaying `replay`, or one real device writing `record`)."""
    bs = args.micro * args.micro_batches
    cmd = [args.pipar, "server", "--insecure", "--listen", "tcp://127.0.0.1:*", "--mode", "pipar", "--model", args.model,
           "--dataset", "synthetic", "--devices", str(devices), "--epochs", str(args.epochs if replay else 1),
           "--batch-size", str(bs), "--split", str(args.split), "--micro-batches", str(args.micro_batches),
           "--uplink-mbps", str(getattr(args, "uplink_mbps", 0)), "--downlink-mbps", str(getattr(args, "downlink_mbps", 0)),
           "--threads", str(args.server_threads),
           "--limit-train", str(samples or bs), "--limit-test", "100", "--out", out_dir, "--server-lanes", str(lanes),
           "--server-batching", getattr(args, "batching", "lanes"), "--backend", getattr(args, "backend", "cpu")]
    extra = ["--replay", replay] if replay else ["--record", record]
    lines = run_server_and_devices(
        cmd, lambda endpoint: [([args.pipar, "device", "--connect", endpoint, "--id", str(k), "--threads", "1", "--insecure",
                                 "--reconnect", "0"] + extra, None) for k in range(devices)],
        out_dir + ".log")
    return lines, " ".join(cmd)


def add_light_options(p, devices):
    """The options of a run of light devices against one server (this script's and capacity_bench's)."""
    p.add_argument("--pipar", default="build/apps/pipar")
    p.add_argument("--model", default="vgg5")
    p.add_argument("--split", type=int, default=2)
    p.add_argument("--micro", type=int, default=10, help="samples per micro-batch")
    p.add_argument("--micro-batches", type=int, default=10, help="micro-batches per batch")
    p.add_argument("--batches", type=int, default=3, help="batches per device per round")
    p.add_argument("--devices", default=devices)
    p.add_argument("--server-threads", type=int, default=0, help="0: all cores")
    p.add_argument("--backend", default="cpu", help="the server's backend: cpu, cuda or auto (the recording device "
                   "runs on its CPU either way)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_light_options(p, "4,16,64")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lanes", type=int, default=0, help="lanes of the grouped runs (0: min(devices, threads))")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    threads = args.server_threads or os.cpu_count()
    print(machine_line("lanes_bench") + f"; {args.model} split {args.split}, micro-batches of {args.micro}, "
          f"{args.micro_batches} per batch, {args.batches} batches per device per round, {args.epochs} rounds, "
          f"server {threads} thread(s), light devices", flush=True)
    root = tempfile.mkdtemp(prefix="pipar_lanes_")
    rec = os.path.join(root, "first.rec")
    server_run(args, os.path.join(root, "record"), 1, 1, record=rec)
    rows = []
    for k in [int(x) for x in args.devices.split(",")]:
        lanes = args.lanes or min(k, threads)
        samples = k * args.batches * args.micro * args.micro_batches
        res = {1: [], lanes: []}
        for rep in range(args.repeats):
            for ln in ([1, lanes] if rep % 2 == 0 else [lanes, 1]):
                lines, cmd = server_run(args, os.path.join(root, f"k{k}_l{ln}_{rep}"), k, ln, replay=rec, samples=samples)
                t = sum(x["round_seconds"] for x in lines)
                busy = sum(x["server_busy_seconds"] for x in lines)
                micros = k * args.batches * args.micro_batches * len(lines)
                group = statistics.mean(x.get("mean_group_size", 1) or 1 for x in lines)
                res[ln].append((t, micros / t, busy / t, group))
                print(f"#   K={k:3d} lanes={ln:2d}: {t:6.2f} s, {micros / t:7.1f} micro-batches/s, server busy "
                      f"{100 * busy / t:5.1f}%, mean group {group:.2f}", flush=True)
        one = statistics.median(r[1] for r in res[1])
        many = statistics.median(r[1] for r in res[lanes])
        rows.append((k, lanes, one, many, statistics.median(r[2] for r in res[1]), statistics.median(r[2] for r in res[lanes]),
                     statistics.median(r[3] for r in res[lanes]), ", ".join(f"{r[1] / o[1]:.2f}" for r, o in zip(res[lanes], res[1]))))
    print()
    print("| K | lanes | one at a time (mb/s) | side by side (mb/s) | ratio | server busy (one / lanes) | mean group | ratios per repeat |")
    print("|---|---|---|---|---|---|---|---|")
    for k, lanes, one, many, b1, bl, g, each in rows:
        print(f"| {k} | {lanes} | {one:.1f} | {many:.1f} | {many / one:.2f}x | {100 * b1:.0f}% / {100 * bl:.0f}% | {g:.2f} | {each} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
