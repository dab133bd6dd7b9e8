"""``batchnorm demo``: a one-minute look at what batch normalization does.

Trains the same small sigmoid MLP twice on scikit-learn's embedded handwritten
digits (1,797 8x8 images; no download) - once plain, once with
:class:`batchnorm.BatchNorm1d` after every hidden linear layer - with the same
seed, data order, optimizer and learning rate, and prints test accuracy as
training goes on. The full experiments are ``batchnorm reproduce``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import batchnorm


def load_digits_tensors(seed: int = 0):
    """Digits scaled to [0, 1], split 1,437 train / 360 test with a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the install
        raise SystemExit("the demo needs scikit-learn: pip install 'batchnorm[experiments]'") from err
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def make_mlp(use_bn: bool, width: int = 100, depth: int = 3) -> nn.Sequential:
    """``depth`` sigmoid hidden layers of ``width`` units (the paper's MNIST network, smaller input)."""
    layers, fan_in = [], 64
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width))
        if use_bn:
            layers.append(batchnorm.BatchNorm1d(width))
        layers.append(nn.Sigmoid())
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def train(use_bn: bool, steps: int, lr: float, batch: int, seed: int, data, eval_every: int):
    """SGD on cross-entropy; returns [(step, test accuracy)]."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = make_mlp(use_bn)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed + 1)
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xtr), (batch,), generator=order)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                acc = (model(xte).argmax(1) == yte).float().mean().item()
            model.train()
            curve.append((step, acc))
    return curve


def run(args) -> int:
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    data = load_digits_tensors(args.seed)
    t0 = time.perf_counter()
    curves = {
        name: train(use_bn, args.steps, args.lr, args.batch, args.seed, data, args.eval_every)
        for name, use_bn in (("without BN", False), ("with BN", True))
    }
    print(f"Sigmoid MLP 64-100-100-100-10 on sklearn digits, SGD lr={args.lr}, batch {args.batch}, seed {args.seed}")
    print(f"{'step':>6} | {'without BN':>10} | {'with BN':>8}")
    for (step, a), (_, b) in zip(curves["without BN"], curves["with BN"]):
        print(f"{step:>6} | {a:>10.3f} | {b:>8.3f}")
    print(f"({time.perf_counter() - t0:.1f} s). For the full experiments: batchnorm reproduce fig1")
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("demo", help="train a small sigmoid MLP with and without batch norm and compare")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200)
    p.set_defaults(func=run)


def main(argv=None) -> int:  # pragma: no cover - thin wrapper
    parser = argparse.ArgumentParser(prog="batchnorm demo")
    sub = parser.add_subparsers()
    add_subcommands(sub)
    return run(parser.parse_args(["demo", *(argv or [])]))
