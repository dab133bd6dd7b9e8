"""Accuracy of float32 batch norm at large offsets, against the float64 reference.

    python benchmarks/accuracy.py

For inputs with std 1 and mean 0, 1e4, 1e6, 1e7 (the raw, unscaled features of a
first BN layer), prints ||y - y_ref|| / ||y_ref|| for torch.nn.BatchNorm2d and
batchnorm.BatchNorm2d in training mode, and in eval mode with running statistics
equal to the data's.
"""

from __future__ import annotations

import numpy as np
import torch

import batchnorm
from batchnorm import reference as R


def rel(a, b):
    a = a.detach().double().numpy()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
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


if __name__ == "__main__":
    main()
