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

:func:`freeze` and :func:`unfreeze` convert a model in place.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..functional.pipeline import THIS_BATCH, check_eps, run
from ._base import check_num_features, copy_norm_values, fx_leaf
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze"]


class _FrozenBatchNorm(nn.Module):
    r"""Batch norm with fixed statistics and affine, all buffers: ``y = x * scale + shift``.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.
    Accepts any ``(N, C, *)`` input (the numbered subclasses check the rank).
    """

    _version = 2
    _input_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        check_num_features(num_features)
        check_eps(eps, type(self).__name__)
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


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm of ``(N, C)`` or ``(N, C, L)`` input.

    Example::

        >>> m = FrozenBatchNorm1d(100)
        >>> y = m(torch.randn(20, 100))
    """

    _input_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm of ``(N, C, H, W)`` input (a detection backbone's usual norm).

    Example::

        >>> m = FrozenBatchNorm2d(64)
        >>> m.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
        >>> y = m(torch.randn(2, 64, 8, 8))
    """

    _input_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm of ``(N, C, D, H, W)`` input.

    Example::

        >>> m = FrozenBatchNorm3d(16)
        >>> y = m(torch.randn(2, 16, 4, 8, 8))
    """

    _input_dims = (5,)


_BN_TYPES = (nn.modules.batchnorm._BatchNorm, _BatchNorm)
_BY_DIMS = {(2, 3): FrozenBatchNorm1d, (4,): FrozenBatchNorm2d, (5,): FrozenBatchNorm3d}
_TORCH_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
_OURS_BY_DIMS = {(2, 3): BatchNorm1d, (4,): BatchNorm2d, (5,): BatchNorm3d}


def _frozen_class(bn: nn.Module) -> type:
    dims = getattr(type(bn), "_input_dims", None)
    if dims is None:
        dims = next((d for t, d in _TORCH_DIMS.items() if isinstance(bn, t)), ())
    return _BY_DIMS.get(tuple(dims), _FrozenBatchNorm)


def _named_targets(model: nn.Module, types):
    """``(parent, attribute name, qualified name, module)`` for every module of ``types`` (root: parent None)."""
    if isinstance(model, types):
        return [(None, "", "", model)]
    out = []
    for qual, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, types):
                out.append((parent, name, f"{qual}.{name}" if qual else name, child))
    return out


def _is_frozen_target(m: nn.Module) -> bool:
    return isinstance(m, _BN_TYPES) and not isinstance(m, _FrozenBatchNorm)


@torch.no_grad()
def _to_frozen(bn: nn.Module) -> _FrozenBatchNorm:
    ref = bn.running_mean
    frozen = _frozen_class(bn)(bn.num_features, bn.eps, device=ref.device, dtype=ref.dtype)
    copy_norm_values(bn, frozen)
    kwargs = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine}
    if hasattr(bn, "_extra_init_kwargs"):
        kwargs.update(bn._extra_init_kwargs())
    frozen._origin = (type(bn), kwargs)
    frozen.train(bn.training)
    return frozen


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch-norm module of ``model`` by a ``FrozenBatchNorm*d``, in place, keeping values.

    Converts ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and this library's
    batch-norm modules (``BatchNorm*d``, ``BatchRenorm*d``, ``GhostBatchNorm*d``,
    ``SyncBatchNorm``). ``weight``/``bias`` (ones/zeros when ``affine=False``), the running
    statistics, ``num_batches_tracked`` and ``eps`` are copied; the frozen module computes
    exactly the eval-mode output of the original. The original class and its settings
    are remembered for :func:`unfreeze`. Returns ``model``, or the frozen module when
    ``model`` itself is a batch norm (so write ``model = freeze(model)``).

    Raises ``ValueError`` (before changing anything) if a batch norm has no running
    statistics (``track_running_stats=False``): there is nothing to freeze.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = freeze(net)          # net[1] is now FrozenBatchNorm2d
    """
    targets = _named_targets(model, _BN_TYPES)
    targets = [t for t in targets if _is_frozen_target(t[3])]
    bad = [q or type(m).__name__ for _, _, q, m in targets if m.running_mean is None]
    if bad:
        raise ValueError(
            f"freeze: batch norm module(s) {bad} have track_running_stats=False, so there are no statistics "
            f"to freeze; build them with track_running_stats=True (or recalibrate) first. Nothing was changed."
        )
    frozen = [(parent, name, _to_frozen(m)) for parent, name, _, m in targets]
    for parent, name, f in frozen:
        if parent is None:
            return f
        setattr(parent, name, f)
    return model


@torch.no_grad()
def _from_frozen(frozen: _FrozenBatchNorm, bn_class: Optional[type]) -> nn.Module:
    cls, kwargs = frozen._origin or (None, {})
    if bn_class is not None:
        cls, kwargs = bn_class, {k: v for k, v in kwargs.items() if k in ("eps", "momentum", "affine")}
    if cls is None:
        cls = _OURS_BY_DIMS.get(tuple(type(frozen)._input_dims), BatchNorm2d)
    kwargs = {"eps": frozen.eps, **kwargs}
    ref = frozen.running_mean
    bn = cls(frozen.num_features, device=ref.device, dtype=ref.dtype, **kwargs)
    copy_norm_values(frozen, bn)
    bn.train(frozen.training)
    return bn


def unfreeze(model: nn.Module, bn_class: Optional[type] = None) -> nn.Module:
    """Turn every ``FrozenBatchNorm*d`` of ``model`` back into a trainable batch norm, in place.

    By default each becomes the class it was frozen from (with its settings: ``momentum``,
    ``affine``, ``r_max``, ``virtual_batch_size``, ...), or this library's ``BatchNorm*d``
    for modules built or loaded as frozen. ``bn_class`` (e.g. ``torch.nn.BatchNorm2d``)
    overrides that. Values are copied: ``weight``/``bias`` become parameters again.
    Returns ``model``, or the new module when ``model`` itself is frozen.

    Example::

        >>> net = unfreeze(freeze(net))   # same values, trainable again
    """
    targets = _named_targets(model, _FrozenBatchNorm)
    new = [(parent, name, _from_frozen(m, bn_class)) for parent, name, _, m in targets]
    for parent, name, m in new:
        if parent is None:
            return m
        setattr(parent, name, m)
    return model
