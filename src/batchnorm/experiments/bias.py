r"""bias - the bias before BN is redundant: BN(Wu + b) = BN(Wu).

The paper (Section 3.2): "the bias b can be ignored since its effect will be canceled
by the subsequent mean subtraction", so ``z = g(BN(Wu))``. In training mode
:math:`\mathrm{BN}(x + b) = \mathrm{BN}(x)` exactly (the batch mean absorbs ``b``), so
``b`` also gets zero gradient; in eval mode the running mean absorbs it too - after
``t`` updates with momentum ``m`` it holds ``b (1 - (1 - m)^t)`` of it, so the eval
outputs agree up to ``b (1 - m)^t / sigma``.

Measured over the seeds:

1. *Layer*: ``BatchNorm1d`` after ``Linear`` and ``BatchNorm2d`` after ``Conv2d``, with
   a random bias of order 1 and without it, in float32 - relative difference of the
   outputs, and of each against the float64 reference of the bias-free layer.
2. *Training*: fig1's network with BN (Glorot weights, hidden biases drawn from
   U(-1, 1) so they are far from zero) and the same network with the hidden biases
   removed, same weights, same batches; final test accuracy (paired), the logits'
   relative difference after training, and the size of the bias gradient at
   initialisation relative to the weights'.

Both arms use one learning rate (the two networks compute the same function, so the
same rate is the fair comparison; tuning would pick the same one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

import batchnorm
from batchnorm.reference import core as ref

from .common import band, final
from .models import MLP
from .plotting import COLORS, legend_below, pyplot, save_figure
from .protocol import paired, stat, verdict
from .report import Claim, Section
from .runner import Context
from .train import eval_steps, train

TITLE = "bias: the bias before BN is redundant"
CLAIM = ("The bias of a layer followed by BN can be dropped: BN(Wu + b) = BN(Wu), so training with and without it "
         "is the same (Ioffe & Szegedy 2015, Section 3.2).")
#: tolerances of the equality claims: float32 rounding for outputs, half a point of test accuracy
TOL_REL, TOL_ACC = 1e-5, 0.005


def settings(ctx: Context) -> dict:
    s = {"hidden": [100, 100, 100], "lr": 0.3, "batch_size": 60, "steps": 2000 if ctx.data.name == "mnist" else 1000,
         "eval_every": 50, "bias_range": 1.0}
    if ctx.fast:
        s.update(steps=20, eval_every=10)
    return s


def layer_check(seed: int, bias_range: float = 1.0) -> dict:
    """Relative differences for one seed: BN(Wu + b) vs BN(Wu) (float32), and each vs the float64 reference.

    ``"linear"``: ``u`` of shape (60, 64), ``W`` (100, 64); ``"conv"``: (8, 3, 10, 10)
    images through a 3x3 convolution with 16 output channels. Example::

        >>> layer_check(0)["linear"]["with_vs_without"] < 1e-5
        True
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    u = torch.randn(60, 64, generator=g)
    w = torch.randn(100, 64, generator=g) / 8
    b = (torch.rand(100, generator=g) * 2 - 1) * bias_range
    img = torch.randn(8, 3, 10, 10, generator=g)
    k = torch.randn(16, 3, 3, 3, generator=g) / 5
    kb = (torch.rand(16, generator=g) * 2 - 1) * bias_range
    cases = {"linear": (batchnorm.BatchNorm1d(100), F.linear(u, w, b), F.linear(u, w),
                        u.double() @ w.double().T),
             "conv": (batchnorm.BatchNorm2d(16), F.conv2d(img, k, kb), F.conv2d(img, k),
                      F.conv2d(img.double(), k.double()))}
    for name, (bn, with_b, without_b, exact) in cases.items():
        y1, y0 = bn.train()(with_b), bn.train()(without_b)
        expected, _ = ref.batch_norm_train(exact.numpy(), eps=bn.eps)
        expected = torch.from_numpy(np.asarray(expected))
        out[name] = {"with_vs_without": _rel(y1, y0), "with_vs_reference": _rel(y1, expected),
                     "without_vs_reference": _rel(y0, expected)}
    return out


def _rel(a, b) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float(torch.linalg.norm(a64 - b64) / torch.linalg.norm(b64))


