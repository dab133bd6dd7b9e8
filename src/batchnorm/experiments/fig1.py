"""fig1 - the paper's MNIST experiment (Ioffe & Szegedy 2015, Section 4.1 and Figure 1).

The paper: a fully connected net with 3 hidden layers of 100 sigmoid units, weights
initialised to small random Gaussian values, trained for 50,000 steps with batches of
60, with and without BN before each sigmoid. Figure 1(a): test accuracy against steps
(BN trains faster and reaches a higher accuracy); (b, c): the 15th/50th/85th percentiles
of the input to a typical sigmoid over training, without and with BN (with BN it
stays stable).

Here the same network, batch and SGD on MNIST (``--data-dir``) or the embedded digits.
Four arms, each at its own best learning rate chosen on the validation split:

* with / without BN, **Glorot init** - the standard init for sigmoid networks;
* with / without BN, **the paper's init** N(0, 0.01^2) (the paper says "small random
  Gaussian values"; 0.01 is this project's reading), the second, labelled setting.

Measured over the seeds: test accuracy (eval mode) along training, steps to a threshold
(per-seed paired ratio), accuracy at fixed step counts, and the drift of the inputs to
the last hidden layer's sigmoids (median and 15-85% band of every unit, on 600
validation images with batch statistics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import edge_notes, plot_speed, reach_all, speed_table, tuned_arms, tuning_protocol
from .plotting import COLORS, pyplot, save_figure
from .protocol import fmt_ratio, paired, ratio_stat, stat, verdict
from .report import Claim, Section
from .runner import Context
from .train import eval_steps

TITLE = "fig1: the paper's MNIST network with and without BN (Figure 1)"
CLAIM = ("BN makes the network train faster and reach a higher test accuracy, and keeps the distribution of a "
         "sigmoid's input stable during training (Ioffe & Szegedy 2015, Section 4.1, Figure 1a-c).")

PAPER_INIT = ["normal", 0.01]
ARMS = {"bn": ("bn", "glorot"), "none": ("none", "glorot"), "bn-paper": ("bn", PAPER_INIT),
        "none-paper": ("none", PAPER_INIT)}
LABELS = {"bn": "with BN, Glorot init", "none": "without BN, Glorot init",
          "bn-paper": "with BN, paper's init N(0, 0.01²)", "none-paper": "without BN, paper's init N(0, 0.01²)"}
STYLE = {"bn": (COLORS["bn"], "-"), "none": (COLORS["none"], "-"), "bn-paper": (COLORS["bn"], "--"),
         "none-paper": (COLORS["none"], "--")}
PAIRS = {"Glorot init": ("bn", "none"), "paper's init": ("bn-paper", "none-paper")}


def settings(ctx: Context) -> dict:
    mnist = ctx.data.name == "mnist"
    s = {"hidden": [100, 100, 100], "batch_size": 60, "lrs": [0.1, 0.3, 1.0, 3.0, 10.0],
         "steps": 5000 if mnist else 3000, "eval_every": 50, "dense_until": 300,
         "dense_every": 10, "threshold": 0.9, "checkpoints": [100, 500, 1000]}
    if ctx.fast:
        s.update(steps=60, eval_every=20, dense_until=0, lrs=[0.3, 3.0], checkpoints=[20])
    return s


def run(ctx: Context) -> dict:
    s = settings(ctx)
    evals = eval_steps(s["steps"], s["eval_every"], s["dense_until"], s["dense_every"])
    arms = {a: {"model": {"kind": "mlp", "hidden": s["hidden"], "norm": norm, "activation": "sigmoid", "init": init},
                "batch_size": s["batch_size"], "steps": s["steps"], "evals": evals, "probes": ["sigmoid_input"]}
            for a, (norm, init) in ARMS.items()}
    res = tuned_arms(ctx, arms, s["lrs"], desc="fig1 runs")
    for a in ARMS:  # keep the drift summary, not every unit's percentiles at every step (megabytes of JSON)
        for h in res[a]["runs"]:
            if "unit_median" in h:
                h["median_drift"], h["band_drift"] = drift(h)
                del h["unit_median"], h["unit_band"]
    rows = [[a, res[a]["lr"], seed, st, va, ta, lo, p15, p50, p85]
            for a in ARMS for seed, h in zip(ctx.seeds, res[a]["runs"])
            for st, va, ta, lo, p15, p50, p85 in zip(h["step"], h["val_acc"], h["test_acc"], h["train_loss"],
                                                     h["p15"], h["p50"], h["p85"])]
    grid_rows = [[a, float(lr), g["mean"], g["std"], g["diverged"]] for a in ARMS for lr, g in res[a]["grid"].items()]
    return {"settings": s, "seeds": list(ctx.seeds), "arms": res, "probe_images": min(600, len(ctx.data.val_y)),
            "tables": {
        "curves": {"columns": ["arm", "lr", "seed", "step", "val_acc", "test_acc", "train_loss", "sigmoid_input_p15",
                               "sigmoid_input_p50", "sigmoid_input_p85"], "rows": rows},
        "lr_grid": {"columns": ["arm", "lr", "val_score_mean", "val_score_std", "diverged_runs"], "rows": grid_rows}}}


def drift(h: dict) -> tuple[float, float]:
    """Mean over the last layer's units of the range over training of (median, 15-85% band width) of its input."""
    med, wid = np.asarray(h["unit_median"]), np.asarray(h["unit_band"])
    return float((med.max(0) - med.min(0)).mean()), float((wid.max(0) - wid.min(0)).mean())


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    s, arms = metrics["settings"], metrics["arms"]
    a_png = plot_speed(arms, LABELS, STYLE, s["threshold"], s["steps"], out_dir / "fig1_accuracy.png")

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for row, (init, (bn, none)) in enumerate(PAIRS.items()):
        for col, (arm, tag) in enumerate(((none, "(b) without BN"), (bn, "(c) with BN"))):
            ax, h = axes[row, col], arms[arm]["runs"][0]
            color = STYLE[arm][0]
            ax.fill_between(h["step"], h["p15"], h["p85"], color=color, alpha=0.2, lw=0, label="15th-85th percentile")
            ax.plot(h["step"], h["p50"], color=color, lw=1.6, label="median")
            ax.set(title=f"{tag}, {init}", xlabel="training step", ylabel="input to one last-layer sigmoid")
            ax.grid(alpha=0.3)
    from matplotlib.patches import Patch

    fig.legend([Patch(color="gray", alpha=0.3), plt.Line2D([], [], color="gray", lw=1.6)],
               ["15th-85th percentile", "median (red: without BN, blue: with BN)"], loc="lower center", ncol=2,
               frameon=False, fontsize=9)
    b_png = save_figure(fig, out_dir / "fig1_sigmoid_input.png", bottom=0.06)
    seed = metrics["seeds"][0]
    return [(a_png, f"Test accuracy against training steps, mean ± std over {len(metrics['seeds'])} seeds, each arm at "
                    f"its own best learning rate; left on a log step axis with the {s['threshold']:.0%} threshold "
                    f"dotted, right zoomed on the top of the accuracy range."),
            (b_png, f"The paper's Figure 1(b, c): 15th, 50th and 85th percentile over {metrics['probe_images']} "
                    f"validation images of the "
                    f"input to one sigmoid of the last hidden layer (unit 0, seed {seed}), without BN (left) and with "
                    f"BN (right), for both inits; note the different y-scales.")]


