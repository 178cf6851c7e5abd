#!/usr/bin/env python3
"""Per-device split points against the best single split point, on devices of two speeds (issue #5).

Runs `pipar server` and its `pipar device` processes on this machine, each device in a Linux cgroup
with a CPU quota of its own (--cpus, in cores: what `docker run --cpus` sets), so that half the devices
get half the CPU of the others. A slower device is one with less CPU, never one that sleeps.

  1. auto (--split auto --micro-batches auto: the planner may give each device its own split point),
     then every shared (P, N) of --splits x --micro-batches, fixed, once each;
  2. --repeats times, side by side in alternating order: the per-device plan auto chose (fixed:
     --split P0,P1,... --micro-batches N), the two best shared grid points (fixed), auto, and auto
     with --one-split.

Per run it prints the plan and the training time (the sum of metrics.jsonl's round_seconds; set-up
and evaluation excluded), then medians and the ratio of the best shared plan's median to each.
Goal (issue #5): per-device plans beat the best single shared plan, measured.

  bench/hetero_bench.py --pipar build/apps/pipar --model vgg5 --cpus 0.3,0.3,0.15,0.15 \\
      --uplink-mbps 200 --downlink-mbps 200 --epochs 3 --limit-train 2000 --repeats 3

Needs root and a writable cgroup cpu controller (v1 /sys/fs/cgroup/cpu, or v2 with "cpu" enabled).
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from benchrun import machine_line, run_server_and_devices


class CpuGroups:
    """One cgroup per device, each with a CFS quota of `cores` CPUs over a short period (so that the
    limit holds over each kernel call, not only on average over 100 ms)."""

    def __init__(self, quotas, period_us):
        self.dirs = []
        self.root = None
        for cores in quotas:
            if not cores > 0 or cores * period_us < 1000:
                raise SystemExit(f"a CPU quota of {cores:g} cores over a period of {period_us} us is under the kernel's "
                                 f"1 ms minimum: give a longer period (--period-us {int(-(-1000 // cores)) if cores > 0 else ''})")
        base_v1 = "/sys/fs/cgroup/cpu"
        base_v2 = "/sys/fs/cgroup"
        name = f"pipar_hetero_{os.getpid()}"
        if os.path.exists(os.path.join(base_v1, "cpu.cfs_quota_us")):
            root = os.path.join(base_v1, name)
            os.mkdir(root)
            self.root = root
            for k, cores in enumerate(quotas):
                d = os.path.join(root, f"device{k}")
                os.mkdir(d)
                with open(os.path.join(d, "cpu.cfs_period_us"), "w") as f:
                    f.write(str(period_us))
                with open(os.path.join(d, "cpu.cfs_quota_us"), "w") as f:
                    f.write(str(int(cores * period_us)))
                self.dirs.append(d)
        elif os.path.exists(os.path.join(base_v2, "cgroup.controllers")):
            with open(os.path.join(base_v2, "cgroup.controllers")) as f:
                if "cpu" not in f.read().split():
                    raise SystemExit("cgroup v2 without the cpu controller: cannot give devices CPU quotas here")
            root = os.path.join(base_v2, name)
            os.mkdir(root)
            with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
                f.write("+cpu")
            self.root = root
            for k, cores in enumerate(quotas):
                d = os.path.join(root, f"device{k}")
                os.mkdir(d)
                with open(os.path.join(d, "cpu.max"), "w") as f:
                    f.write(f"{int(cores * period_us)} {period_us}")
                self.dirs.append(d)
        else:
            raise SystemExit("no cgroup cpu controller found (/sys/fs/cgroup/cpu or cgroup v2): cannot give devices "
                             "CPU quotas here")

    def enter(self, k):
        """For subprocess's preexec_fn: moves the child into device k's group before it runs."""
        path = os.path.join(self.dirs[k], "cgroup.procs")
        return lambda: open(path, "w").write(str(os.getpid()))

    def close(self):
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.1)  # a process still leaving the group
        if self.root:
            try:
                os.rmdir(self.root)
            except OSError:
                pass


def run(args, groups, out_dir, split, micro, one_split=False, mode="pipar"):
    """One distributed run: the server (no quota) and the devices, each in its group. split and micro
    are ignored for fl (no split)."""
    n = len(groups.dirs)
    cmd = [args.pipar, "server", "--insecure", "--listen", "tcp://127.0.0.1:*", "--mode", mode,
           "--model", args.model, "--dataset", args.dataset, "--devices", str(n), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--uplink-mbps", str(args.uplink_mbps),
           "--downlink-mbps", str(args.downlink_mbps), "--threads", str(args.server_threads), "--seed", str(args.seed),
           "--limit-train", str(args.limit_train), "--limit-test", str(args.limit_test), "--out", out_dir]
    if mode != "fl":
        cmd += ["--split", split, "--micro-batches", micro]
    if one_split:
        cmd.append("--one-split")
    cmd += args.extra.split()
    lines = run_server_and_devices(
        cmd, lambda endpoint: [([args.pipar, "device", "--connect", endpoint, "--id", str(k), "--threads",
                                 str(getattr(args, "device_threads", 1) or 1), "--insecure",
                                 "--reconnect", "0"], groups.enter(k)) for k in range(n)],
        out_dir + ".log")
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    return {"split_arg": split, "micro_arg": micro, "one_split": one_split,
            "total": sum(x["round_seconds"] for x in lines),
            "rounds": [{k: x.get(k) for k in ("round", "round_seconds", "split", "micro_batches", "uplink_mbps",
                                               "predicted_round_seconds", "bottleneck", "test_accuracy")} for x in lines],
            "plan": summary.get("plan"), "first_plan": summary.get("predicted_plan"),
            "replans": summary.get("replans", []), "accuracy": summary.get("test_accuracy"),
            "command": " ".join(cmd), "summary": summary}


def plan_text(r):
    rounds = r["rounds"]
    plans = []
    for x in rounds:
        p = f"P={x['split']} N={x['micro_batches']}"
        if not plans or plans[-1] != p:
            plans.append(p)
    return " then ".join(plans)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipar", default="build/apps/pipar")
    p.add_argument("--model", default="vgg5")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--cpus", default="0.3,0.3,0.15,0.15", help="each device's CPU quota in cores (one per device)")
    p.add_argument("--period-us", type=int, default=10000, help="CFS period of the quotas")
    p.add_argument("--uplink-mbps", type=float, default=200)
    p.add_argument("--downlink-mbps", type=float, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit-train", type=int, default=2000)
    p.add_argument("--limit-test", type=int, default=500)
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--splits", default="1,2,3,4", help="shared split points of the grid")
    p.add_argument("--micro-batches", default="2,4,6,8,12", help="micro-batch counts of the grid")
    p.add_argument("--repeats", type=int, default=3, help="repeats of step 2")
    p.add_argument("--extra", default="", help="more options for every run's server, e.g. --no-replan")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args()

    quotas = [float(x) for x in args.cpus.split(",")]
    print(machine_line("hetero_bench") + f"; {args.model}, {len(quotas)} devices with CPU quotas {args.cpus} cores "
          f"(period {args.period_us} us), {args.limit_train} training images, uplink {args.uplink_mbps:g} Mbit/s, "
          f"downlink {args.downlink_mbps:g} Mbit/s, server {args.server_threads} thread(s)", flush=True)
    groups = CpuGroups(quotas, args.period_us)
    root = tempfile.mkdtemp(prefix="pipar_hetero_")
    runs = {"grid": []}
    try:
        def show(kind, r):
            print(f"#   {kind:14s} {r['total']:7.2f} s  {plan_text(r)}  (predicted first round "
                  f"{(r['first_plan'] or {}).get('round_s', float('nan')):.2f} s, rounds "
                  + ", ".join(f"{x['round_seconds']:.2f}" for x in r["rounds"]) + ")", flush=True)

        # 1. The planner's choices, and every shared grid point once.
        first = run(args, groups, os.path.join(root, "auto_first"), "auto", "auto")
        show("auto", first)
        plan = first["first_plan"]
        per_device = (",".join(str(x) for x in plan["split"]), str(plan["micro_batches"]))
        for sp in args.splits.split(","):
            for n in args.micro_batches.split(","):
                r = run(args, groups, os.path.join(root, f"grid_{sp}_{n}"), sp, n)
                runs["grid"].append(r)
                show("grid", r)
        # 2. Repeats, side by side in alternating order: the per-device plan the planner chose (fixed),
        # the two best shared grid points (fixed), and the automatic runs with and without per-device
        # split points (re-planning as configured).
        top = sorted(runs["grid"], key=lambda r: r["total"])[:2]
        kinds = {"per-device": (per_device[0], per_device[1], False), "auto": ("auto", "auto", False),
                 "one-split": ("auto", "auto", True)}
        for i, r in enumerate(top):
            kinds[f"shared #{i + 1}"] = (r["split_arg"], r["micro_arg"], False)
        for k in kinds:
            runs[k] = []
        runs["auto"].append(first)
        names = list(kinds)
        for rep in range(args.repeats):
            for k in (names if rep % 2 == 0 else names[::-1]):
                sp, n, one = kinds[k]
                r = run(args, groups, os.path.join(root, f"{k.replace(' ', '').replace('#', '')}_{rep}"), sp, n, one)
                runs[k].append(r)
                show(k, r)
    finally:
        groups.close()

    med = {k: statistics.median(r["total"] for r in v) for k, v in runs.items() if k != "grid"}
    best_shared = min(med[k] for k in med if k.startswith("shared"))
    print()
    print("| run | plan | training time (s), median (each) | best shared / this |")
    print("|---|---|---|---|")
    for k in med:
        each = ", ".join("%.2f" % r["total"] for r in runs[k])
        print(f"| {k} | {plan_text(runs[k][0])} | {med[k]:.2f} ({each}) | {best_shared / med[k]:.3f}x |")
    print()
    print("| grid P \\ N | " + " | ".join(args.micro_batches.split(",")) + " |")
    print("|---" * (1 + len(args.micro_batches.split(","))) + "|")
    for sp in args.splits.split(","):
        row = [r for r in runs["grid"] if r["split_arg"] == sp]
        print(f"| {sp} | " + " | ".join(f"{r['total']:.2f}" for r in row) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
