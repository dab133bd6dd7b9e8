"""Accuracy of float32 normalization where float32 arithmetic is hard, against float64.

    python benchmarks/accuracy.py [--skip-large]

1. Large offsets: inputs with std 1 and mean 0, 1e4, 1e6, 1e7 (the raw, unscaled features of a
   first BN layer): ``||y - y_ref|| / ||y_ref||`` for torch.nn.BatchNorm2d and
   batchnorm.BatchNorm2d in training mode, and in eval mode with running statistics equal to
   the data's (reference: :mod:`batchnorm.reference`, float64).
2. Every norm at mean 1e6, std 1, float32, ``(8, 32, 16, 16)``: GroupNorm(8), LayerNorm over
   ``(C, H, W)``, InstanceNorm2d, BatchNorm2d in training mode, against the same torch.nn module
   run in float64 on the same values.
3. Large reductions (skipped with ``--skip-large``; ~1 GB of memory, ~10 s): ``BatchNorm1d(1)``
   with momentum 1 on 2^26 samples of N(3, 1) and on ``torch.ones(2**26, 1)``: the running mean and
   (unbiased) variance after one step, against float64.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import batchnorm
from batchnorm import reference as R


def rel(a, b):
    a = a.detach().double().numpy()
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else b
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def large_offsets():
    print("| mean | mode | torch.nn rel. error | batchnorm rel. error |")
    print("|---|---|---|---|")
    for offset in (0.0, 1e4, 1e6, 1e7):
        torch.manual_seed(0)
        x = (torch.randn(64, 16, 16, 16, dtype=torch.float64) + offset).float()
        xr = x.double().numpy()
        ours, theirs = batchnorm.BatchNorm2d(16, momentum=1.0), torch.nn.BatchNorm2d(16, momentum=1.0)
        y_ref, cache = R.batch_norm_train(xr)
        e_t, e_o = rel(theirs(x), y_ref), rel(ours(x), y_ref)
        print(f"| {offset:.0e} | train | {e_t:.1e} | {e_o:.1e} |")
        st = cache.moments
        for m in (ours, theirs):
            m.eval()
            m.running_mean.copy_(torch.from_numpy(st.mean.ravel()))
            m.running_var.copy_(torch.from_numpy(st.var.ravel()))
        y_ref = R.batch_norm_eval(xr, ours.running_mean.double().numpy(), ours.running_var.double().numpy())
        print(f"| {offset:.0e} | eval | {rel(theirs(x), y_ref):.1e} | {rel(ours(x), y_ref):.1e} |")


def every_norm():
    torch.manual_seed(0)
    x = (torch.randn(8, 32, 16, 16, dtype=torch.float64) + 1e6).float()
    makers = {
        "GroupNorm(8, 32)": lambda lib: lib.GroupNorm(8, 32),
        "LayerNorm((32, 16, 16))": lambda lib: lib.LayerNorm((32, 16, 16)),
        "InstanceNorm2d(32)": lambda lib: lib.InstanceNorm2d(32),
        "BatchNorm2d(32)": lambda lib: lib.BatchNorm2d(32),
    }
    print("| module (training, mean 1e6, std 1) | torch.nn rel. error | batchnorm rel. error |")
    print("|---|---|---|")
    for name, make in makers.items():
        ref = make(torch.nn).double()(x.double())
        print(f"| {name} | {rel(make(torch.nn)(x), ref):.1e} | {rel(make(batchnorm)(x), ref):.1e} |")


def large_reductions():
    print("| input (2^26 values, one channel) | statistic | float64 | torch.nn | batchnorm |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    cases = {"N(3, 1)": torch.randn(2**26, 1) + 3, "ones": torch.ones(2**26, 1)}
    for name, x in cases.items():
        ref_mean = float(x.double().mean())
        ref_var = float(x.double().var()) if name != "ones" else 0.0
        mods = {lib: getattr(lib, "BatchNorm1d")(1, momentum=1.0) for lib in (torch.nn, batchnorm)}
        with torch.no_grad():
            for m in mods.values():
                m(x)
        t, o = mods[torch.nn], mods[batchnorm]
        print(f"| {name} | running mean | {ref_mean:.6f} | {float(t.running_mean):.6f} | {float(o.running_mean):.6f} |")
        print(f"| {name} | running var | {ref_var:.6f} | {float(t.running_var):.6f} | {float(o.running_var):.6f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-large", action="store_true", help="skip the 2^26-value reductions (~1 GB, ~10 s)")
    args = p.parse_args(argv)
    print(f"# torch {torch.__version__}, batchnorm {batchnorm.__version__}\n")
    large_offsets()
    print()
    every_norm()
    if not args.skip_large:
        print()
        large_reductions()


if __name__ == "__main__":
    main()
