r"""depth - per-layer gradient norms in a deep sigmoid MLP, with and without BN.

Backpropagating through a sigmoid multiplies the gradient by :math:`\sigma'(z) \le 1/4`
and by :math:`W^\top`; over many layers the product shrinks geometrically and the
first layers barely learn (vanishing gradients). BN rescales each layer's input to
unit variance, so :math:`\sigma'(z)` stays near its maximum and the Jacobian of
``BN(Wu)`` with respect to ``u`` is scale-free, which keeps the per-layer gradient
norms of the same order. Measured: the Frobenius norm of each hidden weight matrix's
gradient, averaged over 5 fixed training batches, at initialisation and during
training, and the test accuracy, for the same deep net (Glorot init, the standard for
sigmoid) with and without BN, each at its own best learning rate.

The paper's large-scale version of this claim is BN-x5-Sigmoid: Inception with
sigmoid units trains with BN (69.8%) and not without it (never above 0.1%).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .common import band, edge_notes, final, tuned_arms, tuning_protocol
from .plotting import COLORS, legend_below, pyplot, save_figure
from .protocol import paired, pct, stat, verdict
from .report import Claim, Section
from .runner import Context
from .train import eval_steps

TITLE = "depth: gradient norms per layer in a deep sigmoid MLP"
CLAIM = ("In a deep sigmoid network without BN the gradients vanish towards the first layers and it does not "
         "train; BN keeps them of the same order in every layer and the network trains (Ioffe & Szegedy 2015, "
         "Sections 1, 3.3 and 4.2.2: BN-x5-Sigmoid).")
ARMS = ("bn", "none")
LABELS = {"bn": "with BN", "none": "without BN"}


def settings(ctx: Context) -> dict:
    s = {"depth": 15, "width": 64, "lrs": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "batch_size": 60,
         "steps": 2000 if ctx.data.name == "mnist" else 1000, "probe_every": 100}
    if ctx.fast:
        s.update(depth=6, steps=20, probe_every=10, lrs=[0.3, 3.0])
    return s


def run(ctx: Context) -> dict:
    s = settings(ctx)
    evals = eval_steps(s["steps"], s["probe_every"])
    arms = {a: {"model": {"kind": "mlp", "hidden": [s["width"]] * s["depth"], "norm": a, "activation": "sigmoid",
                          "init": "glorot"},
                "batch_size": s["batch_size"], "steps": s["steps"], "evals": evals, "probes": ["grad_norms"]}
            for a in ARMS}
    res = tuned_arms(ctx, arms, s["lrs"], desc="depth runs")
    rows = [[a, seed, st, layer + 1, g] for a in ARMS for seed, h in zip(ctx.seeds, res[a]["runs"])
            for st, gs in zip(h["step"], h["grad_norms"]) for layer, g in enumerate(gs)]
    return {"settings": s, "seeds": list(ctx.seeds), "arms": res,
            "tables": {"grad_norms": {"columns": ["arm", "seed", "step", "layer", "grad_norm"], "rows": rows}}}


def _log_ratio(h: dict, idx: int) -> float:
    """log10 of (first hidden layer's gradient norm / last hidden layer's) at evaluation point ``idx``."""
    g = h["grad_norms"][idx]
    return math.log10(max(g[0], 1e-300) / max(g[-1], 1e-300))


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    arms, s = metrics["arms"], metrics["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, idx, title in ((axes[0], 0, "at initialisation"), (axes[1], -1, "after training")):
        for a in ARMS:
            g = np.log10(np.array([h["grad_norms"][idx] for h in arms[a]["runs"]]))
            layers = np.arange(1, g.shape[1] + 1)
            m, sd = g.mean(0), g.std(0, ddof=1) if len(g) > 1 else np.zeros(g.shape[1])
            ax.plot(layers, 10 ** m, "o-", ms=3, color=COLORS[a], label=f"{LABELS[a]} (lr {arms[a]['lr']:g})")
            ax.fill_between(layers, 10 ** (m - sd), 10 ** (m + sd), color=COLORS[a], alpha=0.18, lw=0)
        ax.set(yscale="log", xlabel="hidden layer (1 = next to the input)", ylabel="||dL/dW|| (mean of 5 batches)",
               title=f"gradient norm per layer, {title}")
        ax.grid(alpha=0.3)
    for a in ARMS:
        band(axes[2], arms[a]["runs"], color=COLORS[a], label=f"{LABELS[a]} (lr {arms[a]['lr']:g})")
    axes[2].set(xlabel="training step", ylabel="test accuracy (eval mode)", ylim=(0, 1), title="test accuracy")
    axes[2].grid(alpha=0.3)
    legend_below(fig, axes, ncol=2)
    return [(save_figure(fig, out_dir / "depth.png", bottom=0.1),
             f"{s['depth']}-layer sigmoid MLP: per-layer weight-gradient norms (geometric mean and ±1 std over "
             f"{len(metrics['seeds'])} seeds) at initialisation and after training, and test accuracy.")]


def section(metrics: dict) -> Section:
    s, arms = metrics["settings"], metrics["arms"]
    lr_init = {a: stat([_log_ratio(h, 0) for h in arms[a]["runs"]]) for a in ARMS}
    lr_end = {a: stat([_log_ratio(h, -1) for h in arms[a]["runs"]]) for a in ARMS}
    acc = {a: final(arms[a]["runs"]) for a in ARMS}
    d_grad = paired(lr_init["bn"].values, lr_init["none"].values)
    d_acc = paired(acc["bn"].values, acc["none"].values)
    rows = [["learning rate (own best)", *(f"{arms[a]['lr']:g}" for a in ARMS)],
            ["log10(first / last layer gradient norm) at init", *(lr_init[a].fmt(1, 2) for a in ARMS)],
            ["log10(first / last layer gradient norm) at the end", *(lr_end[a].fmt(1, 2) for a in ARMS)],
            [f"test accuracy after {s['steps']} steps", *(pct(acc[a]) for a in ARMS)]]
    claims = [
        Claim("without BN the gradients vanish towards the first layers; with BN they do not",
              f"first/last layer gradient norm at init: 10^({lr_init['none'].fmt(1, 1)}) without vs "
              f"10^({lr_init['bn'].fmt(1, 2)}) with BN", "argued in Sections 1 and 3.3 (no measurements)",
              verdict([d_grad.lo > 0])),
        Claim("a deep sigmoid network trains with BN and not without",
              f"{pct(acc['bn'])} with vs {pct(acc['none'])} without BN (paired {d_acc.fmt(100, 1)} points)",
              "BN-x5-Sigmoid 69.8% top-1; Inception with sigmoids never above 0.1%", verdict([d_acc.lo > 0])),
    ]
    findings = [
        f"Without BN the gradient norm falls by a factor of about {10 ** (-lr_init['none'].mean / (s['depth'] - 1)):.1f} "
        "per layer towards the input (a straight line on the log plot), consistent with sigma' <= 1/4 per sigmoid; "
        "with BN the per-layer norms stay within an order of magnitude.",
        "The paper argues the vanishing-gradient mechanism qualitatively and shows the consequence on Inception with "
        "sigmoids; the network here (depth, width) is this project's choice, identical in both arms.",
    ] + edge_notes(metrics, LABELS)
    setup = (f"MLP with {s['depth']} hidden layers of {s['width']} sigmoid units, Glorot init, SGD, batch "
             f"{s['batch_size']}, {s['steps']} steps; accuracy and the gradient norms (averaged over 5 fixed training "
             f"batches) every {s['probe_every']} steps.")
    protocol = tuning_protocol(metrics, LABELS, s["lrs"])
    papers = ["Ioffe & Szegedy (2015), Section 4.2.2: BN-x5-Sigmoid (Inception with sigmoid units and BN) reaches "
              "69.8% top-1 accuracy; without BN, Inception with sigmoid units never exceeds 0.1% (1/1000, chance)."]
    return Section("depth", TITLE, CLAIM, setup, (["", *(LABELS[a] for a in ARMS)], rows), findings, claims=claims,
                   protocol=protocol, papers=papers)
