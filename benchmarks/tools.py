"""CPU benchmark of the model tools: inference latency before/after fold_batchnorm (vs
torch.fx.experimental.optimization.fuse), and recalibrate over 200 batches vs 200 forwards.

    python benchmarks/tools.py            # full table (a few minutes on 2 cores)
    python benchmarks/tools.py --quick    # fewer repeats

Timings are medians of interleaved runs (benchmarks.harness.time_side_by_side); ratios are
folded / unfolded (target <= 0.85), ours / fx.fuse (target <= 1.0) and recalibrate / forwards
(target <= 1.1). Writes results/tools_bench.json before printing the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import machine_line, markdown_table, time_side_by_side  # noqa: E402
from batchnorm.tools import fold_batchnorm, recalibrate  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 layout (He et al. 2016): 7x7 stem, 4 stages of 2 basic blocks, 20 BNs."""

    def __init__(self, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))  # fmt: skip
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class ConvNet(nn.Module):
    """The seeds' ConvNet: (conv-BN-ReLU-pool) x2, (Linear-BN-ReLU) x2, Linear on 3x32x32."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(self.features(x))


def _trained_stats(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def bench_fold(name, model, shape, repeats):
    from torch.fx.experimental.optimization import fuse

    x = torch.randn(shape)
    ours, report = fold_batchnorm(model, x)  # the example shows the BN1d inputs are (N, C)
    theirs = fuse(copy.deepcopy(model))
    with torch.no_grad():
        ref = model(x)
        err = float((ours(x) - ref).norm() / ref.norm())
        t = time_side_by_side(
            {"unfolded": lambda: model(x), "fold_batchnorm": lambda: ours(x), "fx fuse": lambda: theirs(x)},
            repeats=repeats,
            warmup=1,
        )
    n_bn = _count_bn(model)
    return {
        "model": name,
        "input": "x".join(map(str, shape)),
        "unfolded_ms": t["unfolded"] * 1e3,
        "folded_ms": t["fold_batchnorm"] * 1e3,
        "fx_fuse_ms": t["fx fuse"] * 1e3,
        "folded_over_unfolded": t["fold_batchnorm"] / t["unfolded"],
        "folded_over_fx_fuse": t["fold_batchnorm"] / t["fx fuse"],
        "bn_folded_ours": report.num_folded,
        "bn_folded_fx": n_bn - _count_bn(theirs),
        "bn_total": n_bn,
        "rel_err": err,
    }


def bench_recalibrate(name, model, shape, num_batches, repeats):
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(shape, generator=gen) for _ in range(num_batches)]

    def forwards():
        with torch.no_grad():
            for b in batches:
                model(b)

    def recal():
        recalibrate(model, batches, num_batches, quiet=True)

    forwards(), recal()  # warm up
    tf, tr = [], []
    for _ in range(repeats):  # interleaved
        t0 = time.perf_counter()
        forwards()
        tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        recal()
        tr.append(time.perf_counter() - t0)
    tf, tr = sorted(tf)[len(tf) // 2], sorted(tr)[len(tr) // 2]
    return {"model": name, "batch": "x".join(map(str, shape)), "batches": num_batches, "forwards_s": tf,
            "recalibrate_s": tr, "ratio": tr / tf}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = ap.parse_args(argv)
    q = args.quick
    torch.manual_seed(0)
    resnet = _trained_stats(ResNet18())
    convnet = _trained_stats(ConvNet())
    fold_rows = [
        bench_fold("ResNet-18", resnet, (1, 3, 32, 32), 10 if q else 30),
        bench_fold("ResNet-18", resnet, (32, 3, 32, 32), 3 if q else 10),
        bench_fold("ResNet-18", resnet, (1, 3, 224, 224), 3 if q else 10),
        bench_fold("ResNet-18", resnet, (32, 3, 224, 224), 1 if q else 3),
        bench_fold("seeds' ConvNet", convnet, (1, 3, 32, 32), 30 if q else 100),
        bench_fold("seeds' ConvNet", convnet, (32, 3, 32, 32), 10 if q else 30),
    ]
    recal_rows = [
        bench_recalibrate("seeds' ConvNet", convnet, (32, 3, 32, 32), 200, 1 if q else 3),
        bench_recalibrate("ResNet-18", resnet, (32, 3, 32, 32), 200, 1),
    ]
    os.makedirs("results", exist_ok=True)
    with open("results/tools_bench.json", "w") as f:
        json.dump({"machine": machine_line(), "fold": fold_rows, "recalibrate": recal_rows}, f, indent=2)

    print(machine_line())
    print()
    print(markdown_table(
        ["model", "input", "unfolded ms", "folded ms", "fx.fuse ms", "folded/unfolded", "folded/fx.fuse",
         "BN folded (ours / fx / total)", "rel. err"],
        [[r["model"], r["input"], f"{r['unfolded_ms']:.2f}", f"{r['folded_ms']:.2f}", f"{r['fx_fuse_ms']:.2f}",
          f"{r['folded_over_unfolded']:.2f}x", f"{r['folded_over_fx_fuse']:.2f}x",
          f"{r['bn_folded_ours']} / {r['bn_folded_fx']} / {r['bn_total']}", f"{r['rel_err']:.1e}"] for r in fold_rows],
    ))  # fmt: skip
    print()
    print(markdown_table(
        ["model", "batch", "batches", "200 forwards s", "recalibrate s", "recalibrate/forwards"],
        [[r["model"], r["batch"], r["batches"], f"{r['forwards_s']:.2f}", f"{r['recalibrate_s']:.2f}",
          f"{r['ratio']:.2f}x"] for r in recal_rows],
    ))  # fmt: skip


if __name__ == "__main__":
    main()