def section(metrics: dict) -> Section:
    s, arms = metrics["settings"], metrics["arms"]
    thr, budget = s["threshold"], s["steps"]
    reach_ = {a: reach_all(arms[a]["runs"], thr) for a in ARMS}
    columns, rows = speed_table(arms, LABELS, thr, budget, s["checkpoints"])

    speed, gain, stable, shown_speed, shown_gain, shown_stable = {}, {}, {}, [], [], []
    for setting, (bn, none) in PAIRS.items():
        r = ratio_stat(reach_[none], reach_[bn], budget)
        speed[setting] = r
        shown_speed.append(bool(r["ratios"]) and r["ci95"][0] > 1 and not r["ours_missing"])
        d = paired([h["test_acc"][-1] for h in arms[bn]["runs"]], [h["test_acc"][-1] for h in arms[none]["runs"]])
        gain[setting] = d
        shown_gain.append(d.lo > 0)
        dm = paired([h["median_drift"] for h in arms[none]["runs"]], [h["median_drift"] for h in arms[bn]["runs"]])
        stable[setting] = (dm, stat([h["median_drift"] for h in arms[none]["runs"]]),
                           stat([h["median_drift"] for h in arms[bn]["runs"]]))
        shown_stable.append(dm.lo > 0)

    n = len(metrics["seeds"])
    claims = [
        Claim(f"BN reaches {thr:.0%} test accuracy in fewer steps",
              "; ".join(f"{k}: {fmt_ratio(r)} fewer" for k, r in speed.items()),
              "Figure 1(a): faster (no step counts given)", verdict(shown_speed)),
        Claim(f"BN ends at a higher test accuracy (after {budget} steps)",
              "; ".join(f"{k}: {d.fmt(100, 2)} points" for k, d in gain.items()),
              "Figure 1(a): higher throughout 50,000 steps (curves only, no numbers)", verdict(shown_gain)),
        Claim("BN keeps a sigmoid's input distribution stable",
              "; ".join(f"{k}: median drifts {w.fmt(1, 2)} without vs {b.fmt(1, 2)} with BN"
                        for k, (d, w, b) in stable.items()),
              "Figure 1(b, c): stable with BN, drifting without", verdict(shown_stable)),
    ]
    findings = [
        "Steps-to-threshold ratios are per seed (the same seed gives both arms the same data order; with the same "
        "init they also start from the same weights) and reported as mean ± std over seeds; '>=' marks seeds "
        f"where the arm without BN never reached {thr:.0%} in {budget} steps and counts {budget} (a lower bound).",
        "Stability is measured on all 100 units of the last hidden layer: for each unit, the range over training of "
        "the median of its input (and of its 15-85% band width), averaged over units; per seed, without BN minus "
        "with BN. Band-width drift: " + "; ".join(
            f"{k}: {stat([h['band_drift'] for h in arms[PAIRS[k][1]]['runs']]).fmt(1, 2)} without vs "
            f"{stat([h['band_drift'] for h in arms[PAIRS[k][0]]['runs']]).fmt(1, 2)} with BN" for k in PAIRS) + ".",
        f"Final accuracy after {budget} steps, BN minus no BN: " + "; ".join(
            f"{k}: {d.fmt(100, 2)} points (95% CI {100 * d.lo:+.2f} to {100 * d.hi:+.2f})" for k, d in gain.items())
        + ". With the paper's N(0, 0.01²) init the network without BN first sits on a long plateau at chance - "
        "the earlier single-seed '88x' came from that init with one shared, untuned rate of 0.5.",
        f"Differences from the paper: {budget} steps instead of 50,000; {metrics['data_description']}; "
        f"{n} seeds per arm; the paper does not state its learning rate or init scale.",
    ] + edge_notes(metrics, LABELS)
    setup = (f"MLP with 3 hidden layers of 100 sigmoid units, batch {s['batch_size']}, plain SGD (no momentum), "
             f"{budget} steps, test and validation accuracy in eval mode at {len(eval_steps(budget, s['eval_every'], s['dense_until'], s['dense_every']))} "
             f"points (every {s['dense_every']} steps up to {s['dense_until']}, then every {s['eval_every']}). "
             "BN arms: BatchNorm1d between every linear map and its sigmoid; nothing else differs.")
    protocol = tuning_protocol(metrics, LABELS, s["lrs"])
    papers = ["Ioffe & Szegedy (2015), Section 4.1 and Figure 1(a): on MNIST the BN network's test accuracy is above "
              "that of the network without BN throughout 50,000 steps and ends higher (the paper shows curves, no "
              "numbers or step counts); Figure 1(b, c): without BN the mean and variance of a sigmoid's input change "
              "during training, with BN they stay stable."]
    return Section("fig1", TITLE, CLAIM, setup, (columns, rows), findings, claims=claims, protocol=protocol,
                   papers=papers)
