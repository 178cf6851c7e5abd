#!/usr/bin/env python3
"""Re-planning against a fixed plan when the uplink slows down (issue #5): runs the same pipar training
twice per repeat, side by side in this script, with the planner choosing P and N at the start and
every uplink's rate cut to a fraction of itself from a given round on (--uplink-schedule, shaped by
PiPar's transport at run time): once with re-planning (the default) and once with --no-replan. Prints
each round's plan and time, the round after which the planner changed the plan, and the ratio of the
two runs' training times (median over repeats).

  bench/replan_bench.py --pipar build/apps/pipar --uplink-mbps 10 --factor 0.5 --epochs 6 \\
      --limit-train 800 --repeats 3 [--json out.json]

With --cpus Q0,Q1,... the devices run as `pipar device` processes each in a cgroup with that CPU quota
(bench/hetero_bench.py's), the server as `pipar server` without one: devices slower than the server,
as at the edge, without sleeps.

Measured: each round's round_seconds from metrics.jsonl (monotonic clock around the round's
training; evaluation excluded), summed over the run. Goal (issue #5): re-plan within two rounds of
the change, and the run ends at least 15% faster than with re-planning off.
"""
import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile

from benchrun import add_run_options, machine_line, run_train, train_command
from hetero_bench import CpuGroups, run as hetero_run


def run(args, out_dir, replan):
    slow_from = args.slow_from if args.slow_from is not None else args.epochs // 2
    slow = args.uplink_mbps * args.factor
    if args.cpus:  # a server and device processes, each device in a cgroup with its CPU quota
        extra = f"--uplink-schedule {slow_from}:{slow:g}" + ("" if replan else " --no-replan")
        groups = CpuGroups([float(x) for x in args.cpus.split(",")], args.period_us)
        try:
            r = hetero_run(argparse.Namespace(**{**vars(args), "extra": extra}), groups, out_dir, "auto", "auto")
        finally:
            groups.close()
        return {"replan": replan, "rounds": r["rounds"], "total": r["total"], "replans": r["replans"],
                "accuracy": r["accuracy"], "slow_from": slow_from, "command": r["command"]}
    cmd = train_command(args, "pipar", args.model, args.uplink_mbps, args.epochs, out_dir)
    cmd += ["--uplink-schedule", f"{slow_from}:{slow:g}", "--split", "auto", "--micro-batches", "auto"]
    if not replan:
        cmd.append("--no-replan")
    lines, summary = run_train(cmd, out_dir)
    rounds = [{k: j.get(k) for k in ("round", "round_seconds", "split", "micro_batches", "uplink_mbps",
                                     "predicted_round_seconds", "test_accuracy")}
              for j in lines if "round_seconds" in j]
    return {"replan": replan, "rounds": rounds, "total": sum(r["round_seconds"] for r in rounds),
            "replans": summary.get("replans", []), "accuracy": summary.get("test_accuracy"),
            "slow_from": slow_from, "command": " ".join(cmd)}


def plan_of(r):
    return f"P={r['split']} N={r['micro_batches']}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--model", default="vgg5")
    p.add_argument("--uplink-mbps", type=float, default=10)
    p.add_argument("--factor", type=float, default=0.5, help="the uplink's rate from --slow-from on, as a fraction")
    p.add_argument("--slow-from", type=int, help="0-based round from which the uplink is slow (default: epochs / 2)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write every run here")
    p.add_argument("--cpus", help="each device's CPU quota in cores, e.g. 0.3 (one per device; needs root and a cgroup cpu "
                   "controller): runs `pipar server` and `pipar device` processes, not `pipar train`")
    p.add_argument("--period-us", type=int, default=10000, help="CFS period of the quotas")
    args = p.parse_args()
    if args.cpus and len(args.cpus.split(",")) != args.devices:
        raise SystemExit(f"--cpus lists {len(args.cpus.split(','))} quotas for {args.devices} devices")

    print(machine_line("replan_bench") + f"; {args.model}, {args.devices} devices, {args.limit_train} training images, "
          f"uplink {args.uplink_mbps:g} Mbit/s then x{args.factor:g}, downlink {args.downlink_mbps:g} Mbit/s"
          + (f", device CPU quotas {args.cpus} cores" if args.cpus else ""), flush=True)
    root = tempfile.mkdtemp(prefix="pipar_replan_")
    atexit.register(shutil.rmtree, root, True)  # runs of hundreds of MiB each (checkpoints, traces)
    runs = []
    for rep in range(args.repeats):
        # Alternate which goes first, so that a drift of the machine's speed favours neither.
        order = (True, False) if rep % 2 == 0 else (False, True)
        pair = {}
        for replan in order:
            r = run(args, os.path.join(root, f"{rep}_{'on' if replan else 'off'}"), replan)
            pair[replan] = r
            print(f"#   repeat {rep + 1} re-plan {'on ' if replan else 'off'}: {r['total']:.2f} s; rounds "
                  + ", ".join(f"{x['round_seconds']:.2f} ({plan_of(x)})" for x in r["rounds"]), flush=True)
        runs.append(pair)

    print()
    print("| repeat | re-plan on (s) | re-plan off (s) | off / on | on: slow rounds | off: slow rounds | on: first plan change | "
          "on: plan after | accuracy on / off |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios, slow_ratios, lags = [], [], []
    for i, pair in enumerate(runs):
        on, off = pair[True], pair[False]
        k = on["slow_from"]
        slow_on = sum(x["round_seconds"] for x in on["rounds"][k:])
        slow_off = sum(x["round_seconds"] for x in off["rounds"][k:])
        before = on["rounds"][k]  # planned before the slow-down (plans change only at round boundaries)
        change = next((x for x in on["rounds"][k + 1:] if plan_of(x) != plan_of(before)), None)
        # Rounds are 0-based here as in --uplink-schedule: round k is the first slow one, and a plan that
        # differs from round k + 1 on was re-planned after it (lag 1: the soonest possible).
        lag = None if change is None else change["round"] - k
        lags.append(lag)
        ratios.append(off["total"] / on["total"])
        slow_ratios.append(slow_off / slow_on)
        acc = lambda r: "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        print(f"| {i + 1} | {on['total']:.2f} | {off['total']:.2f} | {ratios[-1]:.3f} | {slow_on:.2f} | {slow_off:.2f} | "
              f"{'none' if change is None else 'round %d (%d after the slow-down)' % (change['round'], lag)} | "
              f"{'-' if change is None else plan_of(change)} | {acc(on)} / {acc(off)} |")
    print()
    print(f"median off / on over {len(ratios)} repeats: {statistics.median(ratios):.3f} (whole run), "
          f"{statistics.median(slow_ratios):.3f} (rounds after the slow-down); first plan: {plan_of(runs[0][True]['rounds'][0])}; "
          f"re-planned rounds after the change: {lags}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2, default=str)


if __name__ == "__main__":
    main()
