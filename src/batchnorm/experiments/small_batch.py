"""small-batch - where batch statistics break down, and what rescues them.

A small CNN (conv-norm-ReLU-pool x2, linear) is trained at batch sizes 2..64 with
each normalization: batch norm, batch renorm (Ioffe 2017), ghost batch norm (virtual
batches; Hoffer et al. 2017) and group norm (Wu & He 2018). Every run sees the same
number of epochs at the same learning rate with the same seed; only the
normalization (and, across columns, the batch size) differs. Recorded: test accuracy
in eval mode - which is what a deployed model uses and where tiny-batch BN fails,
because the running statistics average noisy per-batch estimates that the training
forward never saw.

Normalizations whose module is missing from the installation are skipped and listed
in the report.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models import ConvNet, norm_available
from .plotting import ARM_STYLE, pyplot, save_figure
from .report import Section
from .runner import Context
from .train import evaluate, progress, train

TITLE = "small-batch: normalizations at batch sizes 2..64"
CLAIM = ("BN degrades at very small batches (noisy batch statistics, train/eval mismatch); batch renorm and "
         "group norm are designed to fix this (Ioffe 2017; Wu & He 2018); ghost BN changes the statistics' "
         "batch size, not the data's.")
NORM_KINDS = ("bn", "renorm", "ghost", "group")


def settings(ctx: Context) -> dict:
    s = {"batch_sizes": [2, 4, 8, 16, 32, 64], "epochs": 3, "lr": 0.05, "ghost_batch": 8, "channels": [16, 32]}
    if ctx.fast:
        s.update(batch_sizes=[4, 32], epochs=1)
    return s


def run(ctx: Context) -> dict:
    s, data = settings(ctx), ctx.data
    kinds = [k for k in NORM_KINDS if norm_available(k)]
    missing = [k for k in NORM_KINDS if k not in kinds]
    n = len(data.train_y)
    rows = []
    with progress(len(kinds) * len(s["batch_sizes"]), "small-batch runs", ctx.quiet) as bar:
        for bs in s["batch_sizes"]:
            steps = s["epochs"] * (n // bs)
            for kind in kinds:
                torch.manual_seed(ctx.seed)
                net = ConvNet(data.image_shape, data.num_classes, norm=kind, channels=s["channels"], fc=(),
                              ghost_batch=min(s["ghost_batch"], bs))
                h = train(net, data, steps=steps, batch_size=bs, lr=s["lr"], seed=ctx.seed, eval_every=steps,
                          quiet=True)
                eval_acc = h["test_acc"][-1] if not h["diverged"] else 1.0 / data.num_classes
                train_acc = evaluate(net, data.test_x, data.test_y, train_mode=True, batch_size=bs) \
                    if not h["diverged"] else 1.0 / data.num_classes
                rows.append([kind, bs, steps, eval_acc, train_acc, bool(h["diverged"])])
                bar.update(1)
    return {"settings": s, "missing": missing, "tables": {"results": {
        "columns": ["norm", "batch_size", "steps", "test_acc_eval_mode", "test_acc_batch_stats", "diverged"],
        "rows": rows}}}


def _grid(metrics):
    out = {}
    for kind, bs, _, acc_eval, acc_train, _ in metrics["tables"]["results"]["rows"]:
        out.setdefault(kind, {})[bs] = (acc_eval, acc_train)
    return out


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    grid = _grid(metrics)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind, d in grid.items():
        bss = sorted(d)
        ax.plot(bss, [d[b][0] for b in bss], "o-", **ARM_STYLE[kind])
    ax.set(xscale="log", xlabel="batch size", ylabel="test accuracy (eval mode)", ylim=(0, 1),
           title=f"same {metrics['settings']['epochs']} epochs at every batch size")
    ax.set_xticks(metrics["settings"]["batch_sizes"], [str(b) for b in metrics["settings"]["batch_sizes"]])
    ax.legend()
    return [(save_figure(fig, out_dir / "small_batch.png"),
             "Test accuracy (eval mode) against the training batch size for each normalization.")]


def section(metrics: dict) -> Section:
    s = metrics["settings"]
    grid = _grid(metrics)
    bss = s["batch_sizes"]
    rows = [[ARM_STYLE[k]["label"], *(f"{grid[k][b][0]:.1%}" for b in bss)] for k in grid]
    findings = []
    if "bn" in grid:
        small, large = bss[0], bss[-1]
        findings.append(
            f"Measured: BN's eval-mode accuracy is {grid['bn'][small][0]:.1%} at batch {small} and "
            f"{grid['bn'][large][0]:.1%} at batch {large}; with batch statistics of the test batches it is "
            f"{grid['bn'][small][1]:.1%} at batch {small} (the gap is the train/eval mismatch).")
        if grid["bn"][small][0] >= grid["bn"][large][0] - 0.02:
            findings.append(
                "**Differs from the papers:** BN did not break down at the smallest batch here. Likely reasons: the "
                "images are small and homogeneous, so even tiny batches give usable statistics; at a fixed number of "
                "epochs small batches take many more steps; the papers' failures are in deep ImageNet/COCO models.")
    for k in ("renorm", "group"):
        if k in grid and "bn" in grid:
            findings.append(f"{ARM_STYLE[k]['label']} at batch {bss[0]}: {grid[k][bss[0]][0]:.1%} (BN: "
                            f"{grid['bn'][bss[0]][0]:.1%}).")
    findings.append(
        f"Ghost BN normalizes over virtual batches of min({s['ghost_batch']}, batch size), so up to that size it is plain BN; it targets "
        "large-batch generalization, not small batches. The papers' settings are ImageNet/COCO with batch 2-32 per "
        "worker; here a small CNN on small images, so the absolute numbers differ; all normalizations share the "
        "network, learning rate, epochs, seed and batches.")
    if metrics["missing"]:
        findings.append("**Not run:** " + ", ".join(metrics["missing"]) + " (module not present in this build).")
    setup = (f"CNN conv{s['channels'][0]}-norm-ReLU-pool, conv{s['channels'][1]}-norm-ReLU-pool, linear; SGD lr "
             f"{s['lr']}, {s['epochs']} epochs at each batch size ({', '.join(map(str, bss))}); group norm with 4 "
             f"groups; batch renorm with r_max 3, d_max 5 from the start.")
    return Section("small-batch", TITLE, CLAIM, setup, (["test accuracy (eval mode)", *(f"batch {b}" for b in bss)],
                                                         rows), findings)
