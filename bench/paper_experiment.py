#!/usr/bin/python3
"""The paper's experiment in one command: fl, sl, sfl and pipar for every model, data set, device
count and link rate given, each run a `pipar server` plus K `pipar device` processes started here,
every device pinned to its own CPU core(s) with taskset where the machine has the cores, the server
on the GPU with --backend cuda (the default, auto: a GPU that passes a start-up check, else the CPU).

  bench/paper_experiment.py --pipar build/apps/pipar --out runs/paper            # the full grid
  bench/paper_experiment.py --pipar build/apps/pipar --models vgg5 --datasets fmnist \\
      --rates 10,50 --devices 2 --epochs 1 --limit-train 2000 --limit-test 1000 --out /tmp/exp

Outputs under --out:
  results.csv   one row per run: every summary.json key (lists flattened to key_0, key_1, ...) plus
                the run's settings (rates, pinning, cores, command lines)
  results.md    per model: mode x uplink rate -> epoch time, server idle time, test accuracy; pipar's
                speed-up and server-idle reduction against fl and sfl beside the paper's claims
                (with --repeats R: medians over R runs of every cell, and each cell's range)
  *.png         epoch time against uplink rate (one line per mode) and server idle time per mode,
                one pair per model (needs matplotlib: apt-get install python3-matplotlib; without it
                the CSV and markdown are still written)
  runs/...      each run's summary.json, metrics.jsonl, trace.json, server.log and device logs (its
                server.ckpt only with --keep-checkpoints)

Every figure comes from the runs' summary.json (monotonic clocks and byte counts of the trainer);
the only estimate, marked as such, is sfl's link share (bytes over link rate over epoch time).
Devices are never slowed by sleeps: a slower device is one with fewer cores (--device-cores), or
with a CPU quota (--device-cpus 0.1: a tenth of a core each, by a Linux cgroup, what `docker run
--cpus` sets; needs root), so that a machine with few cores can still run devices as slow as the
paper's Raspberry Pis beside a server.

The planner is on by default: every split mode runs with --split auto (each mode at the split its
planner picks; sfl and sl with one micro-batch) and pipar with --micro-batches auto.
"""
import argparse
import csv
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hetero_bench import CpuGroups  # noqa: E402  (bench/ is not a package)

PAPER_SPEEDUP_VS_FL = 34.6      # "up to 34.6x faster than FL"
PAPER_IDLE_REDUCTION_VS_FL = 64.1  # "up to 64.1x less server idle time than FL"
MODE_ORDER = ["local", "fl", "sl", "sfl", "pipar"]
MODE_STYLE = {"fl": ("tab:blue", "o"), "sl": ("tab:orange", "s"), "sfl": ("tab:green", "^"),
              "pipar": ("tab:red", "D"), "local": ("tab:gray", "x")}


def log(msg):
    print(msg, flush=True)


def csv_list(s, cast=str):
    return [cast(x.strip()) for x in str(s).split(",") if x.strip()]


def fmt_rate(r):
    return f"{r:g}"


# --- model facts from `pipar models` ------------------------------------------------------------
_BLOCK_RE = re.compile(r"^\s+(\d+)\s+(\S+)\s+(\d+)x(\d+)x(\d+)\s")


