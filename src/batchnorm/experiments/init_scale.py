r"""init-scale - multiply the weight matrices by k: BN's output does not change, its gradient scales as 1/k.

The paper (Section 3.3): for a layer followed by BN, :math:`\mathrm{BN}((aW)u) = \mathrm{BN}(Wu)`
for a scalar :math:`a`, so the layer's Jacobian does not depend on the scale of ``W``,
and :math:`\partial \mathrm{BN}((aW)u)/\partial(aW) = \frac1a\,\partial \mathrm{BN}(Wu)/\partial W`:
larger weights get smaller gradients. Exactly so at :math:`\epsilon = 0`; with
:math:`\epsilon > 0` the relative change is about :math:`\epsilon/(2\sigma^2)` where
:math:`k^2\sigma^2` is the pre-BN variance.

Here every hidden weight matrix of fig1's network (Glorot init) is multiplied by
``k in {0.1, 1, 10, 100}``; the classifier head is not (no BN follows it). Measured over
the seeds:

1. *Outputs at initialisation* (train mode, batch statistics of the test images):
   ``||f_k(x) - f_1(x)|| / ||f_1(x)||`` with BN at ``eps`` = 1e-5 and 1e-12, and without BN.
2. *Gradients at initialisation*: ``||k * dL/dW_k - dL/dW_1|| / ||dL/dW_1||`` (the 1/k law).
3. *Training* for each ``k``: with BN, without BN, and with BN plus the learning rate of
   the scaled matrices multiplied by ``k^2``. Under plain SGD the relative step of a
   scale-invariant weight scales as ``1/k^2``; with ``lr * k^2`` the trajectory ``kW_t`` is
   exactly ``k`` times the ``k = 1`` one, so the curves must coincide.

All arms use one learning rate: the claim is what happens *at a given rate* when the
weights are rescaled, so tuning each arm's rate would remove the effect under test.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .common import band, final
from .models import MLP, scale_weights
from .plotting import COLORS, legend_below, pyplot, save_figure
from .protocol import stat, verdict
from .report import Claim, Section
from .runner import Context
from .runs import train_run
from .train import eval_steps

TITLE = "init-scale: scaling the weights by k"
CLAIM = ("With BN, multiplying a layer's weights by k changes neither the layer's output nor the network's "
         "(BN(kWu) = BN(Wu)), and the weights' gradient scales as 1/k (Ioffe & Szegedy 2015, Section 3.3).")
ARMS = ("bn", "none", "bn-lrk2")
LABELS = {"bn": "with BN", "none": "without BN", "bn-lrk2": "with BN, lr x k² on the scaled W"}
#: the tolerance of the equality claims: float32 rounding (outputs, gradients) and half a point of accuracy
TOL_REL, TOL_ACC = 1e-5, 0.005


def settings(ctx: Context) -> dict:
    s = {"hidden": [100, 100, 100], "ks": [0.1, 1.0, 10.0, 100.0], "lr": 0.3, "batch_size": 60,
         "steps": 2000 if ctx.data.name == "mnist" else 1000, "eval_every": 50}
    if ctx.fast:
        s.update(steps=20, eval_every=10)
    return s


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float(torch.linalg.norm(a64 - b64) / torch.linalg.norm(b64))


def output_change(data, hidden, ks, norm: str, seed: int, eps: float = 1e-5) -> dict:
    """``{k: (output change, gradient change)}`` at initialisation, train mode, on ``data.test_x``.

    Output change: ``||f_k(x) - f_1(x)|| / ||f_1(x)||`` where ``f_k`` has every hidden
    weight matrix multiplied by ``k`` (all from the same ``seed``, Glorot init). Gradient
    change: ``||k * g_k - g_1|| / ||g_1||`` over all hidden weight matrices, ``g_k`` the
    cross-entropy gradient w.r.t. the scaled matrices (0 when the 1/k law holds). Example::

        >>> output_change(load_digits(), [100] * 3, [0.1, 10], "bn", 0, eps=1e-12)
        {0.1: (3e-07, 4e-07), 10.0: (2e-07, 3e-07)}
    """
    torch.manual_seed(seed)
    base = MLP(data.num_inputs, hidden, data.num_classes, norm=norm, init="glorot", eps=eps)

    def forward_grad(net):
        out = net(data.test_x)
        grads = torch.autograd.grad(F.cross_entropy(out, data.test_y), [lin.weight for lin in net.linears])
        return out.detach(), torch.cat([g.reshape(-1) for g in grads])

    ref_out, ref_grad = forward_grad(copy.deepcopy(base).train())
    out = {}
    for k in ks:
        net = copy.deepcopy(base).train()
        scale_weights(net, k)
        o, g = forward_grad(net)
        out[float(k)] = (_rel(o, ref_out), _rel(k * g, ref_grad))
    return out


def run(ctx: Context) -> dict:
    s, data = settings(ctx), ctx.data
    ks = s["ks"]
    change = {}
    for label, norm, eps in (("bn (eps 1e-5)", "bn", 1e-5), ("bn (eps 1e-12)", "bn", 1e-12), ("none", "none", 1e-5)):
        per_seed = [output_change(data, s["hidden"], ks, norm, seed, eps) for seed in ctx.seeds]
        change[label] = {f"{k:g}": {"output": [p[k][0] for p in per_seed], "grad": [p[k][1] for p in per_seed]}
                         for k in ks}
    evals = eval_steps(s["steps"], s["eval_every"])
    specs = {(arm, k): {"model": {"kind": "mlp", "hidden": s["hidden"], "norm": "none" if arm == "none" else "bn",
                                  "activation": "sigmoid", "init": "glorot"},
                        "lr": s["lr"], "batch_size": s["batch_size"], "steps": s["steps"], "evals": evals,
                        "scale_hidden": k, **({"hidden_lr_power": 2} if arm == "bn-lrk2" else {})}
             for arm in ARMS for k in ks}
    res = iter(ctx.execute(train_run, [(specs[key], seed) for key in specs for seed in ctx.seeds], "init-scale runs"))
    curves = {f"{arm}|{k:g}": [next(res) for _ in ctx.seeds] for arm, k in specs}
    rows = [[key.split("|")[0], float(key.split("|")[1]), seed, st, acc]
            for key, hs in curves.items() for seed, h in zip(ctx.seeds, hs) for st, acc in zip(h["step"], h["test_acc"])]
    change_rows = [[arm, float(k), seed, o, g] for arm, d in change.items() for k, v in d.items()
                   for seed, o, g in zip(ctx.seeds, v["output"], v["grad"])]
    return {"settings": s, "seeds": list(ctx.seeds), "output_change": change, "curves": curves,
            "tables": {"curves": {"columns": ["arm", "k", "seed", "step", "test_acc"], "rows": rows},
                       "output_change": {"columns": ["arm", "k", "seed", "rel_output_change_vs_k1",
                                                     "rel_error_of_k_times_gradient"], "rows": change_rows}}}


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    s = metrics["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(s["ks"])))
    for ax, arm in zip(axes, ARMS):
        for c, k in zip(colors, s["ks"]):
            band(ax, metrics["curves"][f"{arm}|{k:g}"], color=c, label=f"k = {k:g}")
        ax.set(title=LABELS[arm], xlabel="training step", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (eval mode)")
    legend_below(fig, axes, ncol=4)
    a = save_figure(fig, out_dir / "init_scale_curves.png", bottom=0.12)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    for what, ax in zip(("output", "grad"), axes):
        for arm, d in metrics["output_change"].items():
            if what == "grad" and arm == "none":
                continue
            ks = [float(k) for k in d if float(k) != 1.0]
            vals = [max(np.max(d[f"{k:g}"][what]), 1e-12) for k in ks]
            color = COLORS["none" if arm == "none" else "bn"]
            ax.plot(ks, vals, "o-" if "1e-12" in arm or arm == "none" else "s--", color=color, label=arm)
        ax.axhline(2.0 ** -24, color="gray", ls=":", lw=0.8, label="float32 unit roundoff")
        ax.set(xscale="log", yscale="log", xlabel="k (weight scale)",
               ylabel="max over seeds, relative to k = 1",
               title="network outputs: ||f_k - f_1|| / ||f_1||" if what == "output" else
               "weight gradients: ||k g_k - g_1|| / ||g_1||")
        ax.grid(alpha=0.3)
    legend_below(fig, axes, ncol=4)
    b = save_figure(fig, out_dir / "init_scale_outputs.png", bottom=0.12)
    n = len(metrics["seeds"])
    return [(a, f"Test accuracy while training with the hidden weight matrices scaled by k (mean ± std over {n} "
                "seeds, same learning rate for every k)."),
            (b, f"At initialisation (largest value over {n} seeds): the change of the network's outputs (logits, train "
                "mode) and the error of the 1/k gradient law, when every hidden weight matrix is multiplied by k.")]


def section(metrics: dict) -> Section:
    s, ch = metrics["settings"], metrics["output_change"]
    ks = [k for k in s["ks"] if k != 1.0]
    rows = [[f"{arm}: outputs", *(f"{max(ch[arm][f'{k:g}']['output']):.2g}" for k in ks)] for arm in ch]
    rows += [[f"{arm}: k·gradient", *(f"{max(ch[arm][f'{k:g}']['grad']):.2g}" for k in ks)]
             for arm in ch if arm != "none"]
    fin = {key: final(hs) for key, hs in metrics["curves"].items()}
    rows += [[f"final test acc., {LABELS[arm]}", *(f"{100 * fin[f'{arm}|{k:g}'].mean:.1f} ± "
                                                  f"{100 * fin[f'{arm}|{k:g}'].std:.1f}%" for k in ks)] for arm in ARMS]
    out_bn = max(max(v["output"]) for v in ch["bn (eps 1e-12)"].values())
    grad_bn = max(max(v["grad"]) for v in ch["bn (eps 1e-12)"].values())
    out_eps = max(max(v["output"]) for v in ch["bn (eps 1e-5)"].values())
    out_none = [max(ch["none"][f"{k:g}"]["output"]) for k in ks]
    one = {arm: [h["test_acc"][-1] for h in metrics["curves"][f"{arm}|1"]] for arm in ARMS}
    deltas = {arm: stat([h["test_acc"][-1] - base for k in ks for h, base in
                         zip(metrics["curves"][f"{arm}|{k:g}"], one[arm])]) for arm in ARMS}
    lrk2 = deltas["bn-lrk2"]
    claims = [
        Claim("BN(kWu) = BN(Wu): the network's output does not depend on k",
              f"largest relative change over k and seeds {out_bn:.1e} with eps = 1e-12 (tolerance {TOL_REL:g}); "
              f"{out_eps:.1e} with the default eps = 1e-5; without BN {min(out_none):.2f}-{max(out_none):.2f}",
              "exact at eps = 0 (Section 3.3, no numbers)", verdict([out_bn <= TOL_REL])),
        Claim("the weights' gradient scales as 1/k", f"largest relative error of k·g_k vs g_1: {grad_bn:.1e} "
              f"(tolerance {TOL_REL:g})", "exact at eps = 0 (Section 3.3)", verdict([grad_bn <= TOL_REL])),
        Claim("so with lr·k² on the scaled weights training is the same for every k",
              f"final accuracy minus k = 1's, all k and seeds: {lrk2.fmt(100, 2)} points (95% CI "
              f"{100 * lrk2.lo:+.2f} to {100 * lrk2.hi:+.2f}; tolerance ±{100 * TOL_ACC:.1f})",
              "follows from the 1/k law (not stated)", verdict([-TOL_ACC <= lrk2.lo and lrk2.hi <= TOL_ACC])),
    ]
    findings = [
        f"With BN and plain SGD (one rate for all k) the final accuracy still depends on k - difference to k = 1 over "
        f"all k and seeds {deltas['bn'].fmt(100, 1)} points - because the relative step of a scale-invariant weight "
        f"scales as 1/k²: large k learns slowly, small k fast. The paper states the 1/k gradient law (and that it "
        f"stabilises the growth of the weights); it does not claim identical training curves, which only hold with "
        f"the rate rescaled by k² (third arm). Without BN: {deltas['none'].fmt(100, 1)} points, large k saturates the "
        f"sigmoids.",
        f"With the default eps = 1e-5 the invariance is not exact at small k ({out_eps:.1e} at worst): eps is not "
        f"scaled with k, so it matters more when the pre-BN variance k²σ² is small.",
    ]
    setup = (f"fig1's network (3x100 sigmoid, Glorot init), hidden weight matrices x k for k in "
             f"{', '.join(f'{k:g}' for k in s['ks'])}; SGD lr {s['lr']}, batch {s['batch_size']}, {s['steps']} steps; "
             "output and gradient checks on the test images in train mode (batch statistics).")
    protocol = (f"{len(metrics['seeds'])} seeds. One learning rate for every arm and k (see the module docstring: "
                "tuning per arm would remove the effect under test). Equality claims use the stated tolerances.")
    papers = ["Ioffe & Szegedy (2015), Section 3.3: BN(Wu) = BN((aW)u), the Jacobian of the layer is unaffected by "
              "the scale a, and the gradient w.r.t. aW is 1/a times the gradient w.r.t. W, so larger weights get "
              "smaller gradients and BN stabilises the parameter growth (analysis, no measurements)."]
    return Section("init-scale", TITLE, CLAIM, setup,
                   (["relative change vs k = 1 (largest over seeds)", *(f"k = {k:g}" for k in ks)], rows), findings,
                   claims=claims, protocol=protocol, papers=papers)
