r"""Frozen batch norm: fixed statistics and affine, one per-channel scale and shift.

.. math::
    y = x \cdot s + t,\qquad s = \frac{\gamma}{\sqrt{\sigma^2_{run} + \epsilon}},\qquad
    t = \beta - \mu_{run}\, s

``FrozenBatchNorm1d/2d/3d`` hold ``weight``, ``bias``, ``running_mean``, ``running_var``
and ``num_batches_tracked`` as *buffers* (nothing is trained, nothing is updated, in
train and eval mode alike), under the names of ``torch.nn.BatchNorm2d``: a BatchNorm
checkpoint loads into a frozen module and back with ``strict=True`` (a checkpoint
without ``num_batches_tracked``, e.g. torchvision's ``FrozenBatchNorm2d``, loads too).
The forward is the native inference kernel, which applies ``x * s + t`` in one pass
(on the CPU, channels whose ``|running_mean| >> std`` are first shifted, see
:func:`batchnorm.functional.stats.running_off_center`); only ``dx = dy * s`` is computed
in the backward.

:func:`freeze` and :func:`unfreeze` convert a model in place. A batch norm followed by extras
(an activation in ``.act``, dropout in ``.drop``, as timm's ``BatchNormAct2d`` or this library's
``BatchNormAct*d``) becomes a ``FrozenBatchNormAct*d``, which keeps them:
``y = act(drop(x * s + t [+ residual]))``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..functional.pipeline import THIS_BATCH, check_eps, run
from ._base import check_num_features, fx_leaf
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .kinds import (
    BNKind,
    attach_extras,
    bn_dims,
    copy_norm_values,
    has_running_stats,
    is_batchnorm,
    is_frozen,
    kind_of,
    num_channels,
)

__all__ = [
    "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "FrozenBatchNormAct", "FrozenBatchNormAct1d", "FrozenBatchNormAct2d", "FrozenBatchNormAct3d",
    "freeze", "unfreeze",
]  # fmt: skip


class FrozenBatchNorm(nn.Module):
    r"""Batch norm with fixed statistics and affine, all buffers: ``y = x * scale + shift``.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.
    Accepts any ``(N, C, *)`` input (the numbered subclasses check the rank); :func:`freeze` gives
    this class for a source whose rank is not fixed, e.g. a ``SyncBatchNorm``.
    """

    _version = 2
    _input_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        num_features = check_num_features(num_features)
        eps = check_eps(eps, type(self).__name__)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        #: how :func:`unfreeze` rebuilds the trainable module: ``(class, constructor kwargs)``
        self._origin: Optional[tuple[type, dict]] = None

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` with ``y = x * scale + shift``, in float32 (float64 for float64 buffers)."""
        work = torch.float64 if self.running_var.dtype == torch.float64 else torch.float32
        scale = self.weight.to(work) * torch.rsqrt(self.running_var.to(work) + self.eps)
        return scale, self.bias.to(work) - self.running_mean.to(work) * scale

    def forward(self, input: Tensor) -> Tensor:
        traced = fx_leaf(self, input)
        if traced is not None:
            return traced
        return run(input, THIS_BATCH, self.weight, self.bias, self.running_mean, self.running_var, None, False, 0.0,
                   self.eps, backend="aten", what=type(self).__name__, dims=self._input_dims,
                   num_features=self.num_features)  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            # torchvision's FrozenBatchNorm2d and pre-1.0 BatchNorm checkpoints have no counter
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen batch norm of ``(N, C)`` or ``(N, C, L)`` input.

    Example::

        >>> m = FrozenBatchNorm1d(100)
        >>> y = m(torch.randn(20, 100))
    """

    _input_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen batch norm of ``(N, C, H, W)`` input (a detection backbone's usual norm).

    Example::

        >>> m = FrozenBatchNorm2d(64)
        >>> m.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
        >>> y = m(torch.randn(2, 64, 8, 8))
    """

    _input_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen batch norm of ``(N, C, D, H, W)`` input.

    Example::

        >>> m = FrozenBatchNorm3d(16)
        >>> y = m(torch.randn(2, 16, 4, 8, 8))
    """

    _input_dims = (5,)


class _FrozenWithExtras:
    """Mixin: the frozen batch norm, then an optional residual, then ``drop`` and ``act`` (modules)."""

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *,
                 drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None) -> None:  # fmt: skip
        super().__init__(num_features, eps, device=device, dtype=dtype)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``act(drop(frozen_bn(input)) [+ residual])`` (the order of ``BatchNormAct*d``); ``residual`` has
        the input's shape."""
        y = self.drop(super().forward(input))
        if residual is not None:
            y = y + residual
        return self.act(y)


