"""regularization - does BN act as a regularizer? Train/test gap with and without BN, dropout as reference.

The paper (Section 3.4): a training example is seen together with the others of its
batch, so the network no longer produces deterministic values for it; "this effect is
advantageous to the generalization of the network", BN "regularizes the model and
reduces the need for Dropout", and removing Dropout from BN-Inception "speeds up training, without increasing overfitting"
(Section 4.2.1).

Here a ReLU MLP big enough to memorise the training split (2 hidden layers of 256, He
init) is trained long past 100% training accuracy in four arms: no regularization,
BN, dropout (p = 0.5 after each hidden layer, the classic reference), and BN + dropout.
Each arm at its own best rate on the validation split. Measured at the end: accuracy
and loss on the whole training split and on the test split (both eval mode), the gap
between them, per seed.
"""

from __future__ import annotations

from pathlib import Path

from .common import band, edge_notes, final, tuned_arms, tuning_protocol
from .plotting import COLORS, legend_below, pyplot, save_figure
from .protocol import paired, pct, stat, verdict
from .report import Claim, Section
from .runner import Context
from .train import eval_steps

TITLE = "regularization: the train/test gap with and without BN (dropout as reference)"
CLAIM = ("BN regularizes the model: it narrows the gap between training and test performance and reduces the need "
         "for Dropout (Ioffe & Szegedy 2015, Sections 3.4 and 4.2.1).")
ARMS = {"none": ("none", 0.0), "bn": ("bn", 0.0), "dropout": ("none", 0.5), "bn+dropout": ("bn", 0.5)}
LABELS = {"none": "no regularization", "bn": "BN", "dropout": "dropout 0.5", "bn+dropout": "BN + dropout 0.5"}
STYLE = {"none": (COLORS["none"], "-"), "bn": (COLORS["bn"], "-"), "dropout": (COLORS["dropout"], "-"),
         "bn+dropout": (COLORS["bn"], "--")}
#: "not better": BN + dropout may exceed BN alone by less than this (accuracy) for dropout to count as not needed
TOL_ACC = 0.005


def settings(ctx: Context) -> dict:
    s = {"hidden": [256, 256], "lrs": [0.03, 0.1, 0.3, 1.0, 3.0], "batch_size": 60,
         "steps": 4000 if ctx.data.name == "mnist" else 2000, "eval_every": 100}
    if ctx.fast:
        s.update(steps=20, eval_every=10, lrs=[0.03, 0.3])
    return s


def run(ctx: Context) -> dict:
    s = settings(ctx)
    arms = {a: {"model": {"kind": "mlp", "hidden": s["hidden"], "norm": norm, "activation": "relu", "init": "kaiming",
                          "dropout": p},
                "batch_size": s["batch_size"], "steps": s["steps"], "evals": eval_steps(s["steps"], s["eval_every"]),
                "final": ["fit"]}
            for a, (norm, p) in ARMS.items()}
    res = tuned_arms(ctx, arms, s["lrs"], desc="regularization runs")
    rows = [[a, res[a]["lr"], seed, h["train_acc_full"], h["test_acc"][-1], h["train_loss_full"], h["test_loss"]]
            for a in ARMS for seed, h in zip(ctx.seeds, res[a]["runs"]) if not h["diverged"]]
    return {"settings": s, "seeds": list(ctx.seeds), "arms": res,
            "tables": {"final": {"columns": ["arm", "lr", "seed", "train_acc", "test_acc", "train_loss", "test_loss"],
                                 "rows": rows}}}


