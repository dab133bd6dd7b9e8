"""learning-rate - final accuracy against the learning rate, with and without BN.

The fig1 network (3x100 sigmoid, batch 60, SGD) with PyTorch's default init (with
fig1's N(0, 0.01^2) init the arm without BN stays on its initial plateau for
thousands of steps at every rate, which hides the effect of the rate) is trained for a
fixed number of steps at each learning rate of a log-spaced grid spanning three orders
of magnitude, with and without BN; the same seed (same init, same batches) for every
run. Recorded: final test accuracy (eval mode) and whether the loss diverged (NaN/Inf,
training stopped). The paper's claim (Section 3.3): BN allows much higher learning rates.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models import MLP
from .plotting import ARM_STYLE, pyplot, save_figure
from .report import Section
from .runner import Context
from .train import progress, train

TITLE = "learning-rate: accuracy against learning rate"
CLAIM = "BN tolerates much larger learning rates than the same network without BN (paper, Section 3.3)."
ARMS = ("bn", "none")


def settings(ctx: Context) -> dict:
    s = {"hidden": [100, 100, 100], "init_std": None, "batch_size": 60, "steps": 1500,
         "lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]}
    if ctx.fast:
        s.update(steps=15, lrs=[0.1, 10.0])
    return s


def run(ctx: Context) -> dict:
    s, data = settings(ctx), ctx.data
    rows = []
    with progress(len(s["lrs"]) * len(ARMS), "learning-rate runs", ctx.quiet) as bar:
        for lr in s["lrs"]:
            for arm in ARMS:
                torch.manual_seed(ctx.seed)
                net = MLP(data.num_inputs, s["hidden"], data.num_classes, norm=arm, init_std=s["init_std"])
                h = train(net, data, steps=s["steps"], batch_size=s["batch_size"], lr=lr, seed=ctx.seed,
                          eval_every=s["steps"], quiet=True)
                # a diverged run is scored at chance level: its weights are NaN/Inf
                acc = h["test_acc"][-1] if not h["diverged"] else 1.0 / data.num_classes
                rows.append([arm, lr, acc, bool(h["diverged"])])
                bar.update(1)
    return {"settings": s, "tables": {"final": {"columns": ["arm", "lr", "final_test_acc", "diverged"],
                                                "rows": rows}}}


def _by_arm(metrics):
    out = {arm: ([], [], []) for arm in ARMS}
    for arm, lr, acc, div in metrics["tables"]["final"]["rows"]:
        out[arm][0].append(lr)
        out[arm][1].append(acc)
        out[arm][2].append(div)
    return out


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, (lrs, accs, divs) in _by_arm(metrics).items():
        ax.plot(lrs, accs, "o-", **ARM_STYLE[arm])
        d = [(lr, a) for lr, a, dv in zip(lrs, accs, divs) if dv]
        if d:
            ax.plot(*zip(*d), "x", ms=10, color=ARM_STYLE[arm]["color"])
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (SGD)", ylabel="final test accuracy (eval mode)", ylim=(0, 1),
           title=f"after {metrics['settings']['steps']} steps (x = diverged)")
    ax.legend()
    return [(save_figure(fig, out_dir / "learning_rate.png"),
             "Final test accuracy against the learning rate; x marks runs whose loss became NaN/Inf.")]


def section(metrics: dict) -> Section:
    s = metrics["settings"]
    by = _by_arm(metrics)
    rows = [[f"lr {lr:g}", f"{by['bn'][1][i]:.1%}" + (" (diverged)" if by["bn"][2][i] else ""),
             f"{by['none'][1][i]:.1%}" + (" (diverged)" if by["none"][2][i] else "")]
            for i, lr in enumerate(by["bn"][0])]

    def good_range(arm, frac=0.9):
        lrs, accs, _ = by[arm]
        best = max(accs)
        ok = [lr for lr, a in zip(lrs, accs) if a >= frac * best]
        return min(ok), max(ok), best

    lo_b, hi_b, best_b = good_range("bn")
    lo_n, hi_n, best_n = good_range("none")
    findings = [
        f"Measured: with BN, accuracy within 90% of its best ({best_b:.1%}) for learning rates {lo_b:g} to {hi_b:g} "
        f"({hi_b / lo_b:.0f}x range); without BN (best {best_n:.1%}) for {lo_n:g} to {hi_n:g} ({hi_n / lo_n:.0f}x).",
        f"Both arms use the same {s['steps']} steps, seed, init and batches at each rate. Short training favours "
        f"large rates in both arms; a diverged run (loss NaN/Inf) is scored at chance level. The paper shows the "
        f"effect on Inception/ImageNet (up to 30x the base rate); this is the same comparison on a small MLP."]
    if hi_b <= hi_n:
        findings.append("**Differs from the paper:** BN did not extend the usable range upwards in this run.")
    init = "PyTorch's default init" if s["init_std"] is None else f"weights ~ N(0, {s['init_std']}^2)"
    setup = (f"fig1's network (3x100 sigmoid, {init}), SGD, batch {s['batch_size']}, "
             f"{s['steps']} steps per run, learning rates {', '.join(f'{x:g}' for x in s['lrs'])}.")
    return Section("learning-rate", TITLE, CLAIM, setup, (["learning rate", "with BN", "without BN"], rows),
                   findings)
