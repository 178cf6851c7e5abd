#!/usr/bin/env python3
"""The planner against a measured grid (issue #5): for each model and uplink rate, runs pipar at every
(P, N) of a grid with the plan fixed, then once with --split auto --micro-batches auto, and prints per
setting the best measured grid point, the planner's pick and its measured time, and the cost model's
prediction error at every grid point.

  bench/planner_grid.py --pipar build/apps/pipar --models vgg5 --uplinks 5,10,50 \\
      --splits 1,2,3,4 --micro-batches 1,2,4,8,16 --limit-train 800 [--json out.json]

Measured: the first round's round_seconds from each run's metrics.jsonl (monotonic clock around the
round's training, evaluation excluded); predicted: predicted_round_seconds on the same line (the
server's cost model over the devices' profiles measured at set-up and the configured links). The
planner's own run is measured the same way. Goals (issue #5): pick within 5% of the best grid point;
median |predicted - measured| / measured at most 10%.
"""
import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile

from benchrun import add_run_options, machine_line, run_train, train_command


def run(args, out_dir, model, uplink, split, micro):
    cmd = train_command(args, "pipar", model, uplink, 1, out_dir) + ["--split", str(split), "--micro-batches", str(micro)]
    cmd += args.extra.split()
    lines, summary = run_train(cmd, out_dir)
    line = lines[0]
    return {"measured": line["round_seconds"], "predicted": line.get("predicted_round_seconds"),
            "split": line.get("split"), "micro_batches": line.get("micro_batches"), "summary_plan": summary.get("plan")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--models", default="vgg5")
    p.add_argument("--uplinks", default="5,10,50")
    p.add_argument("--splits", default="1,2,3,4")
    p.add_argument("--micro-batches", default="1,2,4,8,16")
    p.add_argument("--extra", default="", help="more pipar train options for every run, e.g. \"--shared-cores 0\"")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args()

    print(machine_line("planner_grid") + f"; {args.devices} devices, batch {args.batch_size}, "
          f"{args.limit_train} training images, downlink {args.downlink_mbps} Mbit/s", flush=True)
    root = tempfile.mkdtemp(prefix="pipar_grid_")
    atexit.register(shutil.rmtree, root, True)  # runs of hundreds of MiB each (checkpoints, traces)
    everything = []
    summary_rows = []
    errors_all = []
    for model in args.models.split(","):
        for uplink in [float(u) for u in args.uplinks.split(",")]:
            grid = []
            for split in args.splits.split(","):
                for micro in args.micro_batches.split(","):
                    r = run(args, os.path.join(root, f"{model}_{uplink}_{split}_{micro}"), model, uplink, split, micro)
                    r.update(model=model, uplink=uplink, plan=f"P={split} N={micro}")
                    grid.append(r)
                    print(f"#   {model} {uplink:g} Mbit/s {r['plan']}: measured {r['measured']:.2f} s, "
                          f"predicted {r['predicted'] if r['predicted'] is None else round(r['predicted'], 2)} s", flush=True)
            auto = run(args, os.path.join(root, f"{model}_{uplink}_auto"), model, uplink, "auto", "auto")
            auto.update(model=model, uplink=uplink, plan=f"auto → P={auto['split']} N={auto['micro_batches']}")
            everything += grid + [auto]
            best = min(grid, key=lambda r: r["measured"])
            errs = [abs(r["predicted"] - r["measured"]) / r["measured"] for r in grid if r["predicted"]]
            errors_all += errs
            summary_rows.append((model, uplink, best, auto, statistics.median(errs) if errs else float("nan"),
                                 max(errs) if errs else float("nan")))
            print(f"# {model} {uplink:g} Mbit/s: best grid {best['plan']} {best['measured']:.2f} s; planner "
                  f"{auto['plan']} measured {auto['measured']:.2f} s ({auto['measured'] / best['measured']:.3f}x best), "
                  f"predicted {auto['predicted']:.2f} s", flush=True)

    print()
    print("| model | uplink Mbit/s | best grid point | its round (s) | planner's pick | its round (s) | pick / best | "
          "median prediction error | max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, uplink, best, auto, med, mx in summary_rows:
        print(f"| {model} | {uplink:g} | {best['plan']} | {best['measured']:.2f} | P={auto['split']} N={auto['micro_batches']} | "
              f"{auto['measured']:.2f} | {auto['measured'] / best['measured']:.3f} | {100 * med:.1f}% | {100 * mx:.1f}% |")
    if errors_all:
        print(f"median prediction error over all {len(errors_all)} grid points: {100 * statistics.median(errors_all):.1f}%")
    print()
    print("| model | uplink | plan | measured (s) | predicted (s) | error |")
    print("|---|---|---|---|---|---|")
    for r in everything:
        err = "" if not r["predicted"] else f"{100 * (r['predicted'] - r['measured']) / r['measured']:+.1f}%"
        pred = "" if not r["predicted"] else f"{r['predicted']:.2f}"
        print(f"| {r['model']} | {r['uplink']:g} | {r['plan']} | {r['measured']:.2f} | {pred} | {err} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=2)


if __name__ == "__main__":
    main()
