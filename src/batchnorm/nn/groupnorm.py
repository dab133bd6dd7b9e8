"""Drop-ins for ``torch.nn.GroupNorm``, ``torch.nn.LayerNorm`` and ``torch.nn.InstanceNorm1d/2d/3d``.

Each subclasses the torch.nn class it replaces: constructor, parameters, buffers, state_dict,
``reset_parameters`` and ``extra_repr`` are torch.nn's. The forward is this library's (the
math is in :mod:`batchnorm.functional.group_norm`): exact at large offsets, where torch.nn's
float32 group and layer norm lose ``ulp(mean) / std`` (4e-2 relative at mean 1e6).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Optional, Sequence, Union

from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from ..errors import InputError
from ..functional.group_norm import check_num_groups, group_norm, instance_norm, layer_norm
from ..functional.pipeline import check_eps, check_momentum
from ..functional.stats import PrecisionState
from ._base import check_num_features, fx_leaf, torch_init

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class GroupNorm(nn.GroupNorm):
    r"""Group normalization (Wu & He, 2018) of an ``(N, C, *)`` input; a :class:`torch.nn.GroupNorm`.

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
                 device=None, dtype=None, *, bias: bool = True) -> None:  # fmt: skip
        num_channels = check_num_features(num_channels, "num_channels")
        num_groups = check_num_groups(num_groups, num_channels)
        eps = check_eps(eps, "GroupNorm")
        torch_init(self, nn.GroupNorm, num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self._precision = PrecisionState()

    def forward(self, input: Tensor) -> Tensor:
        traced = fx_leaf(self, input)
        if traced is not None:
            return traced
        if self.affine and isinstance(input, Tensor) and input.dim() >= 2 and input.shape[1] != self.num_channels:
            # (torch.nn checks the channel count only through the affine parameters' shape)
            raise InputError(
                f"GroupNorm({self.num_groups}, {self.num_channels}): input has {input.shape[1]} channels "
                f"(dimension 1 of shape {tuple(input.shape)}); expected {self.num_channels}: pass inputs with "
                f"{self.num_channels} channels or build GroupNorm(num_groups, {input.shape[1]})"
            )
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, precision_state=self._precision)


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization (Ba et al., 2016) over the trailing ``normalized_shape`` dimensions; a
    :class:`torch.nn.LayerNorm`.

    .. math::
        y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with ``mu``/``sigma^2`` per sample over the last ``len(normalized_shape)`` dimensions;
    ``weight``/``bias`` of shape ``normalized_shape`` when ``elementwise_affine``.

    Example::

        >>> ln = LayerNorm(64)
        >>> y = ln(torch.randn(8, 10, 64))
    """

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None) -> None:  # fmt: skip
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
        normalized_shape = tuple(check_num_features(s, "normalized_shape") for s in shape)
        eps = check_eps(eps, "LayerNorm")
        nn.LayerNorm.__init__(self, normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._precision = PrecisionState()

    def forward(self, input: Tensor) -> Tensor:
        traced = fx_leaf(self, input)
        if traced is not None:
            return traced
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          precision_state=self._precision)  # fmt: skip


class _InstanceNorm(_TorchInstanceNorm):
    r"""Instance normalization (Ulyanov et al., 2016) of an ``(N, C, *spatial)`` or unbatched ``(C, *spatial)`` input.

    .. math::
        y = \gamma_c\,\frac{x - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} + \beta_c

    statistics per (sample, channel) over the spatial positions. torch.nn's defaults and
    semantics: ``affine=False``, ``track_running_stats=False``; with tracking, the running
    statistics (mean over the batch of the instances' mean / unbiased variance) are updated in
    training and used in eval mode, and ``num_batches_tracked`` stays untouched, as in torch.nn.
    Differences (docs/compat.md): ``momentum=None`` is the cumulative average over
    ``num_batches_tracked`` (torch.nn then updates nothing), and the keyword-only ``check_finite``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True,
                 check_finite: bool = False) -> None:  # fmt: skip
        name = type(self).__name__
        num_features = check_num_features(num_features)
        eps = check_eps(eps, name)
        momentum = check_momentum(momentum, name)
        torch_init(self, next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn")), num_features, eps,
                   momentum, affine, track_running_stats, device, dtype, bias=bias)  # fmt: skip
        self.check_finite = check_finite
        self._precision = PrecisionState()

    def forward(self, input: Tensor) -> Tensor:
        traced = fx_leaf(self, input)
        if traced is not None:
            return traced
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)  # torch.nn's: the batched or unbatched rank
        unbatched = input.dim() == self._get_no_batch_dim()
        dim = 0 if unbatched else 1  # the channel dimension of the caller's input
        if input.shape[dim] != self.num_features and not self.affine and not self.track_running_stats:
            warnings.warn(  # torch.nn's behaviour: num_features is not used without affine or tracking
                f"input's size at dim={dim} does not match num_features. You can silence this warning by not passing "
                f"in num_features, which is not used because affine=False", stacklevel=2)  # fmt: skip
        elif input.shape[dim] != self.num_features:
            raise InputError(f"{type(self).__name__}: expected input's size at dim={dim} to match num_features "
                             f"({self.num_features}), but got: {input.shape[dim]} (input shape {tuple(input.shape)}); "
                             f"pass inputs with {self.num_features} channels or build the module with "
                             f"num_features={input.shape[dim]}.")  # fmt: skip
        if unbatched:
            input = input.unsqueeze(0)
        use_input_stats = self.training or not self.track_running_stats
        y = instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias, use_input_stats,
                          self.momentum, self.eps,
                          num_batches_tracked=self.num_batches_tracked if self.momentum is None else None,
                          check_finite=self.check_finite, precision_state=self._precision)  # fmt: skip
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + ", check_finite=True" if self.check_finite else s


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    """Instance norm of ``(N, C, L)`` or ``(C, L)`` input; a :class:`torch.nn.InstanceNorm1d`.

    Example::

        >>> y = InstanceNorm1d(8, affine=True)(torch.randn(4, 8, 50))
    """


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    """Instance norm of ``(N, C, H, W)`` or ``(C, H, W)`` input; a :class:`torch.nn.InstanceNorm2d`.

    Example::

        >>> y = InstanceNorm2d(3, track_running_stats=True)(torch.randn(4, 3, 16, 16))
    """


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    """Instance norm of ``(N, C, D, H, W)`` or ``(C, D, H, W)`` input; a :class:`torch.nn.InstanceNorm3d`.

    Example::

        >>> y = InstanceNorm3d(4)(torch.randn(2, 4, 4, 8, 8))
    """