def model_blocks(pipar, model, dataset, cache={}):
    """[(block, kind, activation numel per sample)] of `pipar models --model M --dataset D`."""
    key = (model, dataset)
    if key not in cache:
        out = subprocess.run([pipar, "models", "--model", model, "--dataset", dataset], check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout
        blocks = []
        for line in out.splitlines():
            m = _BLOCK_RE.match(line)
            if m:
                c, h, w = int(m.group(3)), int(m.group(4)), int(m.group(5))
                blocks.append((int(m.group(1)), m.group(2), c * h * w))
        if not blocks:
            raise SystemExit(f"could not read the blocks of {model} from `pipar models`:\n{out}")
        cache[key] = blocks
    return cache[key]


def default_split(pipar, model, dataset):
    """The block after which the cut activation is smallest among the first half of the blocks
    (the earliest such block on ties: least device compute for the same traffic)."""
    blocks = model_blocks(pipar, model, dataset)
    half = max(1, len(blocks) // 2)
    best = min(blocks[:half], key=lambda b: (b[2], b[0]))
    return best[0]


def resolve_split(args, model, dataset):
    spec = args.split
    per_model = {}
    if "=" in spec:
        for item in csv_list(spec):
            k, _, v = item.partition("=")
            per_model[k.strip()] = v.strip()
        spec = per_model.get(model, "best")
    if spec == "best":
        return str(default_split(args.pipar, model, dataset))
    return spec  # an integer, or "auto" (passed through to the planner)


# --- machine -----------------------------------------------------------------------------------
def available_cores():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def gpu_names():
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().startswith("GPU")]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plan_cores(args, devices):
    """(pinned, server cores, [device cores], reason)."""
    cores = available_cores()
    need = devices * args.device_cores + args.server_min_cores
    have_taskset = shutil.which("taskset") is not None
    if args.pin == "off":
        return False, [], [], "pinning off (--pin off)"
    if not have_taskset:
        if args.pin == "on":
            raise SystemExit("--pin on needs taskset (util-linux)")
        return False, [], [], "pinning off: taskset not found"
    if len(cores) < need:
        why = (f"{len(cores)} cores < {devices} devices x {args.device_cores} core(s) + {args.server_min_cores} "
               f"for the server")
        if args.pin == "on":
            raise SystemExit(f"--pin on: {why}")
        return False, [], [], f"pinning off: {why}; processes share the cores (--pin on needs {need})"
    dev_total = devices * args.device_cores
    # Devices on the highest-numbered cores, the server on the rest (core 0 often takes interrupts).
    server = cores[:len(cores) - dev_total]
    dev = [cores[len(server) + k * args.device_cores: len(server) + (k + 1) * args.device_cores]
           for k in range(devices)]
    return True, server, dev, (f"pinned: server on cores {cpuset(server)}, device k on "
                               f"{args.device_cores} core(s) each ({cpuset(dev[0])} .. {cpuset(dev[-1])})")


def cpuset(cores):
    return ",".join(str(c) for c in cores)


# --- one run -----------------------------------------------------------------------------------
class RunFailed(Exception):
    pass


def stop_process(p, grace=5.0):
    """Ends one process this script started: SIGTERM, then SIGKILL after grace seconds."""
    if p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    except ProcessLookupError:
        pass


def run_one(args, spec, run_dir, pinned, server_cores, device_cores, groups=None):
    os.makedirs(run_dir, exist_ok=True)
    mode = spec["mode"]
    server_threads = args.server_threads or (len(server_cores) if pinned else 0)
    # Loopback only: plain links, said explicitly (pipar refuses unauthenticated links otherwise).
    cmd = [args.pipar, "server", "--listen", "tcp://127.0.0.1:*", "--insecure", "--mode", mode, "--model", spec["model"],
           "--dataset", spec["dataset"], "--devices", str(spec["devices"]), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--uplink-mbps", fmt_rate(spec["up"]),
           "--downlink-mbps", fmt_rate(spec["down"]), "--latency-ms", fmt_rate(args.latency_ms),
           "--backend", args.backend, "--threads", str(server_threads), "--seed", str(args.seed),
           "--out", run_dir]
    if spec["data_dir"]:
        cmd += ["--data-dir", spec["data_dir"]]
    if args.limit_train:
        cmd += ["--limit-train", str(args.limit_train)]
    if args.limit_test:
        cmd += ["--limit-test", str(args.limit_test)]
    if mode != "fl":
        cmd += ["--split", str(spec["split"])]
    if mode == "pipar":
        cmd += ["--micro-batches", str(args.micro_batches)]
    elif mode != "fl" and str(spec["split"]) == "auto":
        cmd += ["--micro-batches", "1"]  # the planner picks sl's and sfl's split for whole batches
    if not pinned and not args.device_cpus:
        # The devices run beside the server on the same cores: the planner must know (pinned devices
        # have cores of their own; quota'd ones take a bounded share).
        cmd += ["--shared-cores", str(len(available_cores())), "--shared-device-threads", str(args.device_threads or 1)]
    cmd += args.server_arg
    if pinned:
        cmd = ["taskset", "-c", cpuset(server_cores)] + cmd

    procs = []
    logs = []
    endpoint = {}
    bound = threading.Event()

    def pump(stream, path, watch):
        with open(path, "w") as f:
            for line in stream:
                f.write(line)
                f.flush()
                if watch and not bound.is_set():
                    m = re.search(r"listening on (\S+)", line)
                    if m:
                        endpoint["ep"] = m.group(1)
                        bound.set()
        if watch:
            bound.set()  # the server ended before binding: wake the waiter

    t0 = time.monotonic()
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              stdin=subprocess.DEVNULL)
    procs.append(server)
    th = threading.Thread(target=pump, args=(server.stdout, os.path.join(run_dir, "server.log"), True), daemon=True)
    th.start()
    logs.append(th)
    dev_cmds = []
    lingered = []
    try:
        if not bound.wait(timeout=60) or "ep" not in endpoint:
            raise RunFailed("the server did not report its endpoint (see server.log)")
        for k in range(spec["devices"]):
            dcmd = [args.pipar, "device", "--connect", endpoint["ep"], "--id", str(k), "--insecure",
                    "--threads", str(args.device_threads or (args.device_cores if pinned else 1))]
            if spec["data_dir"]:
                dcmd += ["--data-dir", spec["data_dir"]]
            if pinned:
                dcmd = ["taskset", "-c", cpuset(device_cores[k])] + dcmd
            dev_cmds.append(dcmd)
            dlog = open(os.path.join(run_dir, f"device{k}.log"), "w")
            p = subprocess.Popen(dcmd, stdout=dlog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 preexec_fn=groups.enter(k) if groups else None)
            dlog.close()
            procs.append(p)
        deadline = time.monotonic() + args.run_timeout
        while server.poll() is None:
            if time.monotonic() > deadline:
                raise RunFailed(f"timed out after {args.run_timeout} s")
            for k, p in enumerate(procs[1:]):
                if p.poll() not in (None, 0):
                    raise RunFailed(f"device {k} exited with code {p.returncode} (see device{k}.log)")
            time.sleep(0.2)
        if server.returncode != 0:
            raise RunFailed(f"the server exited with code {server.returncode} (see server.log)")
        # The server has written its summary: a device still running now only delays the next run.
        # Give each a few seconds to see the server's "finished" message, then end it (as
        # `pipar train` does with its own devices), and note it in the results.
        grace_end = time.monotonic() + args.device_exit_grace
        for k, p in enumerate(procs[1:]):
            try:
                p.wait(timeout=max(0.1, grace_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                lingered.append(k)
        if lingered:
            log(f"#   note: device(s) {', '.join(map(str, lingered))} still running {args.device_exit_grace:g} s "
                f"after the server finished; stopped")
    finally:
        for p in reversed(procs):
            stop_process(p)
        for th in logs:
            th.join(timeout=5)
    wall = time.monotonic() - t0
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "commands.txt"), "w") as f:
        f.write(shlex.join(cmd) + "\n" + "".join(shlex.join(c) + "\n" for c in dev_cmds))
    return summary, wall, cmd, dev_cmds, lingered


