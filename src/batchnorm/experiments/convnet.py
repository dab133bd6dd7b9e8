"""convnet - the seeds' ConvNet (conv-BN-ReLU-pool x2, Linear-BN-ReLU x2, Linear) with and without BN.

Same class, same initialisation (seed), same batches, same SGD learning rate; the only
difference is the BN layers. Recorded: test accuracy (eval mode) every ``eval_every``
steps, and the steps needed to reach a fixed threshold.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models import ConvNet
from .plotting import ARM_STYLE, pyplot, save_figure
from .report import Section, fmt
from .runner import Context
from .train import steps_to_reach, train

TITLE = "convnet: the seeds' ConvNet with and without BN"
CLAIM = "Adding BN to a ConvNet makes it reach a given accuracy in fewer steps (paper, Section 4.2, on Inception)."
ARMS = ("bn", "none")


def settings(ctx: Context) -> dict:
    s = {"channels": [16, 32], "fc": [128, 64], "lr": 0.05, "batch_size": 60, "steps": 1500, "eval_every": 50,
         "threshold": 0.97 if ctx.data.name == "mnist" else 0.95}
    if ctx.fast:
        s.update(steps=20, eval_every=10)
    return s


def run(ctx: Context) -> dict:
    s, data = settings(ctx), ctx.data
    curves = {}
    for arm in ARMS:
        torch.manual_seed(ctx.seed)
        net = ConvNet(data.image_shape, data.num_classes, norm=arm, channels=s["channels"], fc=s["fc"])
        curves[arm] = train(net, data, steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], seed=ctx.seed,
                            eval_every=s["eval_every"], desc=f"convnet {arm}", quiet=ctx.quiet)
    rows = [[arm, st, a, l] for arm, h in curves.items()
            for st, a, l in zip(h["step"], h["test_acc"], h["train_loss"])]
    return {"settings": s, "curves": curves,
            "tables": {"curves": {"columns": ["arm", "step", "test_acc", "train_loss"], "rows": rows}}}


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, h in metrics["curves"].items():
        axes[0].plot(h["step"], h["test_acc"], **ARM_STYLE[arm])
        axes[1].plot(h["step"][1:], h["train_loss"][1:], **ARM_STYLE[arm])
    axes[0].axhline(metrics["settings"]["threshold"], color="gray", ls=":", lw=0.8)
    axes[0].set(xlabel="training step", ylabel="test accuracy (eval mode)", ylim=(0, 1))
    axes[1].set(xlabel="training step", ylabel="training loss (interval mean)", yscale="log")
    for ax in axes:
        ax.legend()
    return [(save_figure(fig, out_dir / "convnet.png"), "The seeds' ConvNet: test accuracy and training loss.")]


def section(metrics: dict) -> Section:
    s, c = metrics["settings"], metrics["curves"]
    thr = s["threshold"]
    r = {arm: steps_to_reach(h["step"], h["test_acc"], thr) for arm, h in c.items()}
    speed = f"{r['none'] / r['bn']:.1f}x" if r["bn"] and r["none"] else "—"
    rows = [[f"steps to reach {thr:.0%} test accuracy", fmt(r["bn"]) if r["bn"] else f"not in {s['steps']}",
             fmt(r["none"]) if r["none"] else f"not in {s['steps']}", speed],
            ["final test accuracy", f"{c['bn']['test_acc'][-1]:.1%}", f"{c['none']['test_acc'][-1]:.1%}", "—"]]
    findings = [
        "The paper's speed-up (14x fewer steps to Inception's accuracy) combines BN with a 5-30x higher learning "
        "rate, removed dropout and other changes; here only BN differs and the rate is the same, so a smaller gap "
        "is expected. With ReLU and PyTorch's default init the network without BN also trains well on small images."]
    if not r["bn"] or (r["none"] and r["none"] <= r["bn"]):
        findings.append("**Differs from the paper:** BN did not reach the threshold in fewer steps in this run.")
    setup = (f"conv3x3({s['channels'][0]})-BN-ReLU-pool, conv3x3({s['channels'][1]})-BN-ReLU-pool, "
             f"Linear({s['fc'][0]})-BN-ReLU, Linear({s['fc'][1]})-BN-ReLU, Linear(10); SGD lr {s['lr']}, batch "
             f"{s['batch_size']}, {s['steps']} steps; the arm without BN drops the BN layers only.")
    return Section("convnet", TITLE, CLAIM, setup, (["", "with BN", "without BN", "speed-up"], rows), findings)