def _gap(h, kind="acc"):
    if kind == "acc":
        return h["train_acc_full"] - h["test_acc"][-1]
    return h["test_loss"] - h["train_loss_full"]


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    arms = metrics["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in ARMS:
        color, ls = STYLE[a]
        band(axes[0], arms[a]["runs"], color=color, ls=ls, label=f"{LABELS[a]} (lr {arms[a]['lr']:g})")
    lo = min(final(arms[a]["runs"]).mean for a in ARMS)
    axes[0].set(xlabel="training step", ylabel="test accuracy (eval mode)", ylim=(max(0.0, min(lo - 0.03, 0.9)), 1.0),
                title="test accuracy (zoomed)")
    for i, a in enumerate(ARMS):
        color, _ = STYLE[a]
        for j, kind in enumerate(("acc", "loss")):
            vals = [_gap(h, kind) for h in arms[a]["runs"]]
            st = stat(vals)
            x = j * (len(ARMS) + 1) + i
            axes[1].bar(x, st.mean, yerr=st.std, color=color, alpha=0.8 if kind == "acc" else 0.45, capsize=3)
            axes[1].plot([x] * len(vals), vals, ".", color="k", ms=3)
    axes[1].set_xticks([(len(ARMS) - 1) / 2, len(ARMS) + 1 + (len(ARMS) - 1) / 2],
                       ["train acc. - test acc.", "test loss - train loss"])
    axes[1].set(ylabel="generalization gap (mean ± std, dots = seeds)", title="gap at the end of training")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    legend_below(fig, axes[:1], ncol=4)
    return [(save_figure(fig, out_dir / "regularization.png", bottom=0.1),
             f"Left: test accuracy during training (mean ± std over {len(metrics['seeds'])} seeds). Right: the "
             "generalization gap at the end - accuracy (solid) and cross-entropy (light), same colours.")]


def section(metrics: dict) -> Section:
    s, arms = metrics["settings"], metrics["arms"]
    runs = {a: arms[a]["runs"] for a in ARMS}
    gap = {a: stat([_gap(h) for h in runs[a]]) for a in ARMS}
    lgap = {a: stat([_gap(h, "loss") for h in runs[a]]) for a in ARMS}
    rows = [[LABELS[a], f"{arms[a]['lr']:g}", pct(stat([h["train_acc_full"] for h in runs[a]]), 2),
             pct(final(runs[a]), 2), gap[a].fmt(100, 2), lgap[a].fmt(1, 3)] for a in ARMS]
    columns = ["arm", "lr", "train acc.", "test acc.", "gap (points)", "test - train loss"]
    d_gap = paired([_gap(h) for h in runs["none"]], [_gap(h) for h in runs["bn"]])
    d_lgap = paired([_gap(h, "loss") for h in runs["none"]], [_gap(h, "loss") for h in runs["bn"]])
    d_test = paired(final(runs["bn"]).values, final(runs["none"]).values)
    d_drop = paired(final(runs["bn+dropout"]).values, final(runs["bn"]).values)
    d_vs = paired(final(runs["bn"]).values, final(runs["dropout"]).values)
    claims = [
        Claim("BN narrows the generalization gap (regularizes)",
              f"accuracy gap {gap['bn'].fmt(100, 2)} with BN vs {gap['none'].fmt(100, 2)} without (paired "
              f"{d_gap.fmt(100, 2)} points); loss gap {lgap['bn'].fmt(1, 3)} vs {lgap['none'].fmt(1, 3)}; dropout: "
              f"{gap['dropout'].fmt(100, 2)}", "qualitative (Section 3.4)", verdict([d_gap.lo > 0, d_lgap.lo > 0])),
        Claim("with BN, dropout is not needed",
              f"BN + dropout minus BN: {d_drop.fmt(100, 2)} points test accuracy (95% CI up to {100 * d_drop.hi:+.2f}; "
              f"'not needed' if below +{100 * TOL_ACC:.1f}); BN minus dropout alone: {d_vs.fmt(100, 2)}",
              "BN-Inception: removing Dropout does not increase overfitting (Section 4.2.1, no number)",
              verdict([d_drop.hi < TOL_ACC])),
    ]
    findings = [
        f"Test accuracy: BN {pct(final(runs['bn']))} vs none {pct(final(runs['none']))} (paired "
        f"{d_test.fmt(100, 2)} points), dropout {pct(final(runs['dropout']))}, BN + dropout "
        f"{pct(final(runs['bn+dropout']))}. The gap is measured in eval mode on the whole training split and on "
        "the test split after the last step, when every arm fits its training data (near 100% training accuracy).",
        "The regularising effect the paper describes comes from the noise of batch statistics; it is one of several "
        "effects of BN (faster optimisation at higher rates is another) and the paper gives no separate number for "
        "it. Data and network here are small: read the magnitudes as this setting's, not as general.",
    ] + edge_notes(metrics, LABELS)
    setup = (f"ReLU MLP with hidden layers {s['hidden']}, He init; BN (BatchNorm1d before each ReLU) and/or dropout "
             f"(after each hidden ReLU); plain SGD, batch {s['batch_size']}, {s['steps']} steps.")
    protocol = tuning_protocol(metrics, LABELS, s["lrs"]) + \
        f" 'Not needed' is a one-sided equality claim with tolerance {100 * TOL_ACC:.1f} points."
    papers = ["Ioffe & Szegedy (2015), Section 3.4: BN regularizes the model and reduces the need for Dropout; "
              "Section 4.2.1: removing Dropout from BN-Inception speeds up training without increasing overfitting "
              "(no separate number)."]
    return Section("regularization", TITLE, CLAIM, setup, (columns, rows), findings, claims=claims, protocol=protocol,
                   papers=papers)