# --- tables ------------------------------------------------------------------------------------
def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            if all(not isinstance(x, (dict, list)) for x in v):
                for i, x in enumerate(v):
                    out[f"{key}_{i}"] = x
            else:
                out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def per_epoch(row, key):
    e = max(1, int(row.get("epochs_completed") or 1))
    return float(row[key]) / e


def write_csv(path, rows):
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def link_share_estimate(r):
    """sfl's (or any split mode's) link time per device over its epoch time: an estimate from the
    bytes on the links and their rates, since devices send in parallel on their own links."""
    try:
        k = max(1, int(r["devices"]))
        up, down = float(r["uplink_mbps"]), float(r["downlink_mbps"])
        t = float(r["train_seconds"])
        link = 0.0
        if up > 0:
            link += float(r["bytes_up"]) / k * 8 / (up * 1e6)
        if down > 0:
            link += float(r["bytes_down"]) / k * 8 / (down * 1e6)
        return link / t if t > 0 else None
    except (KeyError, ValueError, TypeError):
        return None


def group_key(r):
    return (r["dataset_arg"], int(r["devices_arg"]), r["model_arg"])


MEDIAN_KEYS = ("train_seconds", "server_idle_seconds", "test_accuracy", "epoch_time_seconds",
               "server_idle_per_epoch_seconds")


