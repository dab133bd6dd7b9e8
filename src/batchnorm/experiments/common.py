"""Helpers the experiments share: tuned arms (learning-rate grid x seeds), curve summaries, figure bands.

:func:`tuned_arms` is the protocol of :mod:`.protocol` in one call: every arm is run on
every learning rate of its grid with every seed, its rate is chosen on the validation
split (:func:`.protocol.select_lr`), and the runs at the chosen rate are returned for
reporting on the test split. ``metrics["arms"][name]`` then holds::

    {"lr": chosen, "at_edge": bool, "grid": {lr: {"mean": .., "std": ..}}, "runs": [history per seed]}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .protocol import Stat, pct, reach, select_lr, stat
from .runs import train_run

__all__ = ["at_step", "band", "edge_notes", "final", "grid_text", "lr_label", "plot_speed", "reach_all", "reach_fmt",
           "speed_table", "tuned_arms", "tuning_protocol"]


def lr_label(lr: float) -> str:
    return f"{lr:g}"


def tuned_arms(ctx, arms: dict, lrs, *, fn=train_run, desc: str = "runs", extra: dict | None = None,
               tune_seeds: int | None = None) -> dict:
    """Run ``arms`` (name -> spec without ``"lr"``) on their grid (``lrs``: a list, or name -> list) x seeds.

    The grid runs with the first ``tune_seeds`` seeds (default: all of ``ctx.seeds``);
    the chosen rate then runs with the remaining seeds too. ``extra`` maps a new arm
    name to ``(arm, lr or callable(chosen) -> lr)``: runs of an existing arm's spec at
    another rate (e.g. BN at the baseline's chosen rate, the paper's BN-Baseline
    setting), added after tuning. Returns ``{name: {"lr", "at_edge", "grid", "spec",
    "runs"}}`` as described in the module docstring (``runs``: all seeds at the chosen rate).
    """
    grids = {a: list(lrs[a] if isinstance(lrs, dict) else lrs) for a in arms}
    tune = list(ctx.seeds[:tune_seeds]) if tune_seeds else list(ctx.seeds)
    rest = [s for s in ctx.seeds if s not in tune]
    runs = [({**arms[a], "lr": lr}, s) for a in arms for lr in grids[a] for s in tune]
    results = iter(ctx.execute(fn, runs, desc))
    out = {}
    for a in arms:
        by_lr = {lr: [next(results) for _ in tune] for lr in grids[a]}
        scores = {lr: [float(np.mean(h["val_acc"])) if not h["diverged"] else 0.0 for h in hs]
                  for lr, hs in by_lr.items()}
        best, edge = select_lr(scores)
        out[a] = {"lr": best, "at_edge": edge, "spec": {**arms[a], "lr": best},
                  "grid": {lr_label(lr): {"mean": stat(v).mean, "std": stat(v).std,
                                          "diverged": sum(h["diverged"] for h in by_lr[lr])}
                           for lr, v in scores.items()},
                  "runs": by_lr[best]}
    if rest:
        more = iter(ctx.execute(fn, [(out[a]["spec"], s) for a in arms for s in rest], desc))
        for a in arms:
            out[a]["runs"] = out[a]["runs"] + [next(more) for _ in rest]
    for name, (base, rate) in (extra or {}).items():
        lr = rate(out) if callable(rate) else rate
        hs = ctx.execute(fn, [({**arms[base], "lr": lr}, s) for s in ctx.seeds], desc)
        out[name] = {"lr": lr, "at_edge": False, "spec": {**arms[base], "lr": lr}, "grid": {}, "runs": hs}
    return out


def final(runs: Sequence[dict], key: str = "test_acc") -> Stat:
    """:class:`Stat` of the last recorded ``key`` over seeds (a diverged run counts as chance, 0.1)."""
    return stat([(h[key][-1] if not h["diverged"] else 0.1) for h in runs])


def at_step(runs: Sequence[dict], step: int, key: str = "test_acc") -> Stat:
    """:class:`Stat` over seeds of ``key`` at evaluation step ``step`` (the last one recorded before it if missing)."""
    vals = []
    for h in runs:
        idx = max(i for i, s in enumerate(h["step"]) if s <= step)
        vals.append(h[key][idx] if not (h["diverged"] and h["step"][idx] < step) else 0.1)
    return stat(vals)


def reach_all(runs: Sequence[dict], threshold: float, key: str = "test_acc") -> list:
    """Steps to ``threshold`` per seed (``None`` where never reached)."""
    return [reach(h["step"], h[key], threshold) for h in runs]


def reach_fmt(values: Sequence, budget: int) -> str:
    """``"mean ± std"`` of the seeds that reached the threshold, with how many did."""
    got = [v for v in values if v is not None]
    if not got:
        return f"not in {budget}"
    s = stat(got)
    tail = "" if len(got) == len(values) else f" ({len(got)}/{len(values)} seeds reached it)"
    return f"{s.mean:.0f} ± {s.std:.0f}{tail}"


def grid_text(metrics: dict, labels: dict) -> str:
    """Validation score (mean ± std over the tuning seeds, %) of every arm at every rate, the chosen one marked ``*``."""
    parts = []
    for a, label in labels.items():
        g = metrics["arms"].get(a, {}).get("grid")
        if not g:
            continue
        cells = []
        for lr in sorted(g, key=float):
            c = g[lr]
            mark = "*" if float(lr) == metrics["arms"][a]["lr"] else ""
            div = f" ({c['diverged']} diverged)" if c["diverged"] else ""
            cells.append(f"{lr}: {100 * c['mean']:.1f} ± {100 * c['std']:.1f}{mark}{div}")
        parts.append(f"{label}: " + ", ".join(cells))
    return "; ".join(parts)


def tuning_protocol(metrics: dict, labels: dict, lrs, what: str = "arm") -> str:
    """The standard protocol sentence: seeds, the grid, the selection rule, and every arm's validation scores."""
    return (f"{len(metrics['seeds'])} seeds per {what}. Learning rate per {what} from {', '.join(f'{x:g}' for x in lrs)}, "
            "chosen by the mean validation accuracy over the evaluation points (area under the validation curve), "
            "averaged over the seeds; the test split is only reported. Validation score (%) by rate: "
            + grid_text(metrics, labels) + " (* chosen).")


