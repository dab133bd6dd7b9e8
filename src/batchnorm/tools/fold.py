r"""Fold batch norm into the Conv/Linear next to it, for inference.

In eval mode a batch norm is a per-channel affine map

.. math::
    \mathrm{BN}(z)_c = s_c z_c + t_c,\qquad
    s_c = \frac{\gamma_c}{\sqrt{\hat\sigma^2_c + \epsilon}},\qquad t_c = \beta_c - s_c \hat\mu_c

with the running mean :math:`\hat\mu` and variance :math:`\hat\sigma^2`. Composed with the
affine layer ``z = W x + b`` that *feeds* it, it is again one affine layer:
``W' = diag(s) W`` (output channels scaled) and ``b' = s * b + t``. Composed with a Linear
or 1x1 convolution it *feeds*, ``W (s * x + t) + b`` gives ``W' = W diag(s)`` (input channels
scaled) and ``b' = b + W t``. The second form is exact only when every output value
sees ``s * x + t`` - a convolution with a kernel larger than 1 pads its input with zeros,
and a zero of the padded BN output is not ``s * 0 + t``, so it is not folded there.

All folding arithmetic is in float64 and rounded once to the parameters' dtype; weights
keep their memory format (channels_last stays channels_last).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..nn.kinds import batchnorm_modules, has_running_stats, kind_of, never_updated, num_channels
from ._graph import _CONV, _CONV_T, analyse, set_submodule, shared_objects

__all__ = [
    "bn_scale_shift", "stats_problem", "fold_bn_into_previous", "fold_bn_into_next", "fold_batchnorm", "FoldReport",
]  # fmt: skip


def stats_problem(
    running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Optional[str]:
    """Why these batch-norm values cannot be folded (``None`` if they can): NaN/Inf in any of them,
    a negative ``running_var``, or ``running_var + eps <= 0`` in some channel (``(C,)`` tensors)."""
    named = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    bad = [k for k, v in named.items() if v is not None and not bool(torch.isfinite(v.detach()).all())]
    if bad or not (isinstance(eps, (int, float)) and eps == eps and abs(eps) != float("inf")):
        return f"non-finite values in {', '.join(bad) or 'eps'}"
    rv = running_var.detach().double()
    if bool((rv < 0).any()):
        return f"negative running_var in {int((rv < 0).sum())} channel(s) (min {float(rv.min()):.3g})"
    if bool((rv + eps <= 0).any()):
        return f"running_var + eps <= 0 in {int((rv + eps <= 0).sum())} channel(s) (eps={eps})"
    return None


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor]:
    r"""Eval-mode batch norm as ``y = scale * x + shift`` per channel, in float64.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``
    (``weight`` defaults to 1, ``bias`` to 0). All inputs have shape ``(C,)``; so do the outputs.

    Raises ``ValueError`` (see :func:`stats_problem`) for NaN/Inf values, a negative variance or
    ``running_var + eps <= 0``: folding them would write NaN/Inf weights.

    Example::

        >>> s, t = bn_scale_shift(torch.zeros(3), torch.ones(3), eps=0.0)   # s = 1, t = 0
    """
    rm, rv = running_mean.detach().double(), running_var.detach().double()
    if rm.shape != rv.shape or rm.dim() != 1:
        raise ValueError(
            f"running_mean and running_var must both have shape (C,), got {tuple(rm.shape)} and {tuple(rv.shape)}"
        )
    problem = stats_problem(rm, rv, weight, bias, eps)
    if problem:
        raise ValueError(f"cannot fold: {problem}")
    scale = torch.rsqrt(rv + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -rm * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def _like(new64: Tensor, old: Tensor) -> Tensor:
    """``new64`` rounded to ``old``'s dtype, in ``old``'s memory layout."""
    return torch.empty_like(old).copy_(new64)


def fold_bn_into_previous(
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> Tuple[Tensor, Tensor]:
    r"""Weights of ``BN(layer(x))`` as one layer: ``W' = diag(s) W``, ``b' = s * b + t``.

    ``weight`` is a Linear's ``(C, in)``, a convolution's ``(C, in/groups, *k)`` or, with
    ``transposed=True``, a transposed convolution's ``(in, C/groups, *k)``; ``bias`` is
    ``(C,)`` or ``None`` (a bias-free layer gains one). ``s``, ``t`` are from
    :func:`bn_scale_shift`. Returns new ``(weight, bias)`` in the input dtype and layout.

    Example::

        >>> conv, bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8).eval()
        >>> w, b = fold_bn_into_previous(conv.weight, conv.bias, bn.running_mean, bn.running_var,
        ...                              bn.weight, bn.bias, bn.eps)
    """
    s, t = bn_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    c = s.numel()
    w = weight.detach().double()
    if transposed:
        if w.dim() < 3 or w.shape[1] * groups != c:
            raise ValueError(
                f"transposed convolution weight {tuple(w.shape)} with groups={groups} has "
                f"{w.shape[1] * groups if w.dim() > 1 else '?'} output channels, the batch norm has {c}"
            )
        k = w.shape[2:]
        wg = w.reshape(groups, w.shape[0] // groups, c // groups, *k)
        w = (wg * s.view(groups, 1, c // groups, *(1,) * len(k))).reshape(w.shape)
    else:
        if w.shape[0] != c:
            raise ValueError(
                f"layer weight {tuple(w.shape)} has {w.shape[0]} output channels, the batch norm has {c}; "
                f"only a layer whose outputs are the batch norm's channels can absorb it"
            )
        w = w * s.view((c,) + (1,) * (w.dim() - 1))
    b = t if bias is None else bias.detach().double() * s + t
    dtype_like = weight if bias is None else bias
    return _like(w, weight), b.to(dtype=dtype_like.dtype, device=weight.device)


def fold_bn_into_next(
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    *,
    groups: int = 1,
) -> Tuple[Tensor, Tensor]:
    r"""Weights of ``layer(BN(x))`` as one layer: ``W' = W diag(s)``, ``b' = b + W t``.

    ``weight`` is a Linear's ``(out, C)`` or a 1x1 convolution's ``(out, C/groups, 1, ...)``
    (larger kernels are refused: their zero padding makes the fold inexact). For a
    grouped convolution the output channel ``o`` sees the inputs of its group ``o // (out/groups)``.
    Returns new ``(weight, bias)``; a bias-free layer gains one.

    Example::

        >>> bn, fc = nn.BatchNorm1d(16).eval(), nn.Linear(16, 4)
        >>> w, b = fold_bn_into_next(fc.weight, fc.bias, bn.running_mean, bn.running_var,
        ...                          bn.weight, bn.bias, bn.eps)
    """
    if any(k != 1 for k in weight.shape[2:]):
        raise ValueError(
            f"only a Linear or a 1x1 convolution can absorb the batch norm before it; kernel {tuple(weight.shape[2:])} "
            f"pads the normalized input with zeros, which is not exact"
        )
    s, t = bn_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    c, out = s.numel(), weight.shape[0]
    if weight.shape[1] * groups != c or out % groups:
        raise ValueError(f"layer weight {tuple(weight.shape)} with groups={groups} does not take the batch norm's {c} channels")
    w = weight.detach().double().reshape(groups, out // groups, c // groups)
    w_new = w * s.view(groups, 1, c // groups)
    shift = torch.einsum("goi,gi->go", w, t.view(groups, c // groups)).reshape(out)
    b = shift if bias is None else bias.detach().double() + shift
    dtype_like = weight if bias is None else bias
    return _like(w_new.reshape(weight.shape), weight), b.to(dtype=dtype_like.dtype, device=weight.device)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: ``folded`` rows ``(bn, layer, "into previous" | "into next")``
    and ``kept`` rows ``(bn, reason)``."""

    folded: List[Tuple[str, str, str]] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def num_folded(self) -> int:
        return len(self.folded)

    def to_dict(self) -> dict:
        return {
            "folded": [{"bn": b, "into": layer, "direction": d} for b, layer, d in self.folded],
            "kept": [{"bn": b, "reason": r} for b, r in self.kept],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        rows = [(b, "folded " + d, layer) for b, layer, d in self.folded] + [(b, "kept", r) for b, r in self.kept]
        if not rows:
            return "no batch norm found"
        w0 = max(len("batch norm"), *(len(r[0]) for r in rows))
        w1 = max(len("result"), *(len(r[1]) for r in rows))
        lines = [f"{'batch norm':<{w0}}  {'result':<{w1}}  layer / reason", f"{'-' * w0}  {'-' * w1}  {'-' * 14}"]
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        lines.append(f"{self.num_folded} of {len(rows)} batch norm(s) folded")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _zero_padding(conv: nn.Module) -> bool:
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "valid" or all(k == 1 for k in conv.kernel_size)
    return all(p == 0 for p in pad)


def _call(model: nn.Module, example_input):
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


@torch.no_grad()
def _input_ranks(model: nn.Module, names: List[str], example_input) -> Dict[str, int]:
    """Rank of the input each named batch norm receives when a copy of ``model`` runs (eval mode) on the example."""
    work = copy.deepcopy(model).eval()
    ranks: Dict[str, int] = {}

    def record(name):
        def hook(module, args):
            ranks.setdefault(name, args[0].dim() if args and isinstance(args[0], Tensor) else -1)

        return hook

    hooks = [work.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        _call(work, example_input)
    except Exception as err:
        raise ValueError(
            f"fold_batchnorm: the model failed on example_input ({type(err).__name__}: {err}); pass an input shaped "
            f"like a real batch"
        ) from err
    finally:
        for h in hooks:
            h.remove()
    return ranks


def _linear_rank_problem(bn: nn.Module, name: str, linear: str, ranks: Optional[Dict[str, int]]) -> Optional[str]:
    """Why BN ``name`` cannot be folded with the Linear ``linear`` (``None``: its input is ``(N, C)``).

    A Linear acts on the last dimension, the BN on dimension 1: they are the same only for 2-D input.
    """
    if ranks is not None:
        r = ranks.get(name)
        if r is None:
            return f"the example input did not reach it, so its input rank is unknown (Linear '{linear}')"
        if r != 2:
            return (f"it sees {r}-D input (N, C, ...) and Linear '{linear}' acts on the last dimension, "
                    f"not on the BN's channels")  # fmt: skip
        return None
    d = getattr(bn, "_input_dims", None)
    if isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d)) or (d and 2 not in d):
        return f"a {type(bn).__name__} sees 3-D or larger input, and Linear '{linear}' acts on the last dimension"
    return (f"folding with Linear '{linear}' is exact only if the BN sees 2-D (N, C) input; pass example_input= "
            f"(or --input-shape) so its rank can be checked")  # fmt: skip


