#!/usr/bin/env python3
"""How many devices one server sustains (issue #8): a `pipar server` and K light devices
(`pipar device --replay`: a real device's recorded activations and labels, sent at the link rate, no
compute) on links of --uplink-mbps / --downlink-mbps. While the links are the bottleneck the round
time stays flat as K grows; once the server is, it grows with K. Per K: the measured round time and
throughput of the last round, the busiest resource measured, the cost model's predicted round time
at set-up (summary.json's, from the profiles: the server profiles itself, the devices' profiles come
with the recording) and as re-scored under the rounds before (metrics.jsonl's
predicted_round_seconds: the measured speeds and the server loop's time per micro-batch), its
bottleneck, and that measured time per micro-batch beyond the server's kernels and steps. The server keeps its own choice of lanes (--lanes to force); --batching stack
stacks the replicas instead (the server then profiles its stacks, and the cost model their calls).

  bench/capacity_bench.py --pipar build/apps/pipar --devices 4,8,16,32,64 --uplink-mbps 10

Light devices share this machine's cores with the server: on a small machine they slow it a little.
"""
import argparse
import json
import os
import shutil
import tempfile

from benchrun import machine_line
from lanes_bench import add_light_options, server_run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_light_options(p, "4,8,16,32,64")
    p.add_argument("--epochs", type=int, default=2, help="rounds; the first is left out (warm-up)")
    p.add_argument("--uplink-mbps", type=float, default=10)
    p.add_argument("--downlink-mbps", type=float, default=25)
    p.add_argument("--lanes", type=int, default=0, help="--server-lanes (0: the server's choice)")
    p.add_argument("--batching", default="lanes", choices=["lanes", "stack"],
                   help="--server-batching: replicas side by side on lanes, or stacked (one call per layer)")
    args = p.parse_args()
    print(machine_line("capacity_bench") + f"; {args.model} split {args.split}, micro-batches of {args.micro}, "
          f"{args.micro_batches} per batch, {args.batches} batches per device per round, uplink {args.uplink_mbps:g} "
          f"Mbit/s, downlink {args.downlink_mbps:g} Mbit/s, light devices, server batching {args.batching}, server "
          f"backend {args.backend}", flush=True)
    root = tempfile.mkdtemp(prefix="pipar_capacity_")
    rec = os.path.join(root, "first.rec")
    plain = argparse.Namespace(**{**vars(args), "uplink_mbps": 0, "downlink_mbps": 0, "batching": "lanes", "backend": "cpu"})
    server_run(plain, os.path.join(root, "record"), 1, 1, record=rec)
    print("| K | round (s) | samples/s | bottleneck | server busy | predicted at set-up (s) | re-scored (s) | predicted bottleneck | "
          "lanes (mean group) | server loop per micro-batch (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in [int(x) for x in args.devices.split(",")]:
        samples = k * args.batches * args.micro * args.micro_batches
        out = os.path.join(root, f"k{k}")
        lines, _ = server_run(args, out, k, args.lanes, replay=rec, samples=samples)
        with open(os.path.join(out, "summary.json")) as f:
            predicted = json.load(f).get("predicted_plan", {})
        last = lines[-1]
        t = last["round_seconds"]
        print(f"| {k} | {t:.2f} | {samples / t:.0f} | {last['bottleneck']} | {100 * last['server_busy_seconds'] / t:.0f}% | "
              f"{predicted.get('round_s', float('nan')):.2f} | {last.get('predicted_round_seconds', float('nan')):.2f} | "
              f"{predicted.get('bottleneck', '?')} | "
              f"{last.get('server_lanes', 1)} ({last.get('mean_group_size', 1):.2f}) | "
              f"{1e3 * last.get('server_overhead_seconds_per_micro_batch', float('nan')):.3f} |", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