def speed_table(arms: dict, labels: dict, threshold: float, budget: int, checkpoints) -> tuple[list, list]:
    """Per arm: its rate, steps to ``threshold`` and test accuracy at ``checkpoints`` and at the end (mean ± std)."""
    cps = [c for c in checkpoints if c < budget]
    rows = [[labels[a], f"{arms[a]['lr']:g}", reach_fmt(reach_all(arms[a]["runs"], threshold), budget),
             *(pct(at_step(arms[a]["runs"], c)) for c in cps), pct(final(arms[a]["runs"]))] for a in labels]
    return (["arm", "lr", f"steps to {threshold:.0%} test acc.", *(f"test acc. at step {c}" for c in cps),
             f"test acc. at step {budget}"], rows)


def plot_speed(arms: dict, labels: dict, style: dict, threshold: float, steps: int, path) -> str:
    """Test accuracy (mean ± std over seeds) against steps: log steps over the whole range, and a zoom on the top."""
    from .plotting import legend_below, pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for a in labels:
        color, ls = style[a]
        for ax in axes:
            band(ax, arms[a]["runs"], color=color, ls=ls, label=f"{labels[a]} (lr {arms[a]['lr']:g})")
    axes[0].axhline(threshold, color="gray", lw=0.8, ls=":")
    axes[0].set(xscale="symlog", xlim=(0, steps), xlabel="training step (log scale)",
                ylabel="test accuracy (eval mode)", ylim=(0, 1), title="how fast (all steps)")
    lo = min(final(arms[a]["runs"]).mean for a in labels)
    axes[1].set(xlim=(0, steps), xlabel="training step", ylabel="test accuracy (eval mode)",
                ylim=(max(0.0, min(lo - 0.03, 0.9)), 1.0), title="how high (zoomed)")
    for ax in axes:
        ax.grid(alpha=0.3)
    legend_below(fig, axes, ncol=2)
    return save_figure(fig, path, bottom=0.06 + 0.045 * ((len(labels) + 1) // 2))


def edge_notes(metrics: dict, labels: dict, chance: float = 0.2) -> list[str]:
    """Warnings for arms whose chosen rate is at the edge of the grid (or that trained at no rate at all)."""
    notes = []
    for a in labels:
        arm = metrics["arms"].get(a)
        if not arm or not arm["at_edge"]:
            continue
        best = arm["grid"][lr_label(arm["lr"])]["mean"]
        if best < chance:
            notes.append(f"**Note:** '{labels[a]}' did not train at any rate of its grid (best validation score "
                         f"{100 * best:.1f}%); its rate ({arm['lr']:g}) is the grid's least bad.")
        else:
            notes.append(f"**Note:** the best rate of '{labels[a]}' ({arm['lr']:g}) is at the edge of its grid; a "
                         f"wider grid might find a better one.")
    return notes


def band(ax, runs: Sequence[dict], key: str = "test_acc", *, color, label, ls: str = "-", x: str = "step") -> None:
    """Mean over seeds of ``key`` against ``x`` with a ±1 std band (seeds truncated to the shortest history)."""
    n = min(len(h[key]) for h in runs)
    steps = np.asarray(runs[0][x][:n], dtype=float)
    vals = np.asarray([h[key][:n] for h in runs], dtype=float)
    mean, std = vals.mean(0), vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(n)
    ax.plot(steps, mean, ls, color=color, label=label, lw=1.6)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18, lw=0)