def fold_batchnorm(model: nn.Module, example_input=None) -> Tuple[nn.Module, FoldReport]:
    r"""Fold every batch norm of ``model`` into the Conv/ConvTranspose/Linear next to it.

    Returns ``(folded_model, report)``. The input model is never mutated: a deep copy is
    folded and returned **in eval mode** (folding bakes in the running statistics, so the
    result computes the original model's eval-mode function). Each folded batch norm is
    replaced by ``nn.Identity``, or - for a batch norm with extras (activation in ``.act``,
    dropout in ``.drop``, as timm's ``BatchNormAct2d``, or this library's ``BatchNormAct*d``) - by
    an :class:`batchnorm.nn.kinds.AfterNorm` holding those same modules, so the activation is
    kept. The copy keeps the model's class, attributes and ``forward``; its ``state_dict`` loses
    the folded batch norms' entries and a bias-free layer that absorbed one gains a ``bias``.

    A batch norm is folded into the layer that feeds it (``W' = diag(s) W``, ``b' = s b + t``,
    see :func:`fold_bn_into_previous`) when that layer's output goes to this batch norm only;
    otherwise into the Linear / 1x1 zero-padding convolution it feeds alone
    (:func:`fold_bn_into_next`). Batch norms that follow something non-affine (ReLU, an
    addition, pooling, the input) and feed nothing foldable, whose producer output has another
    consumer (a residual branch), that are shared between places, that use batch statistics
    in eval mode (``track_running_stats=False``), or whose forward this library cannot describe
    (:func:`batchnorm.nn.kinds.kind_of`) stay and are listed in ``report.kept`` with the reason.

    **Linear neighbours.** A Linear acts on the last dimension and a batch norm on dimension 1, so
    folding the two is exact only when the batch norm sees 2-D ``(N, C)`` input. With
    ``example_input`` (a tensor, a tuple of positional or a dict of keyword arguments) the model
    is run once on a copy and each batch norm's input rank is recorded; without it a batch norm
    next to a Linear is kept (the reason says to pass ``example_input``). Convolutions need no
    example: their channels are dimension 1.

    Raises ``ValueError`` (nothing is returned) if a batch norm's statistics or affine hold
    NaN/Inf or a negative variance (:func:`stats_problem`). Warns (``UserWarning``, also in
    ``report.notes``) when a folded batch norm was never updated (mean 0 and variance 1 with no
    batch counted): the fold bakes those in.

    The data flow comes from a ``torch.fx`` trace; where a (sub)module does not trace, its
    children are analysed separately and ``nn.Sequential`` children are paired in order.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> folded, report = fold_batchnorm(model)
        >>> print(report)          # bn '1' folded into previous '0'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    bad = []
    for name, bn in batchnorm_modules(model):
        if has_running_stats(bn):
            why = stats_problem(bn.running_mean, bn.running_var, getattr(bn, "weight", None),
                                getattr(bn, "bias", None), float(getattr(bn, "eps", 1e-5)))  # fmt: skip
            if why:
                bad.append(f"'{name or type(bn).__name__}': {why}")
    if bad:
        raise ValueError(
            "fold_batchnorm: refusing to fold batch norms with unusable statistics - " + "; ".join(bad)
            + ". Recalibrate them on clean data (batchnorm.tools.recalibrate) first; nothing was folded."
        )
    report = FoldReport()
    if any(m.training for m in model.modules()):
        report.notes.append("the model was in training mode; the folded copy is in eval mode (inference only)")
    new = copy.deepcopy(model).eval()
    analysis = analyse(new)
    shared_mods, shared_params = shared_objects(new)
    ranks = _input_ranks(new, list(analysis.sites), example_input) if example_input is not None else None

    def unshared(m: nn.Module) -> bool:
        return id(m) not in shared_mods and not any(id(p) in shared_params for p in m.parameters(recurse=False))

    for name, site in analysis.sites.items():
        bn = new.get_submodule(name)
        c = num_channels(bn)
        if not has_running_stats(bn):
            report.kept.append((name, "track_running_stats=False: eval mode uses batch statistics"))
            continue
        if id(bn) in shared_mods:
            report.kept.append((name, "the same BN module is registered at several places"))
            continue
        kind = kind_of(bn)
        if kind.problem is not None:
            report.kept.append((name, kind.problem))
            continue
        why = []
        done = None
        if site.prev is not None:
            prev = new.get_submodule(site.prev)
            out_c = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
            rank_problem = _linear_rank_problem(bn, name, site.prev, ranks) if isinstance(prev, nn.Linear) else None
            if not site.prev_exclusive or not unshared(prev):
                why.append(f"the output of '{site.prev}' also goes elsewhere (or the layer is shared)")
            elif out_c != c:
                why.append(f"'{site.prev}' has {out_c} outputs, the BN {c} channels")
            elif rank_problem:
                why.append(rank_problem)
            else:
                w, b = fold_bn_into_previous(
                    prev.weight, prev.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                    transposed=isinstance(prev, _CONV_T), groups=getattr(prev, "groups", 1),
                )
                done = (site.prev, "into previous", prev, w, b)
        else:
            why.append(f"it follows {site.prev_kind or 'an unknown op'}, which is not a Conv/Linear")
        if done is None and site.next is not None:
            nxt = new.get_submodule(site.next)
            in_c = nxt.in_features if isinstance(nxt, nn.Linear) else nxt.in_channels
            if not site.next_exclusive or not unshared(nxt):
                why.append(f"'{site.next}' is shared")
            elif isinstance(nxt, _CONV) and not (all(k == 1 for k in nxt.kernel_size) and _zero_padding(nxt)):
                why.append(f"'{site.next}' is not a 1x1 convolution without padding (zero padding makes it inexact)")
            elif kind.has_extras:
                why.append(f"{kind.describe_extras()} sits between the BN and the next layer")
            elif in_c != c:
                why.append(f"'{site.next}' takes {in_c} inputs, the BN has {c} channels")
            elif isinstance(nxt, nn.Linear) and _linear_rank_problem(bn, name, site.next, ranks):
                why.append(_linear_rank_problem(bn, name, site.next, ranks))
            else:
                w, b = fold_bn_into_next(
                    nxt.weight, nxt.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                    groups=getattr(nxt, "groups", 1),
                )
                done = (site.next, "into next", nxt, w, b)
        if done is None:
            if site.note:
                why.append(site.note)
            report.kept.append((name, "; ".join(why)))
            continue
        if never_updated(bn):
            msg = (f"'{name}' was never updated (running mean 0, variance 1, no batch counted): the fold bakes in "
                   f"those initial statistics; train or recalibrate the model first")  # fmt: skip
            warnings.warn(f"fold_batchnorm: {msg}", UserWarning, stacklevel=2)
            report.notes.append(msg)
        layer_name, direction, layer, w, b = done
        with torch.no_grad():
            layer.weight.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(b)
        after = kind.after()
        set_submodule(new, name, after if after is not None else nn.Identity())
        report.folded.append((name, layer_name, direction))
    return new.eval(), report
