r"""The batch-norm doctor: find the pitfalls users keep running into, and say what to do.

:func:`diagnose` inspects a model and one example input and returns a :class:`Report`
with a row per batch norm and a list of findings. Each check is one function below
(``check_<name>``), listed in :data:`LAYER_CHECKS` / :data:`MODEL_CHECKS`:

================== ======== =============================================================
check              severity what it means
================== ======== =============================================================
bias_before_bn     warning  a Conv/Linear with a bias feeds only a BN that normalizes with
                            batch statistics: ``BN(Wx + b) = BN(Wx)`` (the batch mean absorbs
                            ``b``), so the bias is a wasted parameter (not for frozen BNs)
train_mode         warning  a BN is in training mode: at inference its output depends on
                            the other samples of the batch
never_updated      error    running mean exactly 0 and variance exactly 1 with no batch counted:
                            eval mode uses mean 0 / variance 1 (warning for a frozen BN)
non_finite         error    NaN/Inf in the running statistics
tiny_variance      warning  ``running_var < eps`` in some channel: eval output is
                            ``gamma * (x - mu) / sqrt(eps)``, dominated by ``eps``
train_eval_gap     warning  on the example input, the layer's train-vs-eval output gap exceeds
                            both ``gap_threshold`` and ``gap_sigmas`` times the gap that
                            sampling alone gives a perfectly calibrated BN (see below)
keras_momentum     warning  ``momentum >= 0.5``: Keras' *decay* 0.99 is PyTorch's momentum 0.01
small_batch        warning  fewer than ``min_batch`` samples per batch while BNs train: batch
                            statistics are noisy (info in eval mode)
no_running_stats   info     ``track_running_stats=False``: eval mode uses batch statistics
unknown_forward    info     a BN subclass whose forward this library cannot describe: only its
                            statistics are checked, and fold/convert/freeze leave it alone
================== ======== =============================================================

**The gap and its threshold.** For a BN with input ``x`` of shape ``(N, C, *)`` (``m = N * prod(*)``
values per channel) the gap is ``||BN_batch(x) - BN_running(x)|| / ||BN_batch(x)||``. Even with
exact population statistics it is not 0: the batch mean and variance are estimates from ``m``
correlated values. To first order, per channel,

.. math::
    \mathrm{E}\,\|y_{batch} - y_{pop}\|^2 \approx m\,\gamma^2\Big(\frac{\mathrm{Var}(\mu_B)}{s^2}
    + \frac{\sigma^2\,\mathrm{Var}(\sigma_B^2)}{4 s^6}\Big),\qquad s^2 = \sigma^2 + \epsilon

and the variances of the batch mean and variance are estimated from the spread of the ``N``
per-sample means and second moments (``Var(mu_B) = var_n(mean of sample n) / N``, likewise for
``sigma_B^2``) - which accounts for spatial correlation, so a 7x7 map at batch 8 gets the wider
limit it needs and a 56x56 map at batch 32 a narrow one. ``expected_gap`` is the square root of
the sum over channels divided by ``||BN_batch(x)||``; a ``train_eval_gap`` finding needs
``gap > max(gap_threshold, gap_sigmas * expected_gap)``. With ``N = 1`` there is no spread to
estimate from, so the gap is shown but not judged.

The gap of layer ``l`` is measured on the input that layer receives when the BNs run in
training mode (upstream layers normalize by the batch), so a layer with bad statistics does
not make the layers after it look bad too. The model itself is never modified (the runs use a
deep copy). Frozen BNs (fixed statistics by design) get neither ``bias_before_bn``,
``train_mode``, ``keras_momentum`` nor ``train_eval_gap``, and do not count as BNs that need
large batches.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from ..functional import batch_norm
from ..nn.kinds import BNKind, batchnorm_modules, has_running_stats, kind_of, never_updated, num_channels
from ._graph import BNSite, analyse

__all__ = ["diagnose", "Report", "Finding", "LayerInfo", "expected_gap", "LAYER_CHECKS", "MODEL_CHECKS"]

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
    """One batch norm as the doctor saw it.

    ``gap``: train-vs-eval relative output gap on the example input (``None`` if not measurable);
    ``gap_noise``: the gap sampling alone gives a perfectly calibrated BN on this input
    (:func:`expected_gap`); ``gap_limit``: the gap above which it is reported (``None``: not judged);
    ``values_per_channel``:
    ``m`` of the BN's input; ``extras``: what it applies after normalizing (e.g. ``"act=SiLU()"``).
    """

    name: str
    type: str
    channels: int
    training: bool
    frozen: bool
    extras: Optional[str]
    momentum: Optional[float]
    num_batches_tracked: Optional[int]
    min_running_var: Optional[float]
    values_per_channel: Optional[int]
    gap: Optional[float]
    gap_noise: Optional[float]
    gap_limit: Optional[float]
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

        header = ("layer", "type", "C", "mode", "momentum", "batches", "min var", "m", "gap", "limit", "fed by")
        rows = [
            (li.name, li.type + (" (frozen)" if li.frozen else "") + (f" + {li.extras}" if li.extras else ""),
             li.channels, li.training, li.momentum, li.num_batches_tracked, li.min_running_var,
             li.values_per_channel, li.gap, li.gap_limit, li.fed_by)
            for li in self.layers
        ]  # fmt: skip
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


# --- the gap and the noise it has on a perfectly calibrated BN ------------------------------


def expected_gap(x: Tensor, weight: Optional[Tensor], eps: float) -> Optional[float]:
    r"""The train-vs-eval gap a BN with *exact population statistics* shows on batch ``x`` from sampling alone.

    ``x``: ``(N, C, *)``, ``N >= 2`` (``None`` otherwise); ``weight``: ``(C,)`` or ``None``. Returns
    ``sqrt(sum_c m * gamma_c^2 * (Var(mu_B)/s^2 + sigma^2 Var(sigma_B^2)/(4 s^6))) / ||BN_batch(x)||``
    (see the module docstring), with ``sigma^2`` the batch variance and the two variances estimated
    from the spread of the per-sample means and second moments. In float64.

    Example::

        >>> x = torch.randn(32, 16, 8, 8)
        >>> expected_gap(x, None, 1e-5)           # about sqrt(1.5 / (32 * 64)) = 0.027 for iid data
    """
    n, c = x.shape[0], x.shape[1]
    if n < 2 or x.numel() == 0:
        return None
    xs = x.detach().double().reshape(n, c, -1)
    m = xs.shape[0] * xs.shape[2]
    per_mean = xs.mean(2)  # (N, C)
    mu = per_mean.mean(0)
    per_m2 = (xs - mu[None, :, None]).square().mean(2)  # (N, C): sample n's second moment about the batch mean
    var = per_m2.mean(0)
    s2 = var + eps
    var_mu = per_mean.var(0, correction=1) / n
    var_var = per_m2.var(0, correction=1) / n
    g2 = torch.ones_like(mu) if weight is None else weight.detach().double().square()
    noise = (m * g2 * (var_mu / s2 + var * var_var / (4 * s2**3))).sum()
    y = (xs - mu[None, :, None]) / s2.sqrt()[None, :, None] * g2.sqrt()[None, :, None]
    den = float(y.norm())
    return float(noise.sqrt()) / den if den > 0 else None


def _rel_gap(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


@torch.no_grad()
def _layer_gap(x: Tensor, bn: nn.Module, stats: bool) -> Optional[float]:
    """``||BN_batch(x) - BN_running(x)|| / ||BN_batch(x)||`` (``None`` with fewer than 2 values per channel)."""
    if x is None or x.dim() < 2 or x.numel() // max(x.shape[1], 1) < 2:
        return None
    w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
    eps = float(getattr(bn, "eps", 1e-5))
    y_batch = batch_norm(x, None, None, w, b, training=True, eps=eps)
    if not stats:
        return 0.0
    rm, rv = bn.running_mean.to(x.dtype), bn.running_var.to(x.dtype)
    return _rel_gap(batch_norm(x, rm, rv, w, b, training=False, eps=eps), y_batch)


# --- what each check sees -------------------------------------------------------------------


@dataclass
class _Layer:
    """One BN as the checks see it: ``bn`` is the doctor's copy, ``orig`` the user's module."""

    name: str
    bn: nn.Module
    orig: nn.Module
    kind: BNKind
    site: Optional[BNSite]
    producer: Optional[nn.Module]
    x: Optional[Tensor]
    info: LayerInfo

    @property
    def uses_batch_stats_in_training(self) -> bool:
        return not self.kind.frozen


@dataclass
class _Settings:
    min_batch: int
    gap_threshold: float
    gap_sigmas: float
    momentum_threshold: float


@dataclass
class _Model:
    """What the model-level checks see."""

    layers: List[_Layer]
    batch: Optional[int]
    settings: _Settings


def _finding(layer: str, check: str, severity: str, message: str, advice: str) -> Finding:
    return Finding(layer, check, severity, message, advice)


def check_bias_before_bn(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """A Conv/Linear with a bias feeding only a BN that normalizes with batch statistics."""
    if lay.kind.frozen or lay.site is None or lay.site.prev is None or not lay.site.prev_exclusive:
        return
    if getattr(lay.producer, "bias", None) is not None:
        yield _finding(
            lay.name, "bias_before_bn", "warning",
            f"'{lay.site.prev}' has a bias and feeds only this BN; the batch mean cancels it (BN(Wx + b) = BN(Wx))",
            f"construct '{lay.site.prev}' with bias=False (or fold the BN for inference: batchnorm fold)",
        )  # fmt: skip


def check_train_mode(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """A (non-frozen) BN left in training mode."""
    if lay.orig.training and not lay.kind.frozen:
        yield _finding(
            lay.name, "train_mode", "warning",
            "in training mode: outputs depend on the rest of the batch and running statistics change on every call",
            "call model.eval() before inference",
        )  # fmt: skip


def check_no_running_stats(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """``track_running_stats=False``."""
    if not has_running_stats(lay.bn):
        yield _finding(
            lay.name, "no_running_stats", "info",
            "track_running_stats=False: eval mode normalizes with the statistics of each batch",
            "expected for instance-style use; otherwise construct with track_running_stats=True",
        )  # fmt: skip


def _finite_stats(bn: nn.Module) -> bool:
    return bool(torch.isfinite(bn.running_mean).all() & torch.isfinite(bn.running_var).all())


def check_non_finite(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """NaN/Inf in the running statistics."""
    if has_running_stats(lay.bn) and not _finite_stats(lay.bn):
        bad = int((~torch.isfinite(lay.bn.running_mean) | ~torch.isfinite(lay.bn.running_var)).sum())
        yield _finding(
            lay.name, "non_finite", "error", f"running statistics contain NaN/Inf in {bad} channel(s)",
            "find the diverging step (e.g. check_finite=True on this library's BN), then run "
            "batchnorm.tools.recalibrate (or `batchnorm recalibrate`) on clean data",
        )  # fmt: skip


def check_never_updated(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """Running statistics still at mean 0 / variance 1 with no batch counted."""
    if not never_updated(lay.bn):
        return
    if lay.kind.frozen:
        yield _finding(
            lay.name, "never_updated", "warning",
            "frozen with mean 0 and variance 1 in every channel: it applies only its affine; "
            "were its statistics loaded?",
            "load the statistics of the trained model (load_state_dict) before freezing",
        )  # fmt: skip
    else:
        yield _finding(
            lay.name, "never_updated", "error",
            "running statistics were never updated (mean 0, variance 1, no batch counted): eval mode uses them "
            "as they are",
            "train the model, or compute the statistics with batchnorm.tools.recalibrate(model, batches)",
        )  # fmt: skip


def check_tiny_variance(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """``running_var < eps`` in some channel."""
    if not has_running_stats(lay.bn) or not _finite_stats(lay.bn) or lay.bn.running_var.numel() == 0:
        return
    eps = float(getattr(lay.bn, "eps", 1e-5))
    rv = lay.bn.running_var.detach().double()
    if float(rv.min()) < eps:
        yield _finding(
            lay.name, "tiny_variance", "warning",
            f"running_var < eps={eps:g} in {int((rv < eps).sum())} channel(s) (min {float(rv.min()):.3g}): those "
            f"channels are nearly constant and eval mode scales them by up to 1/sqrt(eps)",
            "check for dead channels (e.g. after ReLU or pruning); recalibrate, or prune the channel",
        )  # fmt: skip


def check_keras_momentum(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """A momentum that looks like a Keras/TensorFlow decay."""
    momentum = getattr(lay.bn, "momentum", None)
    if lay.kind.frozen or not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        return
    if momentum >= s.momentum_threshold:
        yield _finding(
            lay.name, "keras_momentum", "warning",
            f"momentum={momentum}: PyTorch's momentum is the weight of the NEW batch, so the running "
            f"statistics follow the last batch almost only",
            f"Keras/TF decay d is PyTorch momentum 1 - d: use momentum={1 - momentum:.3g}",
        )  # fmt: skip


def check_train_eval_gap(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """Train-vs-eval gap beyond what sampling explains (see the module docstring)."""
    gap, limit = lay.info.gap, lay.info.gap_limit
    if lay.kind.frozen or gap is None or limit is None or not has_running_stats(lay.bn):
        return
    if not math.isfinite(gap) or gap > limit:
        yield _finding(
            lay.name, "train_eval_gap", "warning",
            f"on the example input, train-mode and eval-mode outputs differ by {gap:.3g} (relative), more than the "
            f"{limit:.3g} that sampling {lay.info.values_per_channel} values per channel explains: the running "
            f"statistics do not describe this input",
            "run batchnorm.tools.recalibrate on representative data, or check the example input's preprocessing",
        )  # fmt: skip


def check_unknown_forward(lay: _Layer, s: _Settings) -> Iterator[Finding]:
    """A BN subclass whose forward this library cannot describe."""
    if lay.kind.problem is not None:
        yield _finding(
            lay.name, "unknown_forward", "info",
            f"{type(lay.orig).__name__}: {lay.kind.problem}",
            "its statistics are checked as usual; fold, convert and freeze leave it alone (or refuse)",
        )  # fmt: skip


def check_small_batch(model: _Model, s: _Settings) -> Iterator[Finding]:
    """Fewer than ``min_batch`` samples for BNs that normalize with batch statistics."""
    batch_bns = [lay for lay in model.layers if lay.uses_batch_stats_in_training]
    if not batch_bns or model.batch is None or model.batch >= s.min_batch:
        return
    training = any(lay.orig.training for lay in batch_bns)
    one = " With 1 sample each BN normalizes over that sample's positions only (a (1, C) input cannot train)." \
        if model.batch == 1 else ""  # fmt: skip
    yield _finding(
        "<model>", "small_batch", "warning" if training else "info",
        f"batch size {model.batch} < {s.min_batch}: batch statistics over so few samples are noisy, and training "
        f"with them hurts accuracy.{one}",
        "for training with small batches use batchnorm.GroupNorm, batch renorm (BatchRenorm2d), ghost BN with a "
        "larger batch, or SyncBatchNorm across devices; for inference in eval mode this is fine",
    )  # fmt: skip


#: per-layer checks, in report order within a severity
LAYER_CHECKS = (
    check_bias_before_bn, check_train_mode, check_no_running_stats, check_non_finite, check_never_updated,
    check_tiny_variance, check_keras_momentum, check_train_eval_gap, check_unknown_forward,
)  # fmt: skip
#: whole-model checks
MODEL_CHECKS = (check_small_batch,)


# --- running the model ------------------------------------------------------------------------


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
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


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _call(model, example_input):
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _run_recording(module: nn.Module, names: set, example_input, record: Dict[str, Tensor]) -> Optional[Tensor]:
    """Run ``module`` on the example, recording the first input of each BN in ``names``."""
    def recorder(name):
        def hook(mod, args):  # returns None: the module's inputs are not replaced
            if args and isinstance(args[0], Tensor):
                record.setdefault(name, args[0].detach())

        return hook

    hooks = [m.register_forward_pre_hook(recorder(name)) for name, m in module.named_modules() if name in names]
    try:
        return _first_tensor(_call(module, example_input))
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def diagnose(
    model: nn.Module,
    example_input,
    *,
    min_batch: int = 8,
    gap_threshold: float = 0.1,
    gap_sigmas: float = 3.0,
    momentum_threshold: float = 0.5,
) -> Report:
    r"""Check every batch norm of ``model`` for the common pitfalls; see the module docstring.

    ``example_input`` is a tensor (or a tuple of positional / a dict of keyword arguments)
    shaped like a real batch; its first dimension is taken as the batch size. The model is
    deep-copied for the runs, so neither its parameters, buffers nor modes change.

    Args:
        min_batch: batch sizes below this get a ``small_batch`` finding (Wu & He 2018 show
            BN's error rising quickly below about 8 samples per batch).
        gap_threshold: ``train_eval_gap`` needs a relative gap above this ...
        gap_sigmas: ... and above this many times the gap sampling alone gives (:func:`expected_gap`).
        momentum_threshold: ``keras_momentum`` is reported at or above this momentum.

    Returns:
        :class:`Report`; ``print(report)`` shows a table, ``report.to_json()`` serializes it.

    Raises ``ValueError`` if the model fails on the example input or the input has NaN/Inf.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.99))
        >>> report = diagnose(model, torch.randn(4, 3, 16, 16))
        >>> [f.check for f in report.findings]   # never_updated, bias_before_bn, keras_momentum, ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose expects an nn.Module, got {type(model).__name__}")
    for t in _tensors(example_input):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError("diagnose: the example input contains NaN or Inf; pass a real batch")
    settings = _Settings(min_batch, gap_threshold, gap_sigmas, momentum_threshold)
    work = copy.deepcopy(model)
    analysis = analyse(work)
    bns = batchnorm_modules(work)
    names = {name for name, _ in bns}
    report = Report()
    first = _first_tensor(example_input if not isinstance(example_input, dict) else list(example_input.values()))
    batch = int(first.shape[0]) if first is not None and first.dim() > 0 else None
    report.example_shape = list(first.shape) if first is not None else None

    # eval-mode run: the model's inference output (and fallback inputs for the per-layer gaps)
    eval_inputs, train_inputs = {}, {}
    work.eval()
    try:
        out_eval = _run_recording(work, names, example_input, eval_inputs)
    except Exception as err:
        raise ValueError(
            f"diagnose: the model failed on the example input ({type(err).__name__}: {err}); "
            f"pass an input shaped like a real batch"
        ) from err
    # run with only the BNs normalizing by the batch (their own flag only: a BN's dropout stays off),
    # on a copy because it updates running statistics. Each BN's input here is what its running
    # statistics should describe, so a layer's gap is its own, not inherited from a bad layer upstream.
    trained = copy.deepcopy(work)
    for _, bn in batchnorm_modules(trained):
        bn.training = True
    try:
        out_train = _run_recording(trained, names, example_input, train_inputs)
        if out_eval is not None and out_train is not None and out_train.shape == out_eval.shape:
            report.model_gap = _rel_gap(out_train, out_eval)
    except (ValueError, RuntimeError):
        train_inputs = {}  # e.g. one value per channel: training mode cannot run
    inputs = {**eval_inputs, **train_inputs}

    layers = []
    for name, bn in bns:
        orig = model.get_submodule(name)
        kind = kind_of(bn)
        site = analysis.sites.get(name)
        stats = has_running_stats(bn)
        x = inputs.get(name)
        nbt = getattr(bn, "num_batches_tracked", None)
        momentum = getattr(bn, "momentum", None)
        gap = None if kind.frozen else _layer_gap(x, bn, stats)
        noise = expected_gap(x, getattr(bn, "weight", None), float(getattr(bn, "eps", 1e-5))) \
            if gap is not None and stats and x.dim() >= 2 else None  # fmt: skip
        info = LayerInfo(
            name=name,
            type=type(bn).__name__,
            channels=num_channels(bn),
            training=orig.training,
            frozen=kind.frozen,
            extras=kind.describe_extras() or None,
            momentum=momentum if isinstance(momentum, (int, float)) and not isinstance(momentum, bool) else None,
            num_batches_tracked=int(nbt) if isinstance(nbt, Tensor) else None,
            min_running_var=float(bn.running_var.detach().double().min()) if stats and bn.running_var.numel() else None,
            values_per_channel=x.numel() // x.shape[1] if x is not None and x.dim() >= 2 and x.shape[1] else None,
            gap=gap,
            gap_noise=noise,
            gap_limit=None if noise is None else max(gap_threshold, gap_sigmas * noise),
            fed_by=(site.prev or site.prev_kind or "?") if site else "?",
        )
        producer = work.get_submodule(site.prev) if site is not None and site.prev is not None else None
        layers.append(_Layer(name, bn, orig, kind, site, producer, x, info))
        report.layers.append(info)

    findings = [f for lay in layers for check in LAYER_CHECKS for f in check(lay, settings)]
    model_view = _Model(layers, batch, settings)
    findings += [f for check in MODEL_CHECKS for f in check(model_view, settings)]
    order = {s: i for i, s in enumerate(SEVERITIES)}
    report.findings = sorted(findings, key=lambda f: order[f.severity])
    return report
