#!/usr/bin/env python3
"""PiPar's CUDA conv/linear kernels against the vendors' on the same GPU (the CUDA backend issue):
runs pipar_bench_cuda --json (our hand-written GEMM path and cuBLAS, on the layers it records from the
server parts of real models at each micro-batch size), then times PyTorch on the same shapes: conv
through cuDNN (torch.backends.cudnn.benchmark on, so cuDNN picks its fastest algorithm per shape),
linear through cuBLAS, FP32 with TF32 off on both sides. Same timing method as ours: CUDA events around
enough back-to-back calls to last --min-ms, median over --repeats samples.

  bench/cuda_vs_torch.py --bench build/bench/pipar_bench_cuda [--models vgg5:2:fmnist,...]
      [--micro 10,25,100] [--repeats 15] [--min-ms 0.5] [--json out.json]

Then a whole server step of each model's part at each micro-batch size, ours (autotuned kernels)
against its PyTorch twin (bench/torch_twins.py) in eager mode, and the two-stream overlap figure that
pipar_bench_cuda prints.

Prints, per layer and pass, hand-written / cuBLAS / cuDNN (ours calling it) / torch milliseconds and
the vendor's speed over ours (vendor = the fastest of cuBLAS, cuDNN and torch's cuDNN or cuBLAS): the issue asks for hand-written at
least 0.8x the vendor's speed, i.e. vendor ms / hand ms >= 0.8. Then per model and micro-batch the sum
over the server part's layers (each counted as often as the part has it).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PASSES = ("forward", "backward_input", "backward_weight")


def torch_times(layer, repeats, min_ms):
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)

    def rand(*shape):
        return torch.rand(*shape, device=dev, generator=g) * 2 - 1

    x = rand(*layer["x"])
    w = rand(*layer["w"])
    b = rand(layer["w"][0]) if layer["bias"] else None
    if layer["conv"]:
        stride, pad, groups = layer["stride"], layer["pad"], layer["groups"]
        y = F.conv2d(x, w, b, stride=stride, padding=pad, groups=groups)
        dy = rand(*y.shape)
        bias_sizes = [w.shape[0]] if b is not None else None
        args = (stride, pad, [1, 1], False, [0, 0], groups)

        fns = {
            "forward": lambda: F.conv2d(x, w, b, stride=stride, padding=pad, groups=groups),
            "backward_input": lambda: torch.ops.aten.convolution_backward(
                dy, x, w, bias_sizes, *args, [True, False, False]),
            "backward_weight": lambda: torch.ops.aten.convolution_backward(
                dy, x, w, bias_sizes, *args, [False, True, b is not None]),
        }
    else:
        x2 = x.reshape(x.shape[0], -1)
        w2 = w.reshape(w.shape[0], -1)
        dy = rand(x2.shape[0], w2.shape[0])

        def bw():
            dw = dy.t().mm(x2)
            if b is not None:
                dy.sum(0)
            return dw

        fns = {
            "forward": lambda: F.linear(x2, w2, b),
            "backward_input": lambda: dy.mm(w2),
            "backward_weight": bw,
        }
    out = {}
    with torch.no_grad():
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(), fn(), e1.record(), e1.synchronize()
            one = max(1e-3, e0.elapsed_time(e1))
            inner = max(1, int(-(-min_ms // one)))
            ms = []
            for _ in range(repeats):
                e0.record()
                for _ in range(inner):
                    fn()
                e1.record()
                e1.synchronize()
                ms.append(e0.elapsed_time(e1) / inner)
            out[name] = statistics.median(ms)
    return out


def torch_step_ms(twins, st, repeats, steps, device="cuda"):
    import time

    import torch
    import torch.nn.functional as F

    chw = (1, 28, 28) if st["dataset"] in ("fmnist", "mnist") else (3, 32, 32)
    blocks = twins.build(st["model"], chw)
    part = torch.nn.Sequential(*blocks[st["split"]:]).to(device).train()
    x0 = torch.zeros(st["micro"], *chw)
    with torch.no_grad():
        for b in blocks[:st["split"]]:
            x0 = b.eval()(x0)
    g = torch.Generator(device=device).manual_seed(2)
    x = (torch.rand(x0.shape, device=device, generator=g) * 2 - 1).requires_grad_(True)
    y = torch.randint(0, 10, (st["micro"],), device=device, generator=g)
    opt = torch.optim.SGD(part.parameters(), lr=0.01, momentum=0.9)

    def run(n):
        for _ in range(n):
            loss = F.cross_entropy(part(x), y)
            loss.backward()  # to the cut too: the server returns that gradient
            opt.step()
            opt.zero_grad()
            x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    run(2)
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(steps)
        ms.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(ms)


def describe(l):
    if l["conv"]:
        return (f"conv {l['kernel'][0]}x{l['kernel'][1]} s{l['stride'][0]} p{l['pad'][0]} g{l['groups']} "
                f"{l['x'][1]}->{l['w'][0]} @{l['x'][2]}x{l['x'][3]}")
    return f"linear {l['w'][1] * l['w'][2] * l['w'][3]}->{l['w'][0]}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="build/bench/pipar_bench_cuda")
    p.add_argument("--models")
    p.add_argument("--micro")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--min-ms", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=20, help="server steps per timed repeat (ours and torch's)")
    p.add_argument("--json", help="write every layer's times here")
    args = p.parse_args()

    try:
        import torch
    except ImportError:
        sys.exit("cuda_vs_torch: PyTorch is not installed here (the GPU machine's python3 has it)")
    if not torch.cuda.is_available():
        print("# cuda_vs_torch: skipped, PyTorch sees no CUDA device")
        return 77
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    fd, ours_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [args.bench, "--repeats", str(args.repeats), "--min-ms", str(args.min_ms), "--json", ours_path,
           "--overlap-steps", str(args.steps)]
    if args.models:
        cmd += ["--models", args.models]
    if args.micro:
        cmd += ["--micro", args.micro]
    print("# " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"cuda_vs_torch: {args.bench} exited with {rc}")
    with open(ours_path) as f:
        ours = json.load(f)
    os.unlink(ours_path)

    print(f"\n# PyTorch {torch.__version__} (cuDNN {torch.backends.cudnn.version()}) on {torch.cuda.get_device_name(0)}; "
          f"pipar commit {ours['commit']}; vendor = fastest of cuBLAS, cuDNN (through ours) and torch; "
          "speed = vendor ms / hand ms")
    print(f"{'model':<20} {'micro':>5} {'layer':<40} {'pass':<16} {'base':>9} {'hand':>9} {'cublas':>9} {'cudnn':>9} "
          f"{'torch':>9} {'vendor/hand':>11}")
    totals = {}
    speeds, base_speeds = [], []
    for l in ours["layers"]:
        t = torch_times(l, args.repeats, args.min_ms)
        l["torch_ms"] = t
        key = (f"{l['model']}:{l['split']}", l["micro"])
        tot = totals.setdefault(key, [0.0, 0.0, 0.0, 0.0, 0.0])
        for ps in PASSES:
            ms = l["times"][ps]
            hand, cb, vd, th = ms["handwritten_ms"], ms["cublas_ms"], ms["vendor_ms"], t[ps]
            base = ms.get("baseline_ms", hand)  # absent in JSON from before the baseline column
            vendor = min(cb, vd, th)
            speeds.append(vendor / hand)
            base_speeds.append(vendor / base)
            for i, v in enumerate((hand, cb, vd, th, base)):
                tot[i] += v * l["count"]
            print(f"{key[0]:<20} {l['micro']:>5} {describe(l):<40} {ps:<16} {base:9.4f} {hand:9.4f} {cb:9.4f} {vd:9.4f} "
                  f"{th:9.4f} {vendor / hand:11.2f}", flush=True)
    print("\n# the server part's conv and linear layers, all passes, summed (ms); base = the hand-written path with "
          "the baseline planning (64x64 tiles, a GEMM per sample)")
    print(f"{'model':<20} {'micro':>5} {'base':>9} {'hand':>9} {'cublas':>9} {'cudnn':>9} {'torch':>9} {'vendor/base':>11} "
          f"{'vendor/hand':>11}")
    for (model, micro), (h, c, vd, th, b) in totals.items():
        print(f"{model:<20} {micro:>5} {b:9.3f} {h:9.3f} {c:9.3f} {vd:9.3f} {th:9.3f} {min(c, vd, th) / b:11.2f} "
              f"{min(c, vd, th) / h:11.2f}")
    steps = ours.get("steps", [])
    if steps:
        import torch_twins  # noqa: E402 (bench/, beside this script)
        print(f"\n# whole server step (forward, loss, backward to the cut, SGD with momentum): ours with autotuned "
              f"kernels against the PyTorch twin (bench/torch_twins.py) in eager mode, ms per step, wall clock "
              f"to an idle GPU, median of {args.repeats} x {args.steps} steps; goal: torch/ours >= 1.2 at micro-batch "
              f"10 and 25, >= 1.0 at 100")
        print("ours: kernel by kernel; graph: the same step replayed as a CUDA graph (as the CUDA server runs "
              "its micro-batches; n/a where it could not be captured)")
        print(f"{'model':<28} {'micro':>5} {'ours':>9} {'graph':>9} {'torch':>9} {'torch/ours':>10} {'torch/graph':>11}")
        for st in steps:
            t = torch_step_ms(torch_twins, st, args.repeats, args.steps)
            st["torch_ms"] = t
            g = st.get("graph_ms", -1)
            g_col, g_ratio = (f"{g:9.3f}", f"{t / g:11.2f}") if g > 0 else (f"{'n/a':>9}", f"{'n/a':>11}")
            print(f"{st['model'] + ':' + str(st['split']) + ':' + st['dataset']:<28} {st['micro']:>5} {st['ms']:9.3f} "
                  f"{g_col} {t:9.3f} {t / st['ms']:10.2f} {g_ratio}", flush=True)
    speeds.sort()
    base_speeds.sort()
    print(f"\n# vendor/hand over {len(speeds)} layer passes: median {statistics.median(speeds):.2f}, "
          f"worst {speeds[0]:.2f}; at least 0.8 in {sum(s >= 0.8 for s in speeds)} of {len(speeds)} (goal: 0.8)")
    print(f"# vendor/base (the baseline planning) over the same passes: median {statistics.median(base_speeds):.2f}, "
          f"worst {base_speeds[0]:.2f}; at least 0.8 in {sum(s >= 0.8 for s in base_speeds)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ours, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
