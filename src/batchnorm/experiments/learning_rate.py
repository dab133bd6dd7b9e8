"""learning-rate - test accuracy against the learning rate, with and without BN, sigmoid and ReLU nets.

The paper (Section 3.3): BN "enables higher learning rates" - without it, a high rate
makes gradients explode or vanish and the model gets stuck in saturated regimes; BN
Inception trains with 5x and 30x the rate of Inception (BN-x5, BN-x30).

Here fig1's network (3 hidden layers of 100 units, batch 60, plain SGD) with sigmoid
units (Glorot init) and with ReLU units (He/Kaiming init), with and without BN, is
trained for a fixed number of steps at every rate of a log grid spanning four orders
of magnitude, with every seed. Each run ends in one of four states:

* **trained** - final test accuracy at least 90% of the best mean accuracy of that network;
* **diverged** - the loss became NaN/Inf (training stopped there);
* **saturated** - not trained, and at least half of the (image, unit) pairs of the hidden
  layers pass almost no gradient at the end (sigmoid ``sigma'(z) < 0.01``; ReLU ``z <= 0``);
* **failed** - not trained for another reason (e.g. still on the initial plateau at a
  small rate, or oscillating).

The claim is about the *upper* end: the largest rate at which an arm trains, per seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .plotting import COLORS, legend_below, pyplot, save_figure
from .protocol import paired, stat, verdict
from .report import Claim, Section
from .runner import Context
from .runs import train_run
from .train import eval_steps

TITLE = "learning-rate: how large a rate each network tolerates, with and without BN"
CLAIM = ("BN enables much higher learning rates: without it, high rates make the training diverge or saturate "
         "the nonlinearities (Ioffe & Szegedy 2015, Section 3.3; BN-x5 and BN-x30 in Section 4.2).")
NETS = {"sigmoid": "glorot", "relu": "kaiming"}
NORMS = ("bn", "none")
STATES = ("trained", "diverged", "saturated", "failed")
MARKERS = {"trained": "o", "diverged": "X", "saturated": "v", "failed": "s"}


def settings(ctx: Context) -> dict:
    s = {"hidden": [100, 100, 100], "batch_size": 60, "steps": 2000 if ctx.data.name == "mnist" else 1000,
         "lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], "trained_frac": 0.9, "saturated_frac": 0.5}
    if ctx.fast:
        s.update(steps=20, lrs=[0.1, 100.0])
    return s


def _key(net, norm, lr):
    return f"{net}|{norm}|{lr:g}"


def run(ctx: Context) -> dict:
    s = settings(ctx)
    specs = {(net, norm, lr): {"model": {"kind": "mlp", "hidden": s["hidden"], "norm": norm, "activation": net,
                                         "init": init},
                               "lr": lr, "batch_size": s["batch_size"], "steps": s["steps"],
                               "evals": eval_steps(s["steps"], s["steps"]), "final": ["saturation"]}
             for net, init in NETS.items() for norm in NORMS for lr in s["lrs"]}
    keys = list(specs)
    res = iter(ctx.execute(train_run, [(specs[k], seed) for k in keys for seed in ctx.seeds], "learning-rate runs"))
    runs = {_key(*k): [next(res) for _ in ctx.seeds] for k in keys}
    cells = {}
    for net in NETS:
        best = max(float(np.mean([h["test_acc"][-1] for h in runs[_key(net, norm, lr)] if not h["diverged"]] or [0]))
                   for norm in NORMS for lr in s["lrs"])
        for norm in NORMS:
            for lr in s["lrs"]:
                cells[_key(net, norm, lr)] = [_state(h, best * s["trained_frac"], s["saturated_frac"])
                                              for h in runs[_key(net, norm, lr)]]
    rows = [[net, norm, lr, seed, (h["test_acc"][-1] if not h["diverged"] else None), st, h["diverged_at"],
             h.get("saturated_frac")]
            for net in NETS for norm in NORMS for lr in s["lrs"]
            for seed, h, st in zip(ctx.seeds, runs[_key(net, norm, lr)], cells[_key(net, norm, lr)])]
    return {"settings": s, "seeds": list(ctx.seeds), "states": cells,
            "acc": {k: [(h["test_acc"][-1] if not h["diverged"] else None) for h in v] for k, v in runs.items()},
            "tables": {"final": {"columns": ["net", "norm", "lr", "seed", "final_test_acc", "state", "diverged_at_step",
                                             "saturated_frac"], "rows": rows}}}


def _state(h: dict, trained_at: float, sat_at: float) -> str:
    if h["diverged"]:
        return "diverged"
    if h["test_acc"][-1] >= trained_at:
        return "trained"
    sat = h.get("saturated_frac")
    return "saturated" if sat is not None and sat == sat and sat >= sat_at else "failed"


def _trained_rates(metrics, net, norm, pick=max) -> list:
    """Per seed: the largest (``pick=max``) or smallest (``min``) rate whose run trained; None if none did."""
    s = metrics["settings"]
    out = []
    for i in range(len(metrics["seeds"])):
        ok = [lr for lr in s["lrs"] if metrics["states"][_key(net, norm, lr)][i] == "trained"]
        out.append(pick(ok) if ok else None)
    return out


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    s = metrics["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    for ax, net in zip(axes, NETS):
        for norm in NORMS:
            color = COLORS[norm]
            means, stds = [], []
            for lr in s["lrs"]:
                a = [0.1 if v is None else v for v in metrics["acc"][_key(net, norm, lr)]]
                means.append(np.mean(a))
                stds.append(np.std(a, ddof=1) if len(a) > 1 else 0)
            means, stds = np.array(means), np.array(stds)
            label = "with BN" if norm == "bn" else "without BN"
            ax.plot(s["lrs"], means, "-", color=color, lw=1.4, label=label)
            ax.fill_between(s["lrs"], means - stds, means + stds, color=color, alpha=0.18, lw=0)
            for lr, m in zip(s["lrs"], means):
                states = metrics["states"][_key(net, norm, lr)]
                top = max(set(states), key=states.count)  # the majority state over seeds
                ax.plot([lr], [m], MARKERS[top], color=color, ms=8, mfc="white" if top != "trained" else color)
        ax.set(xscale="log", xlabel="learning rate (SGD)", title=f"{net} network, {s['steps']} steps", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (eval mode)")
    for st, mk in MARKERS.items():
        axes[1].plot([], [], mk, color="k", mfc="white" if st != "trained" else "k", label=st)
    legend_below(fig, axes, ncol=6, title="marker: the state of the majority of seeds", title_fontsize=9)
    return [(save_figure(fig, out_dir / "learning_rate.png", bottom=0.16),
             f"Final test accuracy against the learning rate, mean ± std over {len(metrics['seeds'])} seeds; the marker "
             "shows the majority state: trained (filled), diverged (X, loss NaN/Inf), saturated (triangle), failed "
             "(square). A diverged run counts as chance (10%).")]


def _cell(metrics, net, norm, lr) -> str:
    accs = [0.1 if v is None else v for v in metrics["acc"][_key(net, norm, lr)]]
    st = metrics["states"][_key(net, norm, lr)]
    counts = ", ".join(f"{st.count(x)} {x}" for x in STATES if st.count(x))
    return f"{stat(accs).fmt(100, 1, '%')} ({counts})"


def section(metrics: dict) -> Section:
    s = metrics["settings"]
    n = len(metrics["seeds"])
    rows = [[f"{net}, {'with' if norm == 'bn' else 'without'} BN",
             *(_cell(metrics, net, norm, lr) for lr in s["lrs"])] for net in NETS for norm in NORMS]
    columns = ["network", *(f"lr {lr:g}" for lr in s["lrs"])]
    shown, ours = [], []
    findings = []
    for net in NETS:
        hb, hn = _trained_rates(metrics, net, "bn"), _trained_rates(metrics, net, "none")
        lb, ln = _trained_rates(metrics, net, "bn", min), _trained_rates(metrics, net, "none", min)
        pairs = [(b, m) for b, m in zip(hb, hn) if b is not None and m is not None]
        if len(pairs) == len(hb):
            d = paired([math.log10(b) for b, _ in pairs], [math.log10(m) for _, m in pairs])
            shown.append(d.lo > 0 or (d.std == 0 and d.mean > 0))
            ratio = f"{10 ** d.mean:.0f}x" if d.std == 0 else f"10^({d.mean:.2f} ± {d.std:.2f})x"
        else:
            shown.append(any(b is not None for b in hb) and all(m is None for m in hn))
            ratio = "—"
        ours.append(f"{net}: largest trained rate {_range(hb)} with BN vs {_range(hn)} without ({ratio})")
        st = {norm: [x for lr in s["lrs"] for x in metrics["states"][_key(net, norm, lr)]] for norm in NORMS}
        findings.append(
            f"**{net}**: the largest rate that trains is {_range(hb)} with BN and {_range(hn)} without (per seed, grid "
            f"steps of about 3x); the smallest is {_range(lb)} with BN and {_range(ln)} without (this end depends on "
            f"the {s['steps']}-step budget: a small rate is slow, not broken). Over all rates and seeds: with BN "
            + ", ".join(f"{st['bn'].count(x)} {x}" for x in STATES) + "; without BN "
            + ", ".join(f"{st['none'].count(x)} {x}" for x in STATES) + ".")
    findings.append(
        "'Diverged' means the loss became NaN/Inf; 'saturated' means training ran to the end but at least half of the "
        "hidden units' inputs sat where the nonlinearity has (almost) no gradient - the failure the paper describes "
        "for sigmoids at high rates. A run that is neither but did not train is 'failed'. The earlier single-seed "
        "version of this experiment reported a '3000x vs 1x' range: that came from the low end, where the sigmoid "
        "network without BN had not left its plateau within the step budget, and its key called saturated runs "
        "'diverged'.")
    claims = [Claim("BN allows much higher learning rates", "; ".join(ours),
                    "BN-x5 / BN-x30: Inception trained with 5x and 30x its rate (BN-x30 reaches 74.8% vs Inception's "
                    "72.2%)", verdict(shown))]
    setup = (f"fig1's network (3 hidden layers of 100 units, batch {s['batch_size']}, plain SGD), sigmoid units with "
             f"Glorot init and ReLU units with He init, with and without BatchNorm1d before every nonlinearity; "
             f"{s['steps']} steps at each rate of {', '.join(f'{x:g}' for x in s['lrs'])}.")
    protocol = (f"{n} seeds at every rate (this experiment *is* the rate sweep, so no rate is chosen). A run counts as "
                f"trained when its final test accuracy is at least {s['trained_frac']:.0%} of the best mean accuracy "
                "reached by that network (with or without BN) at any rate. The claim's effect is the per-seed paired "
                "log10 ratio of the largest trained rate with BN to the largest without.")
    papers = ["Ioffe & Szegedy (2015), Section 3.3: with BN, higher rates do not make gradients explode or vanish or "
              "the model get stuck in saturated regimes. Table 2 / Section 4.2.2: BN-x5 and BN-x30 (5x and 30x "
              "Inception's initial rate of 0.0015) train; BN-x30 reaches 74.8% top-1 vs Inception's 72.2%; "
              "BN-x5 reaches 72.2% in 2.1M steps vs Inception's 31.0M."]
    return Section("learning-rate", TITLE, CLAIM, setup, (columns, rows), findings, claims=claims, protocol=protocol,
                   papers=papers)


def _range(values) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "none"
    lo, hi = min(got), max(got)
    miss = len(values) - len(got)
    txt = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
    return txt + (f" ({miss} seeds: none)" if miss else "")
