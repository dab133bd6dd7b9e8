"""Ghost (virtual) batch norm modules (Hoffer et al., 2017): ``GhostBatchNorm1d/2d/3d``."""

from __future__ import annotations

from typing import Optional

from ..functional.ghost import check_virtual_batch_size
from ..functional.pipeline import Virtual
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(_BatchNorm):
    r"""Batch norm with statistics per virtual batch of ``virtual_batch_size`` samples in training.

    .. math::
        y_i = \gamma\,\frac{x_i - \mu_{B_k}}{\sqrt{\sigma^2_{B_k} + \epsilon}} + \beta \quad (i \in B_k)

    where ``B_k`` are consecutive chunks of the batch along ``N`` (the last one smaller
    when ``N`` is not a multiple). Running statistics are updated once per forward from
    the whole batch (exact merge of the chunks' statistics); eval mode is plain batch norm.
    See :func:`batchnorm.functional.ghost.ghost_batch_norm` for the decisions.

    Constructor: that of :class:`torch.nn.BatchNorm2d` plus keyword-only
    ``virtual_batch_size`` (default 32). Parameters, buffers and state_dict are those of
    ``torch.nn.BatchNorm2d``; checkpoints load both ways with ``strict=True``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        virtual_batch_size: int = 32,
        bias: bool = True,
        check_finite: bool = False,
        backend: str = "auto",
    ) -> None:
        check_virtual_batch_size(virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         check_finite=check_finite, backend=backend)  # fmt: skip
        self.virtual_batch_size = virtual_batch_size

    def _source(self) -> Virtual:
        return Virtual(self.virtual_batch_size)

    def _extra_init_kwargs(self) -> dict:
        return {"virtual_batch_size": self.virtual_batch_size}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """Ghost batch norm of ``(N, C)`` or ``(N, C, L)`` input.

    Example::

        >>> m = GhostBatchNorm1d(100, virtual_batch_size=16)
        >>> y = m(torch.randn(64, 100))
    """


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    """Ghost batch norm of ``(N, C, H, W)`` input.

    Example::

        >>> m = GhostBatchNorm2d(64, virtual_batch_size=32)
        >>> y = m(torch.randn(128, 64, 8, 8))
    """


class GhostBatchNorm3d(_GhostBatchNorm, BatchNorm3d):
    """Ghost batch norm of ``(N, C, D, H, W)`` input.

    Example::

        >>> m = GhostBatchNorm3d(16, virtual_batch_size=4)
        >>> y = m(torch.randn(8, 16, 4, 8, 8))
    """