class FrozenBatchNormAct(_FrozenWithExtras, FrozenBatchNorm):
    """Frozen batch norm + extras of any ``(N, C, *)`` input (from a dimension-agnostic source)."""


class FrozenBatchNormAct1d(_FrozenWithExtras, FrozenBatchNorm1d):
    """:class:`FrozenBatchNorm1d` followed by ``drop`` and ``act`` modules (what :func:`freeze` makes of a
    BN+activation module). State dict: the frozen BN's entries plus the activation's (e.g. ``act.weight``
    of a PReLU), as timm's ``BatchNormAct`` has them.

    Example::

        >>> m = FrozenBatchNormAct1d(16, act=nn.SiLU())
        >>> y = m(torch.randn(4, 16))           # silu(x * scale + shift)
    """


class FrozenBatchNormAct2d(_FrozenWithExtras, FrozenBatchNorm2d):
    """:class:`FrozenBatchNorm2d` followed by ``drop`` and ``act`` modules.

    Example::

        >>> m = FrozenBatchNormAct2d(8, act=nn.ReLU())
        >>> y = m(torch.randn(2, 8, 4, 4), residual=torch.randn(2, 8, 4, 4))   # relu(bn(x) + residual)
    """


class FrozenBatchNormAct3d(_FrozenWithExtras, FrozenBatchNorm3d):
    """:class:`FrozenBatchNorm3d` followed by ``drop`` and ``act`` modules.

    Example::

        >>> m = FrozenBatchNormAct3d(4, act=nn.ReLU())
        >>> y = m(torch.randn(2, 4, 3, 3, 3))
    """


_BY_DIMS = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_ACT_BY_DIMS = {1: FrozenBatchNormAct1d, 2: FrozenBatchNormAct2d, 3: FrozenBatchNormAct3d}
_OURS_BY_DIMS = {(2, 3): BatchNorm1d, (4,): BatchNorm2d, (5,): BatchNorm3d}


def _named_targets(model: nn.Module, select):
    """``(parent, attribute, qualified name, module)`` for every registration of a module ``select``-ed
    (the root: parent ``None``). Modules inside a selected one are not searched."""
    if select(model):
        return [(None, "", "", model)]
    out = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if select(child):
                out.append((parent, name, qual, child))
            else:
                walk(child, qual)

    walk(model, "")
    return out


def _freezable(m: nn.Module) -> bool:
    return is_batchnorm(m) and not is_frozen(m)


