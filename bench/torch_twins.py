#!/usr/bin/env python3
"""PyTorch twins of PiPar's models (runtime/model.cpp), block for block, for benchmarks that put PyTorch
eager beside our kernels on the same model part (bench/cuda_vs_torch.py). Same blocks, layers, order,
shapes, biases and batch-norm placement; parameters are created in the order of our Param lists, so a
PiPar checkpoint's weights load by position.

  bench/torch_twins.py --check --pipar build/apps/pipar
      compares every twin with `pipar models` (blocks, parameter count per block, output shape per
      block, for 1x28x28 and 3x32x32 inputs) and with a checkpoint that `pipar train` writes (every
      tensor's shape, in order); exits 1 on any difference.
"""
import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("vgg5", "vgg11", "vgg16", "resnet18", "resnet50", "mobilenetv3-small")


def conv_unit(cin, cout, bn, pool):
    layers = [nn.Conv2d(cin, cout, 3, 1, 1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    if pool:
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


def vgg(cfg, dense_hidden, dense_blocks, cin, h, w, classes, bn):
    blocks = []
    for i, c in enumerate(cfg):
        if c < 0:
            continue
        pool = i + 1 < len(cfg) and cfg[i + 1] < 0 and h >= 2 and w >= 2
        blocks.append(conv_unit(cin, c, bn, pool))
        cin = c
        if pool:
            h, w = h // 2, w // 2
    features = cin * h * w
    for d in range(dense_blocks):
        last = d + 1 == dense_blocks
        layers = [nn.Flatten()] if d == 0 else []
        layers.append(nn.Linear(features, classes if last else dense_hidden))
        if not last:
            layers.append(nn.ReLU())
        blocks.append(nn.Sequential(*layers))
        features = dense_hidden
    return blocks


class Residual(nn.Module):
    """act(main(x) + shortcut(x)); no shortcut = identity."""

    def __init__(self, main, shortcut, relu_after):
        super().__init__()
        self.main = main
        self.shortcut = shortcut
        self.relu_after = relu_after

    def forward(self, x):
        y = self.main(x) + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu(y) if self.relu_after else y


def resnet_block(cin, planes, stride, bottleneck):
    if not bottleneck:
        out = planes
        main = nn.Sequential(nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
                             nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes))
    else:
        out = planes * 4
        main = nn.Sequential(nn.Conv2d(cin, planes, 1, 1, 0, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
                             nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
                             nn.Conv2d(planes, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out))
    shortcut = None
    if stride != 1 or cin != out:
        shortcut = nn.Sequential(nn.Conv2d(cin, out, 1, stride, 0, bias=False), nn.BatchNorm2d(out))
    return nn.Sequential(Residual(main, shortcut, True)), out


def resnet(counts, bottleneck, cin, classes):
    blocks = [nn.Sequential(nn.Conv2d(cin, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())]
    cin = 64
    for stage, planes in enumerate((64, 128, 256, 512)):
        for i in range(counts[stage]):
            block, cin = resnet_block(cin, planes, 2 if stage > 0 and i == 0 else 1, bottleneck)
            blocks.append(block)
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)))
    return blocks


def make_divisible(v, divisor=8):
    r = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if r < 0.9 * v:
        r += divisor
    return r


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(conv2(relu(conv1(avgpool(x))))), 1x1 convs with bias."""

    def __init__(self, c, reduced):
        super().__init__()
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, reduced, 1), nn.ReLU(),
                                     nn.Conv2d(reduced, c, 1), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.squeeze(x)


MOBILENETV3_SMALL = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                     (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                     (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
                     (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)]


def mobilenetv3(cfg, last_conv, last_dense, cin, classes):
    def act(hs):
        return nn.Hardswish() if hs else nn.ReLU()

    c = 16
    blocks = [nn.Sequential(nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.Hardswish())]
    for k, exp, out, se, hs, stride in cfg:
        layers = []
        if exp != c:
            layers += [nn.Conv2d(c, exp, 1, 1, 0, bias=False), nn.BatchNorm2d(exp), act(hs)]
        layers += [nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False), nn.BatchNorm2d(exp), act(hs)]
        if se:
            layers.append(SqueezeExcite(exp, make_divisible(exp / 4.0)))
        layers += [nn.Conv2d(exp, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out)]
        body = nn.Sequential(*layers)
        blocks.append(nn.Sequential(Residual(body, None, False)) if stride == 1 and c == out else body)
        c = out
    blocks.append(nn.Sequential(nn.Conv2d(c, last_conv, 1, 1, 0, bias=False), nn.BatchNorm2d(last_conv), nn.Hardswish()))
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last_conv, last_dense), nn.Hardswish()))
    blocks.append(nn.Sequential(nn.Linear(last_dense, classes)))
    return blocks


def build(name, input_chw, classes=10, batch_norm=True):
    """The model's blocks as an nn.ModuleList; blocks[P:] is the server part of split point P."""
    c, h, w = input_chw
    M = -1
    if name == "vgg5":
        blocks = vgg([32, M, 64, M, 64], 128, 2, c, h, w, classes, batch_norm)
    elif name == "vgg11":
        blocks = vgg([64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M], 512, 3, c, h, w, classes, batch_norm)
    elif name == "vgg16":
        blocks = vgg([64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M], 512, 3, c, h, w,
                     classes, batch_norm)
    elif name == "resnet18":
        blocks = resnet([2, 2, 2, 2], False, c, classes)
    elif name == "resnet50":
        blocks = resnet([3, 4, 6, 3], True, c, classes)
    elif name == "mobilenetv3-small":
        blocks = mobilenetv3(MOBILENETV3_SMALL, 576, 1024, c, classes)
    else:
        raise ValueError(f"no PyTorch twin of '{name}' (have: {', '.join(MODELS)})")
    return nn.ModuleList(blocks)


