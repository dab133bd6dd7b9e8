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
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._graph import (
    _CONV,
    _CONV_T,
    analyse,
    bn_activation,
    has_running_stats,
    num_channels,
    set_submodule,
    shared_objects,
)

__all__ = ["bn_scale_shift", "fold_bn_into_previous", "fold_bn_into_next", "fold_batchnorm", "FoldReport"]


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

    Example::

        >>> s, t = bn_scale_shift(torch.zeros(3), torch.ones(3), eps=0.0)   # s = 1, t = 0
    """
    rm, rv = running_mean.detach().double(), running_var.detach().double()
    if rm.shape != rv.shape or rm.dim() != 1:
        raise ValueError(
            f"running_mean and running_var must both have shape (C,), got {tuple(rm.shape)} and {tuple(rv.shape)}"
        )
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


_ACT_MODULES = {"relu": nn.ReLU, "silu": nn.SiLU}


def _zero_padding(conv: nn.Module) -> bool:
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "valid" or all(k == 1 for k in conv.kernel_size)
    return all(p == 0 for p in pad)


def fold_batchnorm(model: nn.Module) -> Tuple[nn.Module, FoldReport]:
    r"""Fold every batch norm of ``model`` into the Conv/ConvTranspose/Linear next to it.

    Returns ``(folded_model, report)``. The input model is never mutated: a deep copy is
    folded and returned **in eval mode** (folding bakes in the running statistics, so the
    result computes the original model's eval-mode function). Each folded batch norm is
    replaced by ``nn.Identity`` (or by its activation, for a fused BN+activation module), so
    the copy keeps the model's class, attributes and ``forward``; its ``state_dict`` loses the
    folded batch norms' entries and a bias-free layer that absorbed one gains a ``bias``.

    A batch norm is folded into the layer that feeds it (``W' = diag(s) W``, ``b' = s b + t``,
    see :func:`fold_bn_into_previous`) when that layer's output goes to this batch norm only;
    otherwise into the Linear / 1x1 zero-padding convolution it feeds alone
    (:func:`fold_bn_into_next`). Batch norms that follow something non-affine (ReLU, an
    addition, pooling, the input) and feed nothing foldable, whose producer output has another
    consumer (a residual branch), that are shared between places, or that use batch statistics
    in eval mode (``track_running_stats=False``) stay and are listed in ``report.kept`` with the reason.

    The data flow comes from a ``torch.fx`` trace; where a (sub)module does not trace, its
    children are analysed separately and ``nn.Sequential`` children are paired in order.
    Linear neighbours are assumed to see ``(N, C)`` activations, which is what a
    ``BatchNorm1d(C)`` next to a ``Linear`` with ``C`` features means in practice.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> folded, report = fold_batchnorm(model)
        >>> print(report)          # bn '1' folded into previous '0'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    report = FoldReport()
    if any(m.training for m in model.modules()):
        report.notes.append("the model was in training mode; the folded copy is in eval mode (inference only)")
    new = copy.deepcopy(model).eval()
    analysis = analyse(new)
    shared_mods, shared_params = shared_objects(new)

    def unshared(m: nn.Module) -> bool:
        return id(m) not in shared_mods and not any(id(p) in shared_params for p in m.parameters(recurse=False))

    for name, site in analysis.sites.items():
        bn = new.get_submodule(name)
        c = num_channels(bn)
        act = bn_activation(bn)
        if not has_running_stats(bn):
            report.kept.append((name, "track_running_stats=False: eval mode uses batch statistics"))
            continue
        if id(bn) in shared_mods:
            report.kept.append((name, "the same BN module is registered at several places"))
            continue
        if act is not None and act not in _ACT_MODULES:
            report.kept.append((name, f"fused activation {act!r} has no module equivalent here"))
            continue
        why = []
        done = None
        if site.prev is not None:
            prev = new.get_submodule(site.prev)
            out_c = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
            if not site.prev_exclusive or not unshared(prev):
                why.append(f"the output of '{site.prev}' also goes elsewhere (or the layer is shared)")
            elif out_c != c:
                why.append(f"'{site.prev}' has {out_c} outputs, the BN {c} channels")
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
            elif act is not None:
                why.append("the fused activation sits between the BN and the next layer")
            elif in_c != c:
                why.append(f"'{site.next}' takes {in_c} inputs, the BN has {c} channels")
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
        layer_name, direction, layer, w, b = done
        with torch.no_grad():
            layer.weight.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(b)
        set_submodule(new, name, _ACT_MODULES[act]() if act else nn.Identity())
        report.folded.append((name, layer_name, direction))
    return new.eval(), report
