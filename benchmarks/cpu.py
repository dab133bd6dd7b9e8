"""CPU speed of batchnorm.BatchNorm*d against torch.nn.BatchNorm*d, side by side in one run.

    python benchmarks/cpu.py [--repeats 20] [--out results/bench_cpu.json]

Prints median times (ms) of forward (training), forward+backward and eval for each
shape and layout, and the ratio ours/torch (target: every ratio <= 1.10).
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
    worst = max(r["ratio"] for r in records)
    print(f"\nworst ratio {worst:.3f} (target <= 1.10)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": machine_line(), "results": records}, f, indent=1)


if __name__ == "__main__":
    main()
