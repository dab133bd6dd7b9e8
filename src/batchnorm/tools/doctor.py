r"""The batch-norm doctor: find the pitfalls users keep running into, and say what to do.

:func:`diagnose` inspects a model and one example input and returns a :class:`Report`
with a row per batch norm and a list of findings:

================== ======== =============================================================
check              severity what it means
================== ======== =============================================================
bias_before_bn     warning  a Conv/Linear with a bias feeds only a BN: in training
                            ``BN(Wx + b) = BN(Wx)`` (the batch mean absorbs ``b``), so the
                            bias is a wasted parameter
train_mode         warning  a BN is in training mode: at inference its output depends on
                            the other samples of the batch
never_updated      error    ``num_batches_tracked == 0``: eval mode uses mean 0 / variance 1
non_finite         error    NaN/Inf in the running statistics
tiny_variance      warning  ``running_var < eps`` in some channel: eval output is
                            ``gamma * (x - mu) / sqrt(eps)``, dominated by ``eps``
small_batch        warning  fewer than ``min_batch`` samples per batch: batch statistics are
                            noisy (use GroupNorm, batch renorm, ghost BN or SyncBN)
train_eval_gap     warning  on the example input, ``||BN_train(x) - BN_eval(x)|| / ||BN_eval(x)||``
                            of the layer exceeds ``gap_threshold``
keras_momentum     warning  ``momentum >= 0.5``: Keras' *decay* 0.99 is PyTorch's momentum 0.01
no_running_stats   info     ``track_running_stats=False``: eval mode uses batch statistics
================== ======== =============================================================

The gap of layer ``l`` is measured on the input that layer receives when the BNs run in
training mode (upstream layers normalize by the batch), so a layer with bad statistics does
not make the layers after it look bad too. The model itself is
never modified (the runs use a deep copy).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

import torch
from torch import nn

from ..functional.batch_norm import batch_norm
from ._graph import analyse, bn_modules, has_running_stats, num_channels

__all__ = ["diagnose", "Report", "Finding", "LayerInfo"]

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    """One problem: where (``layer``), which ``check``, how bad, what is wrong and what to do."""

    layer: str
    check: str
    severity: str
    message: str
    advice: str


@dataclass
class LayerInfo:
    """One batch norm as the doctor saw it (``gap``: train-vs-eval relative output gap, or ``None``)."""

    name: str
    type: str
    channels: int
    training: bool
    momentum: Optional[float]
    num_batches_tracked: Optional[int]
    min_running_var: Optional[float]
    gap: Optional[float]
    fed_by: str


@dataclass
class Report:
    """The doctor's result: ``layers`` (one :class:`LayerInfo` per BN), ``findings``
    (:class:`Finding`, errors first) and ``model_gap`` (relative gap of the model output between
    BN-in-training-mode and eval mode on the example input, ``None`` if not measurable).

    ``str(report)`` is a readable table; :meth:`to_json` serializes everything.
    """

    layers: List[LayerInfo] = field(default_factory=list)
    findings: List[Finding] = field(default_factory=list)
    model_gap: Optional[float] = None
    example_shape: Optional[List[int]] = None

    @property
    def ok(self) -> bool:
        """No errors and no warnings."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def checks(self, check: str) -> List[Finding]:
        """Findings of one check, e.g. ``report.checks("keras_momentum")``."""
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        layers = [{k: clean(v) for k, v in asdict(li).items()} for li in self.layers]
        return {
            "example_shape": self.example_shape,
            "model_gap": clean(self.model_gap),
            "ok": self.ok,
            "layers": layers,
            "findings": [asdict(f) for f in self.findings],
        }

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON (non-finite numbers become ``null``)."""
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        def fmt(v):
            if v is None:
                return "-"
            if isinstance(v, bool):
                return "train" if v else "eval"
            if isinstance(v, float):
                return f"{v:.3g}"
            return str(v)

        header = ("layer", "type", "C", "mode", "momentum", "batches", "min var", "gap", "fed by")
        rows = [
            (li.name, li.type, li.channels, li.training, li.momentum, li.num_batches_tracked, li.min_running_var, li.gap, li.fed_by)
            for li in self.layers
        ]
        rows = [tuple(fmt(v) for v in r) for r in rows]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        if not rows:
            out.append("(no batch norm layers)")
        if self.model_gap is not None:
            out.append(f"model output gap, BN train vs eval mode: {self.model_gap:.3g}")
        out.append("")
        if not self.findings:
            out.append("no problems found")
        for f in self.findings:
            out.append(f"[{f.severity}] {f.layer}: {f.check}: {f.message}")
            out.append(f"    -> {f.advice}")
        return "\n".join(out)


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def _call(model, example_input):
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


@torch.no_grad()
def diagnose(
    model: nn.Module,
    example_input,
    *,
    min_batch: int = 8,
    gap_threshold: float = 0.1,
    momentum_threshold: float = 0.5,
) -> Report:
    r"""Check every batch norm of ``model`` for the common pitfalls; see the module docstring.

    ``example_input`` is a tensor (or a tuple of positional / a dict of keyword arguments)
    shaped like a real batch; its first dimension is taken as the batch size. The model is
    deep-copied for the runs, so neither its parameters, buffers nor modes change.

    Args:
        min_batch: batch sizes below this get a ``small_batch`` finding (Wu & He 2018 show
            BN's error rising quickly below about 8 samples per batch).
        gap_threshold: ``train_eval_gap`` is reported above this relative gap.
        momentum_threshold: ``keras_momentum`` is reported at or above this momentum.

    Returns:
        :class:`Report`; ``print(report)`` shows a table, ``report.to_json()`` serializes it.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.99))
        >>> report = diagnose(model, torch.randn(4, 3, 16, 16))
        >>> [f.check for f in report.findings]   # bias_before_bn, never_updated, keras_momentum, ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose expects an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model)
    analysis = analyse(work)
    bns = bn_modules(work)
    findings: List[Finding] = []
    report = Report()
    first = _first_tensor(example_input if not isinstance(example_input, dict) else list(example_input.values()))
    batch = int(first.shape[0]) if first is not None and first.dim() > 0 else None
    report.example_shape = list(first.shape) if first is not None else None

    def run(module, record):
        hooks = [
            bn.register_forward_pre_hook(lambda m, args, name=name: record.setdefault(name, args[0].detach()))
            for name, bn in module.named_modules()
            if name in dict(bns)
        ]
        try:
            return _first_tensor(_call(module, example_input))
        finally:
            for h in hooks:
                h.remove()

    # eval-mode run: the model's inference output (and fallback inputs for the per-layer gaps)
    eval_inputs, train_inputs = {}, {}
    work.eval()
    try:
        out_eval = run(work, eval_inputs)
    except Exception as err:
        raise ValueError(
            f"diagnose: the model failed on the example input ({type(err).__name__}: {err}); "
            f"pass an input shaped like a real batch"
        ) from err
    # run with only the BNs in training mode (on a copy: it updates running statistics). Each BN's
    # input here is what its running statistics should describe - upstream BNs normalized by the
    # batch - so a layer's gap is its own, not inherited from a bad layer upstream.
    trained = copy.deepcopy(work)
    for _, bn in bn_modules(trained):
        bn.train()
    try:
        out_train = run(trained, train_inputs)
        if out_eval is not None and out_train is not None and out_train.shape == out_eval.shape:
            report.model_gap = _rel_gap(out_train, out_eval)
    except (ValueError, RuntimeError):
        train_inputs = {}  # e.g. one value per channel: training mode cannot run
    inputs = {**eval_inputs, **train_inputs}

    any_train = False
    for name, bn in bns:
        orig = model.get_submodule(name)
        site = analysis.sites.get(name)
        stats = has_running_stats(bn)
        nbt = getattr(bn, "num_batches_tracked", None)
        nbt = int(nbt) if isinstance(nbt, torch.Tensor) else None
        momentum = getattr(bn, "momentum", None)
        rv = bn.running_var.detach().double() if stats else None
        rm = bn.running_mean.detach().double() if stats else None
        min_var = float(rv.min()) if stats and rv.numel() else None
        eps = float(getattr(bn, "eps", 1e-5))
        any_train |= orig.training

        gap = None
        x = inputs.get(name)
        if x is not None and x.dim() >= 2 and x.numel() // max(x.shape[1], 1) >= 2:
            w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
            y_train = batch_norm(x, None, None, w, b, training=True, eps=eps)
            y_eval = batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b, training=False, eps=eps) if stats else y_train
            gap = _rel_gap(y_train, y_eval)
        report.layers.append(
            LayerInfo(
                name=name,
                type=type(bn).__name__,
                channels=num_channels(bn),
                training=orig.training,
                momentum=momentum if isinstance(momentum, (int, float)) or momentum is None else None,
                num_batches_tracked=nbt,
                min_running_var=min_var,
                gap=gap,
                fed_by=(site.prev or site.prev_kind or "?") if site else "?",
            )
        )

        def add(check, severity, message, advice, layer=name):
            findings.append(Finding(layer, check, severity, message, advice))

        if site is not None and site.prev is not None and site.prev_exclusive:
            prev = work.get_submodule(site.prev)
            if getattr(prev, "bias", None) is not None:
                add(
                    "bias_before_bn",
                    "warning",
                    f"'{site.prev}' has a bias and feeds only this BN; the batch mean cancels it (BN(Wx + b) = BN(Wx))",
                    f"construct '{site.prev}' with bias=False (or fold the BN for inference: batchnorm fold)",
                )
        if orig.training:
            add(
                "train_mode",
                "warning",
                "in training mode: outputs depend on the rest of the batch and running statistics change on every call",
                "call model.eval() before inference",
            )
        if not stats:
            add(
                "no_running_stats",
                "info",
                "track_running_stats=False: eval mode normalizes with the statistics of each batch",
                "expected for instance-style use; otherwise construct with track_running_stats=True",
            )
        else:
            finite = bool(torch.isfinite(rm).all() & torch.isfinite(rv).all())
            if not finite:
                bad = int((~torch.isfinite(rm) | ~torch.isfinite(rv)).sum())
                add(
                    "non_finite",
                    "error",
                    f"running statistics contain NaN/Inf in {bad} channel(s)",
                    "find the diverging step (e.g. check_finite=True on this library's BN), then run "
                    "batchnorm.tools.recalibrate (or `batchnorm recalibrate`) on clean data",
                )
            never = nbt == 0 if nbt is not None else bool((rm == 0).all() & (rv == 1).all())
            if never:
                add(
                    "never_updated",
                    "error",
                    "running statistics were never updated (num_batches_tracked == 0): eval mode uses mean 0, variance 1",
                    "train the model, or compute the statistics with batchnorm.tools.recalibrate(model, batches)",
                )
            if finite and min_var is not None and min_var < eps:
                tiny = int((rv < eps).sum())
                add(
                    "tiny_variance",
                    "warning",
                    f"running_var < eps={eps:g} in {tiny} channel(s) (min {min_var:.3g}): those channels are "
                    f"nearly constant and eval mode scales them by up to 1/sqrt(eps)",
                    "check for dead channels (e.g. after ReLU or pruning); recalibrate, or prune the channel",
                )
        if isinstance(momentum, (int, float)) and momentum >= momentum_threshold:
            add(
                "keras_momentum",
                "warning",
                f"momentum={momentum}: PyTorch's momentum is the weight of the NEW batch, so the running "
                f"statistics follow the last batch almost only",
                f"Keras/TF decay d is PyTorch momentum 1 - d: use momentum={1 - momentum:.3g}",
            )
        if gap is not None and gap > gap_threshold:
            add(
                "train_eval_gap",
                "warning",
                f"on the example input, train-mode and eval-mode outputs differ by {gap:.3g} (relative): the running "
                f"statistics do not describe this input",
                "run batchnorm.tools.recalibrate on representative data, or check the example input's preprocessing",
            )

    if bns and batch is not None and batch < min_batch:
        add = Finding(
            "<model>",
            "small_batch",
            "warning" if any_train else "info",
            f"batch size {batch} < {min_batch}: batch statistics over so few samples are noisy, and training with them "
            f"hurts accuracy",
            "for training with small batches use batchnorm.GroupNorm, batch renorm (BatchRenorm2d), ghost BN with a "
            "larger batch, or SyncBatchNorm across devices; for inference in eval mode this is fine",
        )
        findings.append(add)

    order = {s: i for i, s in enumerate(SEVERITIES)}
    report.findings = sorted(findings, key=lambda f: order[f.severity])
    return report
