r"""Batch norm followed by dropout and an activation, with an optional residual add: ``BatchNormAct1d/2d/3d``.

.. math::
    y = \mathrm{act}\Big(\mathrm{drop}\Big(\gamma\,\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
    + \beta\Big) \;[+\ \mathrm{residual}]\Big)

Built like timm's ``BatchNormAct2d`` (the constructor takes timm's arguments; the activation
lives in ``.act`` and the dropout in ``.drop``, ``nn.Identity`` when absent), so a timm
checkpoint loads and gives the same outputs. Each class subclasses this library's
``BatchNorm1d``/``2d``/``3d`` - hence torch.nn's - and adds no state: the ``state_dict`` is
``torch.nn.BatchNorm2d``'s.

When the activation is ``nn.ReLU``, ``nn.SiLU`` or absent and there is no dropout, the whole
``act(BN(x) + residual)`` is one call of the pipeline, which on CUDA with ``backend="auto"``
is one fused Triton kernel per pass (not yet measured on a GPU: docs/kernels.md). Any other
activation module (GELU, LeakyReLU, Hardswish, ...) or a dropout is applied after the
normalization as the module it is.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from torch import Tensor, nn

from ..errors import InputError
from ._base import fx_leaf
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "make_activation"]

#: activation names accepted as ``act_layer`` strings (timm's most common ones)
_ACTIVATIONS = {
    "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "hard_swish": nn.Hardswish, "hardswish": nn.Hardswish,
    "hard_sigmoid": nn.Hardsigmoid, "mish": nn.Mish, "relu6": nn.ReLU6, "identity": nn.Identity,
}  # fmt: skip
#: activation modules the pipeline fuses, by the name the kernels know
_FUSED = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: None}

ActLayer = Union[str, Callable[..., nn.Module], nn.Module, None]
_UNSET = object()


def make_activation(act_layer: ActLayer, inplace: bool = True, act_kwargs: Optional[dict] = None) -> nn.Module:
    """An activation module from a name (``"relu"``, ``"silu"``, ``"gelu"``, ...), a class or factory,
    or a module (used as is); ``None`` gives ``nn.Identity``. ``inplace`` is passed where the class takes it."""
    if act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, nn.Module):
        return act_layer
    if isinstance(act_layer, str):
        if act_layer.lower() not in _ACTIVATIONS:
            raise InputError(f"unknown activation {act_layer!r}; use one of {sorted(_ACTIVATIONS)} or pass a module "
                             f"class such as torch.nn.GELU")  # fmt: skip
        act_layer = _ACTIVATIONS[act_layer.lower()]
    if not callable(act_layer):
        raise InputError(f"act_layer must be a name, an nn.Module class or an nn.Module, got {act_layer!r}")
    kwargs = dict(act_kwargs or {})
    if inplace and act_layer in (nn.ReLU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
                                 nn.ReLU6):  # fmt: skip
        kwargs.setdefault("inplace", True)
    return act_layer(**kwargs)


class _BatchNormAct:
    """Mixin: timm's constructor, ``.act``/``.drop``, ``forward(x, residual=None)``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: ActLayer = nn.ReLU,
        act_kwargs: Optional[dict] = None,
        inplace: bool = True,
        drop_layer: Optional[Callable[[], nn.Module]] = None,
        device=None,
        dtype=None,
        *,
        activation=_UNSET,
        **kwargs,
    ) -> None:
        # keyword-only options of the base (bias, check_finite, backend) pass through unchanged
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        if activation is not _UNSET:  # this library's earlier spelling: activation="relu" | "silu" | None
            act_layer = activation
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = make_activation(act_layer, inplace, act_kwargs) if apply_act else nn.Identity()

    def _fused_name(self):
        """The activation name the pipeline fuses, ``None`` for none, or ``False`` if it cannot fuse."""
        if type(self.drop) is not nn.Identity:
            return False
        return _FUSED.get(type(self.act), False)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``act(drop(batch_norm(input)) [+ residual])``; ``residual`` has the input's shape."""
        traced = fx_leaf(self, input, *(() if residual is None else (residual,)))
        if traced is not None:
            return traced
        fused = self._fused_name()
        if fused is not False:
            return self._forward(input, residual, fused)
        y = self.drop(self._forward(input))
        if residual is not None:
            y = y + residual
        return self.act(y)


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """Batch norm + dropout + activation (+ residual) of ``(N, C)`` or ``(N, C, L)`` input.

    Arguments: timm's - ``num_features, eps, momentum, affine, track_running_stats, apply_act,
    act_layer, act_kwargs, inplace, drop_layer, device, dtype`` - then this library's keyword-only
    ``bias``, ``check_finite``, ``backend``.

    Example::

        >>> m = BatchNormAct1d(16, act_layer="silu")
        >>> y = m(torch.randn(8, 16, 5))
    """


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """Batch norm + dropout + activation (+ residual) of ``(N, C, H, W)`` input, contiguous or channels_last.

    The block ending of a ResNet (``relu(bn(conv(x)) + shortcut)``) is one call::

        >>> m = BatchNormAct2d(64)                       # act_layer=nn.ReLU
        >>> y = m(torch.randn(8, 64, 14, 14), residual=torch.randn(8, 64, 14, 14))

    ``m.state_dict()`` loads into :class:`torch.nn.BatchNorm2d` (and timm's ``BatchNormAct2d``) and back.
    """


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """Batch norm + dropout + activation (+ residual) of ``(N, C, D, H, W)`` input.

    Example::

        >>> m = BatchNormAct3d(8, act_layer=torch.nn.GELU)
        >>> y = m(torch.randn(2, 8, 3, 4, 4))
    """