def bias_run(spec: dict, seed: int, data) -> dict:
    """Train fig1's BN network with hidden biases (drawn from U(-r, r)) and the same network without them.

    Returns both histories, the logits' relative difference after training (eval and
    train mode, test images) and ``||dL/db|| / ||dL/dW||`` at initialisation.
    """
    torch.manual_seed(seed)
    kw = {"norm": "bn", "activation": "sigmoid", "init": "glorot"}
    with_b = MLP(data.num_inputs, spec["hidden"], data.num_classes, bias=True, **kw)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for lin in with_b.linears:
            lin.bias.copy_((torch.rand(lin.bias.shape, generator=g) * 2 - 1) * spec["bias_range"])
    no_b = MLP(data.num_inputs, spec["hidden"], data.num_classes, bias=False, **kw)
    no_b.load_state_dict({k: v for k, v in with_b.state_dict().items()
                          if not (k.startswith("linears.") and k.endswith(".bias"))})
    # the gradient reaching the biases at initialisation (zero up to rounding)
    loss = F.cross_entropy(with_b.train()(data.train_x[:spec["batch_size"]]), data.train_y[:spec["batch_size"]])
    gb = torch.autograd.grad(loss, [lin.bias for lin in with_b.linears] + [lin.weight for lin in with_b.linears])
    nb = len(with_b.linears)
    grad_ratio = float(torch.linalg.norm(torch.cat([x.reshape(-1) for x in gb[:nb]])) /
                       torch.linalg.norm(torch.cat([x.reshape(-1) for x in gb[nb:]])))
    evals = spec["evals"]
    hists = {}
    for name, net in (("with", with_b), ("without", no_b)):
        hists[name] = train(net, data, steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"], seed=seed,
                            evals=evals)
    with torch.no_grad():
        diff_eval = _rel(with_b.eval()(data.test_x), no_b.eval()(data.test_x))
        diff_train = _rel(with_b.train()(data.test_x), no_b.train()(data.test_x))
    bias_moved = max(float((lin.bias.detach() - b0).abs().max())
                     for lin, b0 in zip(with_b.linears, _initial_biases(spec, seed, with_b)))
    return {"with": hists["with"], "without": hists["without"], "logit_diff_eval": diff_eval,
            "logit_diff_train": diff_train, "bias_grad_ratio": grad_ratio, "bias_moved": bias_moved}


def _initial_biases(spec, seed, net):
    g = torch.Generator().manual_seed(10_000 + seed)
    return [(torch.rand(lin.bias.shape, generator=g) * 2 - 1) * spec["bias_range"] for lin in net.linears]


def run(ctx: Context) -> dict:
    s = settings(ctx)
    layers = [layer_check(seed, s["bias_range"]) for seed in ctx.seeds]
    spec = {"hidden": s["hidden"], "lr": s["lr"], "batch_size": s["batch_size"], "steps": s["steps"],
            "evals": eval_steps(s["steps"], s["eval_every"]), "bias_range": s["bias_range"]}
    res = ctx.execute(bias_run, [(spec, seed) for seed in ctx.seeds], "bias runs")
    rows = [[seed, r["with"]["test_acc"][-1], r["without"]["test_acc"][-1], r["logit_diff_eval"], r["logit_diff_train"],
             r["bias_grad_ratio"], r["bias_moved"]] for seed, r in zip(ctx.seeds, res)]
    layer_rows = [[seed, name, v["with_vs_without"], v["with_vs_reference"], v["without_vs_reference"]]
                  for seed, lc in zip(ctx.seeds, layers) for name, v in lc.items()]
    return {"settings": s, "seeds": list(ctx.seeds), "layers": layers, "runs": res, "n_test": len(ctx.data.test_y),
            "tables": {"training": {"columns": ["seed", "test_acc_with_bias", "test_acc_without_bias",
                                                "logit_rel_diff_eval", "logit_rel_diff_train",
                                                "bias_grad_over_weight_grad_at_init", "largest_bias_change"],
                                    "rows": rows},
                       "layer": {"columns": ["seed", "layer", "with_vs_without", "with_vs_float64_reference",
                                             "without_vs_float64_reference"], "rows": layer_rows}}}


