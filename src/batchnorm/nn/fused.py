r"""Batch norm with the activation (and an optional residual add) fused: ``BatchNormAct1d/2d/3d``.

.. math::
    y = \mathrm{act}\Big(\gamma\,\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta
    \;[+\ \mathrm{residual}]\Big)

On CUDA (``backend="auto"`` or ``"triton"``) this is one fused Triton kernel per pass
(:mod:`batchnorm.kernels`); on the CPU it is PyTorch's native batch norm followed by
the add and the activation. Each class subclasses the matching
:class:`batchnorm.nn.BatchNorm1d`/``2d``/``3d`` and adds nothing to the state: the
``state_dict`` is exactly that of :class:`torch.nn.BatchNorm2d` (checkpoints load both
ways), and the forward is the base class's ``_forward`` with the activation chosen.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..functional.backends import ACTIVATIONS
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


class _FusedActivation:
    """Mixin: the ``activation`` argument, ``forward(x, residual=None)`` and its repr."""

    def __init__(
        self,
        num_features: int,
        activation: Optional[str] = "relu",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(
                f"{type(self).__name__}: unknown activation {activation!r}; choose one of {ACTIVATIONS} "
                f"(or None for plain batch norm)"
            )
        # keyword-only options of the base (check_finite, backend, ...) pass through unchanged
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.activation = "identity" if activation is None else activation

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``act(batch_norm(input) [+ residual])``; ``residual`` has the input's shape."""
        return self._forward(input, residual, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class BatchNormAct1d(_FusedActivation, BatchNorm1d):
    """Batch norm + residual add + activation of ``(N, C)`` or ``(N, C, L)`` input.

    Args: ``num_features``, ``activation`` (``"relu"`` default, ``"silu"``, ``"identity"``/None),
    then the arguments of :class:`batchnorm.nn.BatchNorm1d`.

    Example::

        >>> m = BatchNormAct1d(16, activation="silu")
        >>> y = m(torch.randn(8, 16, 5))
    """


class BatchNormAct2d(_FusedActivation, BatchNorm2d):
    """Batch norm + residual add + activation of ``(N, C, H, W)`` input, contiguous or channels_last.

    The block ending of a ResNet (``relu(bn(conv(x)) + shortcut)``) is one call::

        >>> m = BatchNormAct2d(64)                       # activation="relu"
        >>> y = m(torch.randn(8, 64, 14, 14), residual=torch.randn(8, 64, 14, 14))

    ``m.state_dict()`` loads into :class:`torch.nn.BatchNorm2d` and back.
    """


class BatchNormAct3d(_FusedActivation, BatchNorm3d):
    """Batch norm + residual add + activation of ``(N, C, D, H, W)`` input.

    Example::

        >>> m = BatchNormAct3d(8, activation="relu")
        >>> y = m(torch.randn(2, 8, 3, 4, 4))
    """