def read_checkpoint(path):
    """A PiPar checkpoint's records (runtime/checkpoint.h, versions 1-2): [(name, kind, shape, data)]."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:8] != b"PIPARCKP":
        raise ValueError(f"{path} is not a PiPar checkpoint")
    pos = 8
    version, meta_len = struct.unpack_from("<II", buf, pos)
    pos += 8 + meta_len
    (count,) = struct.unpack_from("<I", buf, pos)
    pos += 4
    records = []
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", buf, pos)
        pos += 2
        name = buf[pos:pos + name_len].decode()
        pos += name_len
        kind = buf[pos]
        pos += 1
        shape = struct.unpack_from("<4q", buf, pos)
        pos += 32
        n = shape[0] * shape[1] * shape[2] * shape[3]
        data = torch.frombuffer(bytearray(buf[pos:pos + 4 * n]), dtype=torch.float32) if n else torch.zeros(0)
        pos += 4 * n
        records.append((name, kind, shape, data))
    return records


def load_checkpoint(blocks, path):
    """Our weights (kind 0) into the twin's parameters and our batch-norm statistics (kind 2) into its
    running buffers, by position; every shape must match (numel, since ours are 4-d)."""
    records = read_checkpoint(path)
    weights = [r for r in records if r[1] == 0]
    buffers = [r for r in records if r[1] == 2]
    params = list(blocks.parameters())
    bn_buffers = [b for n, b in blocks.named_buffers() if n.endswith("running_mean") or n.endswith("running_var")]
    if len(weights) != len(params) or len(buffers) != len(bn_buffers):
        raise ValueError(f"{path}: {len(weights)} weights and {len(buffers)} buffers, the twin has {len(params)} and "
                         f"{len(bn_buffers)}")
    with torch.no_grad():
        for (name, _, shape, data), p in zip(weights, params):
            if data.numel() != p.numel():
                raise ValueError(f"{path}: {name} {shape} does not fit the twin's {tuple(p.shape)}")
            p.copy_(data.reshape(p.shape))
        for (name, _, shape, data), b in zip(buffers, bn_buffers):
            if data.numel() != b.numel():
                raise ValueError(f"{path}: buffer {name} {shape} does not fit the twin's {tuple(b.shape)}")
            b.copy_(data.reshape(b.shape))


def pipar_models(pipar):
    """`pipar models` for 1x28x28 and 3x32x32 inputs, parsed: {(model, (c,h,w)): [(params, (c,h,w)) per block]}."""
    out = "".join(subprocess.run([pipar, "models", "--dataset", d], check=True, capture_output=True, text=True).stdout
                  for d in ("fmnist", "cifar10"))
    result, key = {}, None
    for line in out.splitlines():
        m = re.match(r"^(\S+) — (\d+) blocks, \d+ parameters, input \[1, (\d+), (\d+), (\d+)\]", line)
        if m:
            key = (m.group(1), (int(m.group(3)), int(m.group(4)), int(m.group(5))))
            result[key] = []
            continue
        m = re.match(r"^\s+(\d+)\s+\S+\s+(\d+)x(\d+)x(\d+)\s+(\d+)\s", line)
        if m and key:
            result[key].append((int(m.group(5)), (int(m.group(2)), int(m.group(3)), int(m.group(4)))))
    return result


def check(pipar):
    problems = 0
    ours = pipar_models(pipar)
    for (name, chw), blocks in sorted(ours.items()):
        if name not in MODELS:
            continue
        twin = build(name, chw)
        x = torch.zeros(2, *chw)
        twin.eval()
        got = []
        with torch.no_grad():
            for b in twin:
                x = b(x)
                got.append((sum(p.numel() for p in b.parameters()), tuple(x.shape[1:]) + (1,) * (4 - x.dim())))
        want = [(p, s) for p, s in blocks]
        ok = len(got) == len(want) and all(g[0] == w[0] and g[1] == w[1] for g, w in zip(got, want))
        print(f"{'ok ' if ok else 'BAD'} {name} {chw}: {len(got)} blocks" + ("" if ok else f"\n  twin {got}\n  ours {want}"))
        problems += not ok
    # A checkpoint of each (tiny runs on synthetic data): tensor order and shapes must load.
    with tempfile.TemporaryDirectory() as d:
        for name in ("vgg5", "resnet18", "mobilenetv3-small"):
            ck = os.path.join(d, f"{name}.ckpt")
            subprocess.run([pipar, "train", "--mode", "local", "--model", name, "--dataset", "synthetic-cifar",
                            "--limit-train", "20", "--limit-test", "10", "--epochs", "1", "--batch-size", "10",
                            "--save", ck, "--out", os.path.join(d, name)], check=True, capture_output=True)
            twin = build(name, (3, 32, 32))
            try:
                load_checkpoint(twin, ck)
                print(f"ok  {name}: checkpoint loads into the twin ({len(list(twin.parameters()))} tensors)")
            except ValueError as e:
                print(f"BAD {name}: {e}")
                problems += 1
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--pipar", default="build/apps/pipar")
    args = p.parse_args()
    if args.check:
        return 1 if check(args.pipar) else 0
    print(json.dumps({m: sum(q.numel() for q in build(m, (3, 32, 32)).parameters()) for m in MODELS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