def plot(metrics: dict, out_dir: Path):
    plt = pyplot()
    runs = metrics["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    band(axes[0], [r["with"] for r in runs], color=COLORS["bn"], label="with the bias b (drawn from U(-1, 1))")
    band(axes[0], [r["without"] for r in runs], color=COLORS["none"], ls="--", label="without the bias")
    axes[0].set(xlabel="training step", ylabel="test accuracy (eval mode)", ylim=(0, 1), title="training curves")
    diffs = [np.array(r["with"]["test_acc"]) - np.array(r["without"]["test_acc"]) for r in runs]
    for d, r in zip(diffs, runs):
        axes[1].plot(r["with"]["step"], 100 * d, color="gray", lw=0.8, alpha=0.7)
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(xlabel="training step", ylabel="with minus without (points)", title="per-seed accuracy difference",
                ylim=(-2, 2))
    for ax in axes:
        ax.grid(alpha=0.3)
    legend_below(fig, axes, ncol=2)
    return [(save_figure(fig, out_dir / "bias.png", bottom=0.12),
             f"fig1's BN network trained with and without the bias before BN (mean ± std over {len(runs)} seeds, left) "
             "and the per-seed difference of test accuracy (right; one test image is "
             f"{100 / metrics['n_test']:.2f} points).")]


def section(metrics: dict) -> Section:
    s, runs, layers = metrics["settings"], metrics["runs"], metrics["layers"]
    worst = {name: max(lc[name]["with_vs_without"] for lc in layers) for name in layers[0]}
    worst_ref = max(max(lc[name]["with_vs_reference"], lc[name]["without_vs_reference"])
                    for lc in layers for name in lc)
    acc_with, acc_without = final([r["with"] for r in runs]), final([r["without"] for r in runs])
    d = paired(acc_with.values, acc_without.values)
    logit_eval = stat([r["logit_diff_eval"] for r in runs])
    logit_train = stat([r["logit_diff_train"] for r in runs])
    grad = max(r["bias_grad_ratio"] for r in runs)
    moved = max(r["bias_moved"] for r in runs)
    claims = [
        Claim("BN(Wu + b) = BN(Wu): the layer's output does not depend on the bias",
              f"largest relative difference over seeds: {worst['linear']:.1e} (Linear + BatchNorm1d), "
              f"{worst['conv']:.1e} (Conv2d + BatchNorm2d); tolerance {TOL_REL:g}",
              "exact (Section 3.2, no numbers)", verdict([max(worst.values()) <= TOL_REL])),
        Claim("so training with and without the bias is indistinguishable",
              f"test accuracy {acc_with.fmt(100, 1, '%')} with vs {acc_without.fmt(100, 1, '%')} without; paired "
              f"difference {d.fmt(100, 2)} points (95% CI {100 * d.lo:+.2f} to {100 * d.hi:+.2f}; tolerance "
              f"±{100 * TOL_ACC:.1f})", "the bias is dropped in BN networks (Section 3.2)",
              verdict([-TOL_ACC <= d.lo and d.hi <= TOL_ACC])),
    ]
    rows = [["Linear + BatchNorm1d: with vs without b", f"{worst['linear']:.1e}"],
            ["Conv2d + BatchNorm2d: with vs without b", f"{worst['conv']:.1e}"],
            ["either vs the float64 reference (no bias)", f"{worst_ref:.1e}"],
            ["test accuracy with b (after training)", acc_with.fmt(100, 1, "%")],
            ["test accuracy without b", acc_without.fmt(100, 1, "%")],
            ["paired difference (points)", d.fmt(100, 2)],
            ["logits after training, relative difference, train mode (largest)", f"{max(logit_train.values):.1e}"],
            ["logits after training, relative difference, eval mode (largest)", f"{max(logit_eval.values):.1e}"],
            ["||dL/db|| / ||dL/dW|| at initialisation (largest)", f"{grad:.1e}"],
            ["largest change of any bias during training", f"{moved:.1e}"]]
    findings = [
        f"The biases receive a gradient {grad:.0e} times the weights' (zero up to rounding) and move by at most "
        f"{moved:.1e} in {s['steps']} steps: they are dead parameters. The two networks' logits still drift apart "
        f"slowly (relative {logit_train.mean:.1e} in train mode after training) because float32 rounding differs "
        "between x + b - mean(x + b) and x - mean(x), and SGD amplifies rounding differences over many steps; the "
        "accuracies agree within the tolerance.",
        "In eval mode the running mean carries the bias instead (after t updates with momentum m it holds "
        "b(1 - (1 - m)^t) of it), so eval outputs agree once t >> 1/m.",
    ]
    setup = (f"Layer check on random data (Linear 64 -> 100 and Conv2d 3 -> 16, biases drawn from U(-{s['bias_range']:g}, "
             f"{s['bias_range']:g})), float32, compared with the float64 reference. Training: fig1's network "
             f"(3x100 sigmoid, BN before every sigmoid, Glorot weights, hidden biases from U(-{s['bias_range']:g}, "
             f"{s['bias_range']:g})) and the same network without hidden biases; SGD lr {s['lr']}, batch "
             f"{s['batch_size']}, {s['steps']} steps, the same batches.")
    protocol = (f"{len(metrics['seeds'])} seeds; one learning rate for both arms (they compute the same function). "
                f"Equality claims use the stated tolerances.")
    papers = ["Ioffe & Szegedy (2015), Section 3.2: for z = g(Wu + b) the bias b can be ignored, since its effect is "
              "cancelled by the mean subtraction (its role is taken by the BN shift beta): z = g(BN(Wu))."]
    return Section("bias", TITLE, CLAIM, setup, (["measurement", "value (over seeds)"], rows), findings,
                   claims=claims, protocol=protocol, papers=papers)
