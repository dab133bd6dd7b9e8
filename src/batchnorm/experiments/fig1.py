"""fig1 - the paper's MNIST experiment (Ioffe & Szegedy 2015, Figure 1).

A fully connected net with 3 hidden layers of 100 sigmoid units, small Gaussian
initial weights, batch 60 and plain SGD, trained with and without BN (BN between
each linear map and its sigmoid). Recorded every ``eval_every`` steps: test accuracy
(eval mode) and the 15th/50th/85th percentiles, over the test images, of the input
to one sigmoid (unit 0 of the last hidden layer) - the paper's Figure 1(a-c).
Both arms share every setting; only ``norm`` differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .models import MLP
from .plotting import ARM_STYLE, pyplot, save_figure
from .report import Section, fmt
from .runner import Context
from .train import steps_to_reach, train

TITLE = "fig1: MNIST-style MLP with and without BN (paper's Figure 1)"
CLAIM = ("BN makes the network train faster and reach higher accuracy, and keeps the distribution of a "
         "sigmoid's input stable over training (paper: Figure 1a-c).")

ARMS = ("bn", "none")
PERCENTILES = (15, 50, 85)


def settings(ctx: Context) -> dict:
    s = {"hidden": [100, 100, 100], "init_std": 0.01, "batch_size": 60, "lr": 0.5,
         "steps": 12000, "eval_every": 100, "threshold": 0.95 if ctx.data.name == "mnist" else 0.9}
    if ctx.fast:
        s.update(steps=40, eval_every=10)
    return s


def run(ctx: Context) -> dict:
    s = settings(ctx)
    data = ctx.data
    curves = {}
    for arm in ARMS:
        torch.manual_seed(ctx.seed)
        net = MLP(data.num_inputs, s["hidden"], data.num_classes, norm=arm, init_std=s["init_std"])

        def probe(model, step):
            with torch.no_grad():
                model.eval()
                _, pre = model(data.test_x, return_preacts=True)
            q = np.percentile(pre[-1][:, 0].double().numpy(), PERCENTILES)
            return {f"p{p}": float(v) for p, v in zip(PERCENTILES, q)}

        curves[arm] = train(net, data, steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], seed=ctx.seed,
                            eval_every=s["eval_every"], on_eval=probe, desc=f"fig1 {arm}", quiet=ctx.quiet)
    rows = [[arm, st, acc, loss, *(h[f"p{p}"][i] for p in PERCENTILES)]
            for arm, h in curves.items() for i, (st, acc, loss) in
            enumerate(zip(h["step"], h["test_acc"], h["train_loss"]))]
    return {"settings": s, "curves": curves, "tables": {"curves": {
        "columns": ["arm", "step", "test_acc", "train_loss", *(f"sigmoid_input_p{p}" for p in PERCENTILES)],
        "rows": rows}}}


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    curves = metrics["curves"]
    thr = metrics["settings"]["threshold"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, h in curves.items():
        ax.plot(h["step"], h["test_acc"], **ARM_STYLE[arm])
    ax.axhline(thr, color="gray", lw=0.8, ls=":", label=f"{thr:.0%} threshold")
    ax.set(xlabel="training step", ylabel="test accuracy (eval mode)", title="(a) test accuracy",
           ylim=(0, 1))
    ax.legend(loc="lower right")
    a = save_figure(fig, out_dir / "fig1_accuracy.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, arm, tag in zip(axes, ("none", "bn"), ("(b)", "(c)")):
        h = curves[arm]
        for p, ls in zip(PERCENTILES, (":", "-", ":")):
            ax.plot(h["step"], h[f"p{p}"], ls, color=ARM_STYLE[arm]["color"], label=f"{p}th percentile")
        ax.set(xlabel="training step", title=f"{tag} {ARM_STYLE[arm]['label']}")
        ax.legend(loc="best", fontsize=8)
    axes[0].set_ylabel("input to a last-layer sigmoid")
    b = save_figure(fig, out_dir / "fig1_sigmoid_input.png")
    return [(a, "Test accuracy vs training step, with and without BN."),
            (b, "15th/50th/85th percentiles over the test set of the input to one sigmoid of the last hidden "
                "layer, without BN (left) and with BN (right).")]


def section(metrics: dict) -> Section:
    s, curves = metrics["settings"], metrics["curves"]
    thr = s["threshold"]
    reach = {arm: steps_to_reach(h["step"], h["test_acc"], thr) for arm, h in curves.items()}
    final = {arm: h["test_acc"][-1] for arm, h in curves.items()}
    bn, nobn = reach["bn"], reach["none"]
    if bn and nobn:
        speed = f"{nobn / bn:.1f}x"
    elif bn:
        speed = f"> {s['steps'] / bn:.1f}x (without BN never reached it)"
    else:
        speed = "—"
    rows = [[f"steps to reach {thr:.0%} test accuracy", fmt(bn) if bn else f"not in {s['steps']}",
             fmt(nobn) if nobn else f"not in {s['steps']}", speed],
            ["final test accuracy", f"{final['bn']:.2%}", f"{final['none']:.2%}", "—"]]

    def spread(arm):
        h = curves[arm]
        med = np.array(h["p50"])
        width = np.array(h["p85"]) - np.array(h["p15"])
        return float(med.max() - med.min()), float(width[0]), float(width[-1])

    findings = []
    drift_none, drift_bn = spread("none")[0], spread("bn")[0]
    findings.append(
        f"Measured: the median input to the tracked sigmoid moved over a range of {drift_none:.2f} during training "
        f"without BN and {drift_bn:.2f} with BN; the 15-85% band went from {spread('none')[1]:.2f} to "
        f"{spread('none')[2]:.2f} wide without BN and from {spread('bn')[1]:.2f} to {spread('bn')[2]:.2f} with BN.")
    if not bn or (nobn and nobn <= bn):
        findings.append("**Differs from the paper:** BN did not reach the threshold first in this run.")
    n_images = metrics["data_description"].split(": ")[1].split(" (")[0]
    if metrics["fingerprint"]["data_name"] == "mnist":
        data_phrase = f"MNIST ({n_images})"
    else:
        data_phrase = (f"the 8x8 scikit-learn digits ({n_images}), so the accuracy ceiling and the absolute step "
                       "counts are not comparable to the paper")
    findings.append(
        f"Differences from the paper: {s['steps']} steps instead of 50,000; the data set is {data_phrase}; "
        f"the paper does not state its learning rate or initial weight scale (here lr={s['lr']}, "
        f"weights ~ N(0, {s['init_std']}^2)); both arms use the same values.")
    setup = (f"MLP {metrics['data_description'].split(':')[0]} inputs -> 3x100 sigmoid -> 10, weights "
             f"~ N(0, {s['init_std']}^2), SGD lr {s['lr']} (no momentum), batch {s['batch_size']}, "
             f"{s['steps']} steps, test accuracy in eval mode every {s['eval_every']} steps. "
             f"BN arm: BatchNorm1d before every sigmoid; otherwise identical (same seed, same init, same batches).")
    return Section("fig1", TITLE, CLAIM, setup, (["", "with BN", "without BN", "speed-up"], rows), findings)