def median_rows(rows):
    """One row per cell (data set, devices, model, mode, rate) of the runs that went well: the first
    run's row with the medians over the cell's repeats of MEDIAN_KEYS, the repeats' count, their epoch
    times' range, and the plans they ran (a planner's pick may differ between repeats)."""
    cells = {}
    for r in rows:
        if r.get("status") == "ok":
            cells.setdefault((group_key(r), r["mode_arg"], float(r["uplink_arg"])), []).append(r)
    out = []
    for rs in cells.values():
        m = dict(rs[0])
        for k in MEDIAN_KEYS:
            vals = [float(r[k]) for r in rs if r.get(k) not in (None, "")]
            if vals:
                m[k] = statistics.median(vals)
        times = [per_epoch(r, "train_seconds") for r in rs]
        m["repeats"] = len(rs)
        m["epoch_min"], m["epoch_max"] = min(times), max(times)
        m["plans_seen"] = sorted({(str(r.get("split")), str(r.get("micro_batches", "-"))) for r in rs})
        out.append(m)
    return out


def write_markdown(path, rows, header_lines, plots):
    ok = median_rows(rows)
    repeated = any(r["repeats"] > 1 for r in ok)
    lines = ["# PiPar paper experiment", ""] + header_lines + [""]
    groups = []
    for r in ok:
        if group_key(r) not in groups:
            groups.append(group_key(r))
    best = {"fl": (0.0, None), "fl_idle": (0.0, None)}
    checks = []
    for g in groups:
        ds, k, model = g
        rs = [r for r in ok if group_key(r) == g]
        rates = sorted({float(r["uplink_arg"]) for r in rs})
        modes = [m for m in MODE_ORDER if any(r["mode_arg"] == m for r in rs)]
        cell = {(r["mode_arg"], float(r["uplink_arg"])): r for r in rs}
        # The split each mode ran (the planner's may differ by mode and by rate), and pipar's micro-batches.
        plans = []
        for m in ("sl", "sfl", "pipar"):
            got = sorted({pm for r in rs if r["mode_arg"] == m for pm in r["plans_seen"]})
            if got:
                plans.append(f"{m} " + ", ".join(f"P={p}" + (f" N={n}" if m == "pipar" else "") for p, n in got))
        lines += [f"## {model} on {ds}, {k} devices ({'; '.join(plans) or 'no split mode'})", ""]
        lines += [("Each cell, medians over the repeats: epoch time (s) (its range over the repeats) / server idle "
                   "per epoch (s) / test accuracy." if repeated else
                   "Each cell: epoch time (s) / server idle per epoch (s) / test accuracy."), ""]
        lines.append("| mode | " + " | ".join(f"{fmt_rate(u)} up / {fmt_rate(float(cell_any(cell, u)['downlink_arg']))} down Mbit/s" for u in rates) + " |")
        lines.append("|---" * (len(rates) + 1) + "|")
        for m in modes:
            cells = []
            for u in rates:
                r = cell.get((m, u))
                spread = f" ({r['epoch_min']:.2f}-{r['epoch_max']:.2f}, {r['repeats']} runs)" if r and r["repeats"] > 1 else ""
                cells.append("-" if r is None else f"{per_epoch(r, 'train_seconds'):.2f}{spread} / "
                             f"{per_epoch(r, 'server_idle_seconds'):.2f} / {100 * float(r['test_accuracy']):.2f}%")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        if any(m == "pipar" for m in modes):
            lines += ["pipar against the baselines (speed-up = baseline's time for the same epochs / pipar's; idle "
                      "reduction = baseline's server idle time / pipar's; accuracy in points, pipar minus baseline; "
                      "sfl link share is an estimate: bytes / rate per device over sfl's epoch time):", ""]
            lines.append("| uplink Mbit/s | speed-up vs fl | idle reduction vs fl | acc. vs fl | speed-up vs sfl | "
                         "idle reduction vs sfl | acc. vs sfl | sfl link share (est.) |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for u in rates:
                p = cell.get(("pipar", u))
                if p is None:
                    continue
                vals = []
                for base in ("fl", "sfl"):
                    b = cell.get((base, u))
                    if b is None:
                        vals += ["-", "-", "-"]
                        continue
                    sp = float(b["train_seconds"]) / max(1e-9, float(p["train_seconds"]))
                    idle = float(b["server_idle_seconds"]) / max(1e-9, float(p["server_idle_seconds"]))
                    acc = 100 * (float(p["test_accuracy"]) - float(b["test_accuracy"]))
                    vals += [f"{sp:.2f}x", f"{idle:.2f}x", f"{acc:+.2f}"]
                    if base == "fl":
                        if sp > best["fl"][0]:
                            best["fl"] = (sp, f"{model}, {ds}, {k} devices, {fmt_rate(u)} Mbit/s")
                        if idle > best["fl_idle"][0]:
                            best["fl_idle"] = (idle, f"{model}, {ds}, {k} devices, {fmt_rate(u)} Mbit/s")
                        if ds == "fmnist" and acc < -0.5:
                            checks.append(f"- accuracy: pipar {-acc:.2f} points below fl ({model}, {ds}, {k} devices, "
                                          f"{fmt_rate(u)} Mbit/s; target: at most 0.5)")
                    else:
                        share = link_share_estimate(b)
                        if sp < 1.0:
                            checks.append(f"- pipar slower than sfl: {sp:.2f}x ({model}, {ds}, {k} devices, "
                                          f"{fmt_rate(u)} Mbit/s)")
                        if share is not None and share > 1 / 3 and sp < 1.5:
                            checks.append(f"- pipar under 1.5x sfl where sfl's link share is {100 * share:.0f}%: "
                                          f"{sp:.2f}x ({model}, {ds}, {k} devices, {fmt_rate(u)} Mbit/s)")
                b = cell.get(("sfl", u))
                share = link_share_estimate(b) if b else None
                vals.append("-" if share is None else f"{100 * share:.0f}%")
                lines.append(f"| {fmt_rate(u)} | " + " | ".join(vals) + " |")
            lines.append("")
        for pth in plots.get(g, []):
            lines.append(f"![{os.path.basename(pth)}]({os.path.basename(pth)})")
        if plots.get(g):
            lines.append("")
    lines += ["## Against the paper's claims", ""]
    lines.append("| figure | paper (PiPar vs FL, up to) | measured here (max over the runs above) |")
    lines.append("|---|---|---|")
    sp, where = best["fl"]
    lines.append(f"| speed-up (time for the same epochs) | {PAPER_SPEEDUP_VS_FL}x | "
                 + (f"{sp:.2f}x ({where})" if where else "- (no pipar/fl pair)") + " |")
    idle, where = best["fl_idle"]
    lines.append(f"| server idle time reduction | {PAPER_IDLE_REDUCTION_VS_FL}x | "
                 + (f"{idle:.2f}x ({where})" if where else "- (no pipar/fl pair)") + " |")
    lines.append("")
    lines += ["Targets of the issue: pipar never slower than sfl, at least 1.5x faster than sfl where "
              "communication is over a third of sfl's time, and on Fashion-MNIST at most 0.5 points below fl's "
              "accuracy after the same epochs.", ""]
    lines += (["Missed here:"] + checks) if checks else ["None missed in these runs."]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            lines.append(f"- {r['run_id']}: {r.get('error', '')}")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def cell_any(cell, u):
    for (m, uu), r in cell.items():
        if uu == u:
            return r
    return {}


# --- plots -------------------------------------------------------------------------------------
def make_plots(out, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("# matplotlib not found (apt-get install python3-matplotlib): no PNG plots, CSV and markdown only")
        return {}
    ok = median_rows(rows)
    plots = {}
    groups = []
    for r in ok:
        if group_key(r) not in groups:
            groups.append(group_key(r))
    for g in groups:
        ds, k, model = g
        rs = [r for r in ok if group_key(r) == g]
        modes = [m for m in MODE_ORDER if any(r["mode_arg"] == m for r in rs)]
        rates = sorted({float(r["uplink_arg"]) for r in rs})
        tag = f"{ds}_{model}_d{k}".replace("/", "-")
        title = f"{model} on {ds}, {k} devices"
        # Epoch time against uplink rate, one line per mode.
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for m in modes:
            pts = sorted((float(r["uplink_arg"]), per_epoch(r, "train_seconds")) for r in rs if r["mode_arg"] == m)
            color, marker = MODE_STYLE.get(m, (None, "o"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=m, linewidth=1.8)
        ax.set_xscale("log")
        ax.set_xticks(rates)
        ax.set_xticklabels([fmt_rate(u) for u in rates])
        ax.minorticks_off()
        ax.set_xlabel("uplink rate (Mbit/s)")
        ax.set_ylabel("epoch time (s)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Epoch time against link rate: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(title="mode")
        fig.tight_layout()
        p1 = os.path.join(out, f"epoch_time_{tag}.png")
        fig.savefig(p1)
        plt.close(fig)
        # Server idle time per epoch, grouped bars: one group per rate, one bar per mode.
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        width = 0.8 / max(1, len(modes))
        for i, m in enumerate(modes):
            vals = []
            for u in rates:
                r = next((r for r in rs if r["mode_arg"] == m and float(r["uplink_arg"]) == u), None)
                vals.append(per_epoch(r, "server_idle_seconds") if r else 0.0)
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(rates))]
            color, _ = MODE_STYLE.get(m, (None, "o"))
            bars = ax.bar(xs, vals, width=width, color=color, label=m)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.set_xticks(range(len(rates)))
        ax.set_xticklabels([f"{fmt_rate(u)} Mbit/s" for u in rates])
        ax.set_xlabel("uplink rate")
        ax.set_ylabel("server idle time per epoch (s)")
        ax.set_title(f"Server idle time per mode: {title}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(title="mode")
        fig.tight_layout()
        p2 = os.path.join(out, f"server_idle_{tag}.png")
        fig.savefig(p2)
        plt.close(fig)
        plots[g] = [p1, p2]
    return plots


# --- main --------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipar", default="build/apps/pipar", help="the pipar binary")
    ap.add_argument("--out", default=None, help="output directory (default runs/paper-<timestamp>)")
    ap.add_argument("--models", default="vgg5,vgg11,vgg16,resnet18,mobilenetv3-small")
    ap.add_argument("--datasets", default="fmnist,cifar10",
                    help="fmnist, cifar10 (synthetic-cifar unless --cifar-dir is given), mnist, synthetic, "
                         "synthetic-cifar")
    ap.add_argument("--cifar-dir", default=None, help="directory with CIFAR-10's binary files (data_batch_*.bin)")
    ap.add_argument("--data-dir", default=None, help="data directory for fmnist/mnist (default: the standard place)")
    ap.add_argument("--devices", default="4", help="device counts, e.g. 2,4,8")
    ap.add_argument("--rates", default="5,10,25,50,100", help="uplink rates, Mbit/s")
    ap.add_argument("--downlink", default=None,
                    help="downlink rates, Mbit/s, one per uplink rate (default: 2.5x the uplink)")
    ap.add_argument("--downlink-factor", type=float, default=2.5)
    ap.add_argument("--latency-ms", type=float, default=0)
    ap.add_argument("--modes", default="fl,sl,sfl,pipar")
    ap.add_argument("--split", default="auto",
                    help="auto (the planner's choice for each mode, passed through), best (per model: the block with "
                         "the smallest cut activation in the first half), an integer, or model=P,model=P")
    ap.add_argument("--micro-batches", default="auto", help="pipar's micro-batches: auto (the planner's) or a count")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--limit-train", type=int, default=0)
    ap.add_argument("--limit-test", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--backend", default="auto", help="server backend: cuda (the GPU), cpu, or auto (a GPU that passes a start-up check, else the CPU)")
    ap.add_argument("--pin", choices=["auto", "on", "off"], default="auto",
                    help="taskset-pin each device to its own core(s) and the server to the rest; auto: where the "
                         "machine has devices x device-cores + server-min-cores cores")
    ap.add_argument("--device-cores", type=int, default=1, help="cores per device when pinned")
    ap.add_argument("--device-cpus", type=float, default=0,
                    help="each device's CPU quota in cores (a cgroup each, what docker --cpus sets; needs root); 0: none")
    ap.add_argument("--period-us", type=int, default=20000, help="CFS period of the quotas")
    ap.add_argument("--server-min-cores", type=int, default=1, help="cores kept for the server when pinning")
    ap.add_argument("--device-threads", type=int, default=0,
                    help="pipar device --threads (default: --device-cores when pinned, else 1)")
    ap.add_argument("--server-threads", type=int, default=0,
                    help="pipar server --threads (default: its pinned cores, else all)")
    ap.add_argument("--run-timeout", type=float, default=7200, help="seconds before a run is stopped")
    ap.add_argument("--device-exit-grace", type=float, default=10,
                    help="seconds a device may keep running after the server finished before it is stopped")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every cell; the table and plots show medians (the CSV every run). Repeats go "
                         "round the whole list, so that a cell's runs are spread over the experiment's time")
    ap.add_argument("--resume", action="store_true", help="reuse runs whose summary.json is already under --out")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished run's server.ckpt (removed by default: VGG16's is 1.3 GiB)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for pipar server (repeatable)")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    if not (os.path.isfile(args.pipar) and os.access(args.pipar, os.X_OK)):
        raise SystemExit(f"no pipar binary at {args.pipar}: build it (./install.sh) or pass --pipar")
    args.pipar = os.path.abspath(args.pipar)
    out = os.path.abspath(args.out or f"runs/paper-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(out, exist_ok=True)

    models = csv_list(args.models)
    modes = csv_list(args.modes)
    device_counts = csv_list(args.devices, int)
    rates = csv_list(args.rates, float)
    downs = csv_list(args.downlink, float) if args.downlink else [r * args.downlink_factor for r in rates]
    if len(downs) != len(rates):
        raise SystemExit("--downlink needs one rate per --rates entry")
    datasets = []
    for d in csv_list(args.datasets):
        if d in ("cifar10", "cifar"):
            datasets.append(("cifar10", args.cifar_dir) if args.cifar_dir else ("synthetic-cifar", None))
        elif d in ("fmnist", "fashion-mnist", "mnist"):
            datasets.append((d, args.data_dir))
        else:
            datasets.append((d, None))

    commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "status", "--porcelain",
                            "--untracked-files=no"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True).stdout.strip()
    # The machine's lines of `pipar devices`, not the autotuner's cached choices (a thousand on a GPU).
    pipar_devices = "\n".join(
        line for line in subprocess.run([args.pipar, "devices"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True).stdout.strip().splitlines() if "|" not in line)
    gpus = gpu_names()
    cores = available_cores()
    header = [
        f"- command: `{shlex.join([sys.argv[0]] + sys.argv[1:])}`",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}; commit {commit}{' (with local changes)' if dirty else ''}",
        f"- machine: {cpu_model()}, {len(cores)} cores usable, load {os.getloadavg()[0]:.2f}; "
        f"GPU: {'; '.join(gpus) if gpus else 'none found (nvidia-smi)'}",
        f"- `pipar devices`: {' | '.join(pipar_devices.splitlines())}",
        f"- server backend: --backend {args.backend}; epochs {args.epochs}, batch {args.batch_size}, "
        f"train limit {args.limit_train or 'all'}, test limit {args.limit_test or 'all'}, seed {args.seed}, "
        f"latency {fmt_rate(args.latency_ms)} ms",
    ]
    if args.device_cpus:
        header.append(f"- every device in a cgroup with a CPU quota of {args.device_cpus:g} cores (period "
                      f"{args.period_us} us); the server without one")
    pin_notes = {}
    for k in device_counts:
        pinned, _, _, why = plan_cores(args, k)
        pin_notes[k] = why
        header.append(f"- {k} devices: {why}")
    for line in header:
        log("# " + line[2:])

    specs = []
    for ds, ddir in datasets:
        for k in device_counts:
            for model in models:
                split = resolve_split(args, model, ds) if any(m != "fl" for m in modes) else "-"
                for up, down in zip(rates, downs):
                    for mode in modes:
                        specs.append(dict(dataset=ds, data_dir=ddir, devices=k, model=model, up=up, down=down,
                                          mode=mode, split=split))
    specs = [dict(spec, repeat=rep) for rep in range(args.repeats) for spec in specs]
    log(f"# {len(specs)} runs: {len(datasets)} data set(s) x {len(device_counts)} device count(s) x {len(models)} "
        f"model(s) x {len(rates)} rate(s) x {len(modes)} mode(s)"
        + (f" x {args.repeats} repeats" if args.repeats > 1 else "") + f"; outputs in {out}")

    rows = []
    failures = 0
    t_all = time.monotonic()
    groups = CpuGroups([args.device_cpus] * max(device_counts), args.period_us) if args.device_cpus else None
    for i, spec in enumerate(specs, 1):
        run_id = (f"{spec['dataset']}/{spec['model']}/d{spec['devices']}/up{fmt_rate(spec['up'])}/{spec['mode']}"
                  + (f"/rep{spec['repeat'] + 1}" if args.repeats > 1 else ""))
        run_dir = os.path.join(out, "runs", run_id)
        pinned, server_cores, device_cores, _ = plan_cores(args, spec["devices"])
        base = {"run_id": run_id, "status": "ok", "mode_arg": spec["mode"], "model_arg": spec["model"],
                "dataset_arg": spec["dataset"], "devices_arg": spec["devices"], "uplink_arg": spec["up"],
                "downlink_arg": spec["down"], "split_arg": spec["split"] if spec["mode"] != "fl" else "-", "pinned": pinned,
                "server_cores": cpuset(server_cores), "device_cores": ";".join(cpuset(c) for c in device_cores),
                "device_cpus": args.device_cpus or "", "repeat": spec["repeat"] + 1}
        summary_path = os.path.join(run_dir, "summary.json")
        try:
            if args.resume and os.path.isfile(summary_path):
                with open(summary_path) as f:
                    summary = json.load(f)
                wall, cmd, dev_cmds, lingered = None, ["(resumed)"], [], []
            else:
                summary, wall, cmd, dev_cmds, lingered = run_one(args, spec, run_dir, pinned, server_cores, device_cores,
                                                                 groups)
                # The server's crash-recovery checkpoint (every server-side replica, up to GiBs a run) has
                # done its job once the run finished; the figures are in summary.json and metrics.jsonl.
                if not args.keep_checkpoints:
                    for name in os.listdir(run_dir):
                        if name.startswith("server.ckpt"):
                            os.remove(os.path.join(run_dir, name))
            row = dict(base)
            row.update(flatten(summary))
            row["epoch_time_seconds"] = per_epoch(row, "train_seconds")
            row["server_idle_per_epoch_seconds"] = per_epoch(row, "server_idle_seconds")
            row["script_wall_seconds"] = wall
            row["server_command"] = shlex.join(cmd)
            row["device_command_0"] = shlex.join(dev_cmds[0]) if dev_cmds else ""
            row["devices_stopped_after_server"] = ";".join(map(str, lingered))
            rows.append(row)
            log(f"[{i}/{len(specs)}] {run_id}: epoch {row['epoch_time_seconds']:.2f} s, server idle "
                f"{row['server_idle_per_epoch_seconds']:.2f} s, accuracy {100 * float(row['test_accuracy']):.2f}%"
                f" ({time.monotonic() - t_all:.0f} s so far)")
        except (RunFailed, OSError, json.JSONDecodeError, subprocess.SubprocessError) as e:
            failures += 1
            err = str(e)
            try:  # the server's last words say why, e.g. an option this pipar does not know yet
                with open(os.path.join(run_dir, "server.log")) as f:
                    tail = [ln.strip() for ln in f if ln.strip()][-2:]
                if tail:
                    err += ": " + " / ".join(tail)
            except OSError:
                pass
            row = dict(base, status="failed", error=err)
            rows.append(row)
            log(f"[{i}/{len(specs)}] {run_id}: FAILED: {err}")
        except KeyboardInterrupt:
            log("# interrupted: writing the results so far")
            break
        # Write after every run so that a long experiment leaves usable results when stopped.
        write_csv(os.path.join(out, "results.csv"), rows)
        write_markdown(os.path.join(out, "results.md"), rows, header, {})

    if groups:
        groups.close()
    plots = make_plots(out, rows)
    write_csv(os.path.join(out, "results.csv"), rows)
    write_markdown(os.path.join(out, "results.md"), rows, header, plots)
    log(f"# done in {time.monotonic() - t_all:.0f} s: {len(rows) - failures} run(s) ok, {failures} failed; "
        f"{os.path.join(out, 'results.md')}, results.csv" + (f", {sum(len(v) for v in plots.values())} PNG(s)"
                                                            if plots else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
