"""Drop-ins for ``torch.nn.GroupNorm``, ``torch.nn.LayerNorm`` and ``torch.nn.InstanceNorm1d/2d/3d``.

Same constructor arguments, parameter and buffer names, and state_dict as torch.nn (checkpoints
load both ways). The math is in :mod:`batchnorm.functional.group_norm`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..functional.group_norm import check_num_groups, group_norm, instance_norm, layer_norm
from ..functional.pipeline import check_eps
from ..functional.stats import PrecisionState
from ._base import NormBase

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He, 2018) of an ``(N, C, *)`` input.

    .. math::
        y = \gamma_c\,\frac{x - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} + \beta_c

    statistics per sample over each group of ``C / num_groups`` channels and all spatial
    positions; per-channel affine ``weight``/``bias`` of shape ``(C,)`` (init 1 / 0).
    ``GroupNorm(1, C)`` is layer norm over ``(C, *spatial)`` with a per-channel affine;
    ``GroupNorm(C, C)`` is instance norm. Raises ``ValueError`` if ``num_groups`` does not
    divide ``num_channels`` or the input has the wrong number of channels.

    Example::

        >>> gn = GroupNorm(8, 32)
        >>> y = gn(torch.randn(4, 32, 16, 16))
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        check_num_groups(num_groups, num_channels)
        check_eps(eps, "GroupNorm")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self._precision = PrecisionState()
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """``weight = 1``, ``bias = 0``."""
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm({self.num_groups}, {self.num_channels}): input has {input.shape[1]} channels "
                f"(dimension 1 of shape {tuple(input.shape)}); expected {self.num_channels}"
            )
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, precision_state=self._precision)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class LayerNorm(nn.Module):
    r"""Layer normalization (Ba et al., 2016) over the trailing ``normalized_shape`` dimensions.

    .. math::
        y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with ``mu``/``sigma^2`` per sample over the last ``len(normalized_shape)`` dimensions;
    ``weight``/``bias`` of shape ``normalized_shape`` when ``elementwise_affine`` (``bias``
    can be turned off with ``bias=False``, as in torch.nn).

    Example::

        >>> ln = LayerNorm(64)
        >>> y = ln(torch.randn(8, 10, 64))
    """

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"normalized_shape must be positive int(s), got {normalized_shape!r}")
        check_eps(eps, "LayerNorm")
        self.normalized_shape, self.eps, self.elementwise_affine = shape, eps, elementwise_affine
        self._precision = PrecisionState()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(shape, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape, **factory)) if elementwise_affine and bias else None

    def reset_parameters(self) -> None:
        """``weight = 1``, ``bias = 0``."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          precision_state=self._precision)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class _InstanceNorm(NormBase):
    r"""Instance normalization (Ulyanov et al., 2016) of an ``(N, C, *spatial)`` or unbatched ``(C, *spatial)`` input.

    .. math::
        y = \gamma_c\,\frac{x - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} + \beta_c

    statistics per (sample, channel) over the spatial positions. torch.nn's defaults:
    ``affine=False``, ``track_running_stats=False``. With ``track_running_stats=True`` the
    running statistics (mean over the batch of the instances' mean / unbiased variance) are
    updated in training and used in eval mode, as in torch.nn; here ``num_batches_tracked``
    is counted too and ``momentum=None`` means the cumulative average (torch.nn never
    updates then). Unlike torch.nn (a warning), a channel count different from
    ``num_features`` is an error.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True,
                 check_finite: bool = False) -> None:  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         check_finite=check_finite)  # fmt: skip

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor, got {type(input).__name__}")
        unbatched = input.dim() == self._input_dims[0] - 1
        if unbatched:
            input = input.unsqueeze(0)
        self._check_input_dim(input)
        running_mean, running_var, num_batches_tracked = self._running_stats_to_update()
        y = instance_norm(input, running_mean, running_var, self.weight, self.bias,
                          use_input_stats=self._uses_batch_stats(), momentum=self.momentum, eps=self.eps,
                          num_batches_tracked=num_batches_tracked, check_finite=self.check_finite,
                          precision_state=self._precision)  # fmt: skip
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """Instance norm of ``(N, C, L)`` or ``(C, L)`` input. See :class:`torch.nn.InstanceNorm1d`.

    Example::

        >>> y = InstanceNorm1d(8, affine=True)(torch.randn(4, 8, 50))
    """

    _input_dims = (3,)


class InstanceNorm2d(_InstanceNorm):
    """Instance norm of ``(N, C, H, W)`` or ``(C, H, W)`` input. See :class:`torch.nn.InstanceNorm2d`.

    Example::

        >>> y = InstanceNorm2d(3, track_running_stats=True)(torch.randn(4, 3, 16, 16))
    """

    _input_dims = (4,)


class InstanceNorm3d(_InstanceNorm):
    """Instance norm of ``(N, C, D, H, W)`` or ``(C, D, H, W)`` input. See :class:`torch.nn.InstanceNorm3d`.

    Example::

        >>> y = InstanceNorm3d(4)(torch.randn(2, 4, 4, 8, 8))
    """

    _input_dims = (5,)
