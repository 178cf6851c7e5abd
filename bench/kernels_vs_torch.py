#!/usr/bin/python3
# PiPar's CPU conv/linear kernels against PyTorch (Debian's python3-torch) on the VGG5 layers: runs our
# pipar_bench_kernels (--json) and times torch on the same shapes and thread count, alternating rounds,
# then prints layer | pass | batch | ours ms | torch ms | ratio ours/torch | GFLOP/s.
# Run: bench/kernels_vs_torch.py build-gemm/bench/pipar_bench_kernels [--threads 2] [--repeats 30] [--rounds 2] [--layer conv2]
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

# name, conv?, c (in), h, w, k (out) — conv 3x3 pad 1; linear in=c, out=k (same list as kernels_bench.cpp)
LAYERS = [
    ("fmnist.conv1", True, 1, 28, 28, 32), ("fmnist.conv2", True, 32, 14, 14, 64),
    ("fmnist.conv3", True, 64, 7, 7, 64), ("fmnist.fc1", False, 3136, 1, 1, 128),
    ("fmnist.fc2", False, 128, 1, 1, 10), ("cifar10.conv1", True, 3, 32, 32, 32),
    ("cifar10.conv2", True, 32, 16, 16, 64), ("cifar10.conv3", True, 64, 8, 8, 64),
    ("cifar10.fc1", False, 4096, 1, 1, 128), ("cifar10.fc2", False, 128, 1, 1, 10),
]
PASSES = ("forward", "backward_input", "backward_weight")
BATCHES = (100, 10)


def time_fn(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms), min(ms)


def torch_rows(warmup, repeats, only):
    """Times each pass as torch runs it in training: conv via aten.convolution (oneDNN on CPU) and
    aten.convolution_backward with the output mask of the wanted gradients; linear via the matmuls
    autograd runs (addmm forward, mm for dx, mm + sum for dw, db)."""
    rows = {}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, conv, c, h, w, k in LAYERS:
            if only not in name:
                continue
            for n in BATCHES:
                if conv:
                    x = torch.rand(n, c, h, w) * 2 - 1
                    wt = torch.rand(k, c, 3, 3) * 2 - 1
                    b = torch.rand(k) * 2 - 1
                    dy = torch.rand(n, k, h, w) * 2 - 1
                    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, out_pad, groups
                    fns = {
                        "forward": lambda: F.conv2d(x, wt, b, padding=1),
                        "backward_input": lambda: torch.ops.aten.convolution_backward(
                            dy, x, wt, [k], *args, [True, False, False]),
                        "backward_weight": lambda: torch.ops.aten.convolution_backward(
                            dy, x, wt, [k], *args, [False, True, True]),
                    }
                else:
                    x = torch.rand(n, c) * 2 - 1
                    wt = torch.rand(k, c) * 2 - 1
                    b = torch.rand(k) * 2 - 1
                    dy = torch.rand(n, k) * 2 - 1
                    fns = {
                        "forward": lambda: F.linear(x, wt, b),
                        "backward_input": lambda: torch.mm(dy, wt),
                        "backward_weight": lambda: (torch.mm(dy.t(), x), dy.sum(0)),
                    }
                for p in PASSES:
                    rows[(name, p, n)] = time_fn(fns[p], warmup, repeats)
    return rows


def ours_rows(binary, threads, repeats, only):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        out = subprocess.run([binary, "--threads", str(threads), "--repeats", str(repeats), "--json", path, "--layer", only],
                             check=True, capture_output=True, text=True)
        with open(path) as f:
            data = json.load(f)
    finally:
        os.unlink(path)
    header = [line for line in out.stdout.splitlines() if line.startswith("#")]
    rows = {(r["layer"], r["pass"], r["batch"]): (r["median_ms"], r["min_ms"], r["gflops"], r["check"])
            for r in data["rows"]}
    return header, data, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("binary", help="path to pipar_bench_kernels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating ours/torch rounds; each row keeps its best median")
    ap.add_argument("--json", help="write the combined rows here")
    ap.add_argument("--layer", default="", help="only the layers whose name contains this")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    best_ours, best_torch, header, meta = {}, {}, [], {}
    for _ in range(a.rounds):
        header, meta, ours = ours_rows(a.binary, a.threads, a.repeats, a.layer)
        for key, v in ours.items():
            if key not in best_ours or v[0] < best_ours[key][0]:
                best_ours[key] = v
        theirs = torch_rows(a.warmup, a.repeats, a.layer)
        for key, v in theirs.items():
            if key not in best_torch or v[0] < best_torch[key][0]:
                best_torch[key] = v

    print("\n".join(header))
    print(f"# torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}; rounds {a.rounds} (best median per row), "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'layer':<15} {'pass':<16} {'batch':>5} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>10} "
          f"{'GFLOP/s':>8} {'check':>8}")
    out_rows, worst = [], 0.0
    for name, *_ in LAYERS:
        if a.layer not in name:
            continue
        for n in BATCHES:
            for p in PASSES:
                o, t = best_ours[(name, p, n)], best_torch[(name, p, n)]
                ratio = o[0] / t[0]
                worst = max(worst, ratio)
                flag = "" if ratio <= 1.0 else "  <-- slower"
                print(f"{name:<15} {p:<16} {n:>5} {o[0]:>9.4f} {t[0]:>9.4f} {ratio:>10.2f} {o[2]:>8.1f} {o[3]:>8.1e}{flag}")
                out_rows.append({"layer": name, "pass": p, "batch": n, "ours_ms": o[0], "torch_ms": t[0],
                                 "ratio": ratio, "gflops": o[2], "check": o[3]})
    print(f"# worst ratio ours/torch: {worst:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": {k: v for k, v in meta.items() if k != "rows"}, "torch": torch.__version__,
                       "rows": out_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
