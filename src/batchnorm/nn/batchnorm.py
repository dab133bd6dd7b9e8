"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` (and instances of them)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ._base import BatchNormMixin

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(BatchNormMixin, _TorchBatchNorm):
    r"""Batch normalization over the channel dimension of an ``(N, C, *)`` input.

    .. math::
        y = \gamma\,\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with per-channel mean and biased variance over ``(N, *spatial)`` in training mode and
    the running statistics in eval mode. A subclass of the torch.nn class it replaces:
    constructor, parameters, buffers and state_dict are torch.nn's (checkpoints load both
    ways). Differences (docs/compat.md): exact statistics where float32 loses them (large
    offsets, large reductions), ``momentum=None`` works under ``torch.compile(fullgraph=True)``,
    a rejected call or an empty batch changes nothing (not even ``num_batches_tracked``), and
    the keyword-only ``check_finite`` and ``backend``.
    """


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch norm of ``(N, C)`` or ``(N, C, L)`` input; a :class:`torch.nn.BatchNorm1d`.

    Example::

        >>> bn = BatchNorm1d(100)
        >>> y = bn(torch.randn(20, 100))
        >>> isinstance(bn, torch.nn.BatchNorm1d)
        True
    """

    _input_dims = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch norm of ``(N, C, H, W)`` input (contiguous or channels_last); a :class:`torch.nn.BatchNorm2d`.

    Example::

        >>> bn = BatchNorm2d(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
    """

    _input_dims = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch norm of ``(N, C, D, H, W)`` input; a :class:`torch.nn.BatchNorm3d`.

    Example::

        >>> bn = BatchNorm3d(16)
        >>> y = bn(torch.randn(2, 16, 4, 8, 8))
    """

    _input_dims = (5,)
