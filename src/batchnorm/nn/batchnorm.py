"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..functional.pipeline import THIS_BATCH, ThisBatch, run
from ._base import NormBase

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(NormBase):
    r"""Batch normalization over the channel dimension of an ``(N, C, *)`` input.

    .. math::
        y = \gamma\,\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with per-channel mean and biased variance over ``(N, *spatial)`` in training mode and
    the running statistics in eval mode. Constructor, parameters, buffers and state_dict
    are those of :class:`torch.nn.BatchNorm2d` (checkpoints load both ways). Differences:
    accurate statistics when ``|mean| >> std``, ``momentum=None`` works under
    ``torch.compile(fullgraph=True)``, a rejected call changes nothing (not even
    ``num_batches_tracked``), and the keyword-only ``check_finite`` and ``backend``.
    """

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)

    def _source(self) -> ThisBatch:
        """Where a training step's statistics come from (the variants override this, and only this)."""
        return THIS_BATCH

    def _forward(self, input: Tensor, residual: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
        training = self.training
        if training and not self.track_running_stats:  # batch statistics, nothing to update
            rm = rv = nbt = None
        else:
            rm, rv = self.running_mean, self.running_var
            nbt = self.num_batches_tracked if training else None
            training = training or rm is None  # eval without running statistics: batch statistics (torch.nn)
        return run(input, self._source() if training else THIS_BATCH, self.weight, self.bias, rm, rv, nbt, training,
                   self.momentum, self.eps, residual, activation, self.check_finite, self.backend, self._precision,
                   type(self).__name__, self._input_dims, self.num_features)  # fmt: skip


class BatchNorm1d(_BatchNorm):
    """Batch norm of ``(N, C)`` or ``(N, C, L)`` input. See :class:`torch.nn.BatchNorm1d`.

    Example::

        >>> bn = BatchNorm1d(100)
        >>> y = bn(torch.randn(20, 100))
    """

    _input_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm of ``(N, C, H, W)`` input (contiguous or channels_last). See :class:`torch.nn.BatchNorm2d`.

    Example::

        >>> bn = BatchNorm2d(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
    """

    _input_dims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm of ``(N, C, D, H, W)`` input. See :class:`torch.nn.BatchNorm3d`.

    Example::

        >>> bn = BatchNorm3d(16)
        >>> y = bn(torch.randn(2, 16, 4, 8, 8))
    """

    _input_dims = (5,)
