#!/usr/bin/python3
"""Reference run: the same VGG5 (conv32-pool, conv64-pool, conv64, dense128, dense10; batch-norm),
data normalization, SGD (lr 0.01, momentum 0.9), batch 100 and 2 epochs as
`pipar train --mode local --model vgg5 --dataset fmnist --epochs 2`, in PyTorch (Debian's
python3-torch), to tell what accuracy this recipe reaches independently of PiPar's kernels.

  bench/torch_vgg5_fmnist.py [--epochs 2] [--threads 2] [--seed 1]
"""
import argparse
import gzip
import time

import numpy as np
import torch
import torch.nn as nn


def load(kind):
    d = "/usr/share/datasets/fashion-mnist/"
    with gzip.open(d + f"{kind}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32) / 255
    with gzip.open(d + f"{kind}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return torch.from_numpy((x - 0.2860) / 0.3530), torch.from_numpy(y)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    xtr, ytr = load("train")
    xte, yte = load("t10k")
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(a.epochs):
        net.train()
        perm = torch.randperm(len(xtr))
        t0 = time.monotonic()
        for i in range(0, len(xtr), 100):
            idx = perm[i:i + 100]
            opt.zero_grad()
            loss = loss_fn(net(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
        t1 = time.monotonic()
        net.eval()
        with torch.no_grad():
            correct = sum((net(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item() for i in range(0, len(xte), 1000))
        print(f"torch epoch {epoch + 1}: test accuracy {100 * correct / len(xte):.2f}%, {t1 - t0:.1f} s "
              f"({len(xtr) / (t1 - t0):.0f} samples/s), {a.threads} threads", flush=True)


if __name__ == "__main__":
    main()
