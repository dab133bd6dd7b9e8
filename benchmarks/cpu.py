"""CPU speed of batchnorm.BatchNorm*d against torch.nn.BatchNorm*d, side by side in one run.

    python benchmarks/cpu.py [--repeats 20] [--out results/bench_cpu.json]

Prints median times (ms) of forward (training), forward+backward and eval for each
shape and layout, and the ratio ours/torch. Targets: every ratio <= 1.10 for the large
layers; for small tensors, where per-call Python work shows, <= 1.15 per layer and <= 1.05
for a whole training step of the paper's Figure 1 network (3 x 100 sigmoid MLP with
BatchNorm1d after each hidden layer, batch 60: forward, loss, backward, SGD step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine_line, markdown_table, time_side_by_side  # noqa: E402

import batchnorm  # noqa: E402

#: small layers: (label, shape, memory format); target <= 1.15
SMALL_CASES = [
    ("(256,128) small", (256, 128), torch.contiguous_format),
    ("(8,16,8,8) small", (8, 16, 8, 8), torch.contiguous_format),
]

CASES = [
    # (label, shape, memory format)
    ("(64,64,56,56)", (64, 64, 56, 56), torch.contiguous_format),
    ("(64,64,56,56) channels_last", (64, 64, 56, 56), torch.channels_last),
    ("(256,256,14,14)", (256, 256, 14, 14), torch.contiguous_format),
    ("(256,256,14,14) channels_last", (256, 256, 14, 14), torch.channels_last),
    ("(4096,1024)", (4096, 1024), torch.contiguous_format),
]


def _module(lib, ndim, c):
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[ndim]
    return getattr(lib, name)(c)


def bench_case(shape, fmt, repeats):
    torch.manual_seed(0)
    x = torch.randn(shape).to(memory_format=fmt)
    dy = torch.randn(shape).to(memory_format=fmt)
    mods = {"ours": _module(batchnorm, len(shape), shape[1]), "torch": _module(torch.nn, len(shape), shape[1])}
    xg = x.clone().requires_grad_(True)

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def fwd_bwd(m):
        def run():
            xg.grad = None
            m(xg).backward(dy)
        return run

    def ev(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    out = {}
    for m in mods.values():
        m.train()
    out["forward"] = time_side_by_side({k: fwd(m) for k, m in mods.items()}, repeats)
    out["forward+backward"] = time_side_by_side({k: fwd_bwd(m) for k, m in mods.items()}, repeats)
    for m in mods.values():
        m.eval()
    out["eval"] = time_side_by_side({k: ev(m) for k, m in mods.items()}, repeats)
    return out


def fig1_step(lib):
    """One SGD step of the Figure 1 network built from ``lib`` (torch.nn or batchnorm)."""
    torch.manual_seed(0)
    layers, width = [], 784
    for _ in range(3):
        layers += [torch.nn.Linear(width, 100), lib.BatchNorm1d(100), torch.nn.Sigmoid()]
        width = 100
    net = torch.nn.Sequential(*layers, torch.nn.Linear(100, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(60, 784), torch.randint(0, 10, (60,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    print(f"# batchnorm {batchnorm.__version__} vs torch.nn: {machine_line()}")
    rows, records = [], []
    for label, shape, fmt in CASES:
        res = bench_case(shape, fmt, args.repeats)
        for mode, t in res.items():
            ratio = t["ours"] / t["torch"]
            rows.append([label, mode, f"{t['torch'] * 1e3:.2f}", f"{t['ours'] * 1e3:.2f}", f"{ratio:.3f}"])
            records.append({"case": label, "mode": mode, "torch_s": t["torch"], "ours_s": t["ours"], "ratio": ratio})
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(markdown_table(["shape", "mode", "torch.nn ms", "batchnorm ms", "ratio"], rows))
    small = len(rows)
    for label, shape, fmt in SMALL_CASES:
        res = bench_case(shape, fmt, args.repeats * 25)
        for mode, t in res.items():
            ratio = t["ours"] / t["torch"]
            rows.append([label, mode, f"{t['torch'] * 1e3:.3f}", f"{t['ours'] * 1e3:.3f}", f"{ratio:.3f}"])
            records.append({"case": label, "mode": mode, "torch_s": t["torch"], "ours_s": t["ours"], "ratio": ratio})
            print(" | ".join(rows[-1]), flush=True)
    t = time_side_by_side({"ours": fig1_step(batchnorm), "torch": fig1_step(torch.nn)}, args.repeats * 25)
    rows.append(["fig1 MLP step (batch 60)", "SGD step", f"{t['torch'] * 1e3:.3f}", f"{t['ours'] * 1e3:.3f}",
                 f"{t['ours'] / t['torch']:.3f}"])  # fmt: skip
    records.append({"case": "fig1 step", "mode": "SGD step", "torch_s": t["torch"], "ours_s": t["ours"],
                    "ratio": t["ours"] / t["torch"]})  # fmt: skip
    print(" | ".join(rows[-1]), flush=True)
    print()
    print(markdown_table(["shape", "mode", "torch.nn ms", "batchnorm ms", "ratio"], rows))
    worst = max(r["ratio"] for r in records[:small])
    print(f"\nworst ratio, large layers {worst:.3f} (target <= 1.10)")
    worst_small = max(r["ratio"] for r in records[small:-1])
    print(f"worst ratio, small layers {worst_small:.3f} (target <= 1.15)")
    print(f"fig1 training step {records[-1]['ratio']:.3f} (target <= 1.05)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": machine_line(), "results": records}, f, indent=1)


if __name__ == "__main__":
    main()