@torch.no_grad()
def _to_frozen(bn: nn.Module, kind: BNKind) -> FrozenBatchNorm:
    ref = bn.running_mean
    d = bn_dims(bn)
    factory = {"device": ref.device, "dtype": ref.dtype}
    c, eps = num_channels(bn), float(getattr(bn, "eps", 1e-5))
    if kind.extras:  # a dimension-agnostic source (SyncBatchNorm) gets the any-rank base
        extras = dict(kind.extras)
        cls = _ACT_BY_DIMS.get(d, FrozenBatchNormAct)
        frozen = cls(c, eps, drop=extras.get("drop"), act=extras.get("act"), **factory)
    else:
        frozen = _BY_DIMS.get(d, FrozenBatchNorm)(c, eps, **factory)
    copy_norm_values(bn, frozen)
    kwargs = {"eps": eps, "momentum": getattr(bn, "momentum", 0.1),
              "affine": getattr(bn, "affine", getattr(bn, "weight", None) is not None)}  # fmt: skip
    if hasattr(bn, "_extra_init_kwargs"):
        kwargs.update(bn._extra_init_kwargs())
    frozen._origin = (type(bn), kwargs)
    frozen.train(bn.training)
    return frozen


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch-norm module of ``model`` by a ``FrozenBatchNorm*d``, in place, keeping values.

    Converts every batch norm :func:`batchnorm.nn.kinds.is_batchnorm` recognises (``torch.nn``'s
    ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, this library's ``BatchNorm*d``, ``BatchRenorm*d``,
    ``GhostBatchNorm*d``, ``SyncBatchNorm``, subclasses of them) except frozen ones.
    ``weight``/``bias`` (ones/zeros when ``affine=False``), the running statistics,
    ``num_batches_tracked`` and ``eps`` are copied; the frozen module computes exactly the eval-mode
    output of the original. A batch norm with extras (activation in ``.act``, dropout in ``.drop``,
    like timm's ``BatchNormAct2d``; or this library's ``BatchNormAct*d``) becomes a
    ``FrozenBatchNormAct*d`` holding the same ``drop``/``act`` modules, so the activation is kept.
    The original class and its settings are remembered for :func:`unfreeze`. Shared modules stay
    shared. Returns ``model``, or the frozen module when ``model`` itself is a batch norm (so write
    ``model = freeze(model)``).

    Raises ``ValueError`` naming the modules, before changing anything, if a batch norm has no
    running statistics (``track_running_stats=False``: nothing to freeze) or its forward does
    something this library cannot reproduce (:func:`batchnorm.nn.kinds.kind_of` reports a problem).

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = freeze(net)          # net[1] is now FrozenBatchNorm2d
    """
    targets = _named_targets(model, _freezable)
    no_stats = [q or type(m).__name__ for _, _, q, m in targets if not has_running_stats(m)]
    if no_stats:
        raise ValueError(
            f"freeze: batch norm module(s) {no_stats} have track_running_stats=False, so there are no statistics "
            f"to freeze; build them with track_running_stats=True (or recalibrate) first. Nothing was changed."
        )
    kinds = {id(m): kind_of(m) for _, _, _, m in targets}
    odd = [f"'{q}' ({type(m).__name__}): {kinds[id(m)].problem}" for _, _, q, m in targets if kinds[id(m)].problem]
    if odd:
        raise ValueError(f"freeze: cannot freeze without changing what the model computes - {'; '.join(odd)}. "
                         f"Nothing was changed; replace these modules by hand.")  # fmt: skip
    frozen = {}
    for _, _, _, m in targets:
        if id(m) not in frozen:
            frozen[id(m)] = _to_frozen(m, kinds[id(m)])
    for parent, name, _, m in targets:
        if parent is None:
            return frozen[id(m)]
        setattr(parent, name, frozen[id(m)])
    return model


@torch.no_grad()
def _from_frozen(frozen: FrozenBatchNorm, bn_class: Optional[type], where: str) -> nn.Module:
    cls, kwargs = frozen._origin or (None, {})
    if bn_class is not None:
        cls, kwargs = bn_class, {k: v for k, v in kwargs.items() if k in ("eps", "momentum", "affine")}
    if cls is None:
        cls = _OURS_BY_DIMS.get(tuple(type(frozen)._input_dims), BatchNorm2d)
    kwargs = {"eps": frozen.eps, **kwargs}
    ref = frozen.running_mean
    try:
        bn = cls(frozen.num_features, device=ref.device, dtype=ref.dtype, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"unfreeze: cannot build {cls.__name__} for {where}: {err}") from err
    extras = tuple((a, getattr(frozen, a)) for a in ("drop", "act") if isinstance(getattr(frozen, a, None), nn.Module))
    try:
        attach_extras(bn, extras, copy_modules=False)
    except ValueError as err:
        raise ValueError(f"unfreeze: {where} ({type(frozen).__name__}) cannot become {cls.__name__}: {err}") from err
    copy_norm_values(frozen, bn)
    bn.train(frozen.training)
    return bn


def unfreeze(model: nn.Module, bn_class: Optional[type] = None) -> nn.Module:
    """Turn every ``FrozenBatchNorm*d`` of ``model`` back into a trainable batch norm, in place.

    By default each becomes the class it was frozen from (with its settings: ``momentum``,
    ``affine``, ``r_max``, ``virtual_batch_size``, ..., and the ``drop``/``act`` modules of a
    ``FrozenBatchNormAct*d``), or this library's ``BatchNorm*d`` for modules built or loaded as
    frozen. ``bn_class`` (e.g. ``torch.nn.BatchNorm2d``) overrides that. Values are copied:
    ``weight``/``bias`` become parameters again. Returns ``model``, or the new module when
    ``model`` itself is frozen.

    Raises ``ValueError`` before changing anything when a module cannot be rebuilt, e.g. a
    ``FrozenBatchNormAct2d`` with a SiLU and ``bn_class=torch.nn.BatchNorm2d``, which has no place
    for the activation.

    Example::

        >>> net = unfreeze(freeze(net))   # same values, trainable again
    """
    targets = _named_targets(model, lambda m: isinstance(m, FrozenBatchNorm))
    new = {}
    for _, _, qual, m in targets:
        if id(m) not in new:
            new[id(m)] = _from_frozen(m, bn_class, f"'{qual}'" if qual else "the model")
    for parent, name, _, m in targets:
        if parent is None:
            return new[id(m)]
        setattr(parent, name, new[id(m)])
    return model


# the names these classes had before they were public (pickled models refer to them)
_FrozenBatchNorm, _FrozenBatchNormAct = FrozenBatchNorm, FrozenBatchNormAct
