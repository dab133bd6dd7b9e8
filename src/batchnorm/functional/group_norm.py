r"""Group, layer and instance norm: the same normalize-then-affine over other axes.

With ``x`` of shape ``(N, C, *spatial)``:

* **group norm** (Wu & He, 2018): statistics per (sample, group of ``C/G`` channels) over
  ``(C/G, *spatial)``; per-channel affine;
* **layer norm** (Ba et al., 2016): statistics per sample over the trailing
  ``normalized_shape``; elementwise affine of that shape;
* **instance norm** (Ulyanov et al., 2016): statistics per (sample, channel) over
  ``*spatial``; per-channel affine. It is batch norm of the ``(1, N*C, *spatial)``
  view, so it is the normalization pipeline with
  :class:`~batchnorm.functional.pipeline.PerInstance` as the source, and can keep running
  statistics like torch.nn's ``track_running_stats=True``.

Each group is normalized as ``xhat = (x - mu) / sqrt(sigma^2 + eps)`` with the biased
variance, then ``y = gamma * xhat + beta``. Group and layer norm call PyTorch's native
kernels (``native_group_norm`` / ``native_layer_norm``, float32 accumulation for half
inputs) under the one precision rule (:func:`~batchnorm.functional.stats.exact_norm`):
exact at large offsets, where torch.nn's float32 group/layer norm lose ``ulp(mean)/std``.
The equivalences ``group_norm(G=1) == layer_norm over (C, *spatial)`` and
``group_norm(G=C) == instance_norm`` hold with the same affine.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import InputError, InputTypeError
from .pipeline import THIS_BATCH, PerInstance, check_count, check_eps, check_input, check_momentum, run
from .stats import PrecisionState, exact_norm, in_transform

__all__ = ["group_norm", "layer_norm", "instance_norm", "check_num_groups"]


def _check_tensor(x, what: str, min_dim: int) -> None:
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{what}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise InputTypeError(f"{what}: input has dtype {x.dtype}; needs a floating-point input, e.g. x.float()")
    if x.dim() < min_dim:
        raise InputError(f"{what}: expected at least {min_dim} dimensions, got shape {tuple(x.shape)}")


def _check_param(t, name: str, shape: tuple, x: Tensor, what: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise InputTypeError(f"{what}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise InputError(
            f"{what}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} for input of shape {tuple(x.shape)}"
        )
    if t.device != x.device:
        raise InputError(f"{what}: {name} is on {t.device} but the input is on {x.device}; use module.to(x.device)")
    if t.dtype != x.dtype and not (x.dtype in (torch.float16, torch.bfloat16) and t.dtype == torch.float32):
        raise InputTypeError(f"{what}: {name} has dtype {t.dtype} but the input has dtype {x.dtype}; use the same dtype")


def check_num_groups(num_groups, num_channels) -> int:
    """``num_groups`` must be a positive int (:func:`check_count`) dividing ``num_channels``; returned as an int."""
    num_groups = check_count(num_groups, "num_groups")
    if num_channels % num_groups:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise InputError(
            f"num_groups={num_groups} must divide the number of channels {num_channels}; "
            f"choose one of {divisors}"
        )
    return num_groups


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    precision_state: Optional[PrecisionState] = None,
) -> Tensor:
    r"""Group normalization of an ``(N, C, *)`` input (Wu & He, 2018).

    .. math::
        y_{n,c} = \gamma_c\,\frac{x_{n,c} - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} + \beta_c,
        \qquad g = \lfloor c\,G/C \rfloor

    with ``mu``/``sigma^2`` (biased) over the ``C/G`` channels of group ``g`` and all spatial
    positions of sample ``n``. Same signature as :func:`torch.nn.functional.group_norm`;
    weight and bias have shape ``(C,)``. Raises ``ValueError`` if ``G`` does not divide ``C``.

    Example::

        >>> y = group_norm(torch.randn(2, 32, 8, 8), num_groups=8)
    """
    what = "group_norm"
    _check_tensor(input, what, 2)
    c = input.shape[1]
    num_groups = check_num_groups(num_groups, c)
    _check_param(weight, "weight", (c,), input, what)
    _check_param(bias, "bias", (c,), input, what)
    eps = check_eps(eps, what)
    n, g = input.shape[0], num_groups
    if input.numel() == 0 or torch.jit.is_tracing():  # (torch.jit.trace, the TorchScript ONNX exporter: torch's op)
        return torch.group_norm(input, g, weight, bias, eps)
    hxw = input.numel() // (n * c)
    per = c // g

    def op(x):
        return torch.native_group_norm(x, weight, bias, n, c, hxw, g, eps)

    def expand(t):  # (N, G) -> broadcast over (N, C, *spatial)
        return t.repeat_interleave(per, dim=1).view((n, c) + (1,) * (input.dim() - 2)).to(input.dtype)

    def first(x):  # the first value of each group, (N, G)
        x = x.unflatten(1, (g, per)).select(2, 0)
        while x.dim() > 2:
            x = x.select(2, 0)
        return x

    return exact_norm(input, op, first, expand, precision_state)


def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    precision_state: Optional[PrecisionState] = None,
) -> Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dimensions (Ba et al., 2016).

    .. math::
        y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with ``mu``/``sigma^2`` (biased) over the last ``len(normalized_shape)`` dimensions of each
    sample; ``gamma``/``beta`` have shape ``normalized_shape``. Same signature as
    :func:`torch.nn.functional.layer_norm`.

    Example::

        >>> y = layer_norm(torch.randn(4, 10, 32), (32,))
    """
    what = "layer_norm"
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    _check_tensor(input, what, max(len(shape), 1))
    if tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise InputError(
            f"{what}: the input's trailing dimensions {tuple(input.shape[input.dim() - len(shape):])} do not match "
            f"normalized_shape {shape} (input shape {tuple(input.shape)})"
        )
    _check_param(weight, "weight", shape, input, what)
    _check_param(bias, "bias", shape, input, what)
    eps = check_eps(eps, what)
    if input.numel() == 0 or torch.jit.is_tracing():  # (torch.jit.trace, the TorchScript ONNX exporter: torch's op)
        return torch.layer_norm(input, shape, weight, bias, eps)
    lead = input.dim() - len(shape)

    def op(x):
        return torch.native_layer_norm(x, shape, weight, bias, eps)

    def first(x):  # the first value of each normalized slice, shaped like native_layer_norm's mean
        for d in range(lead, x.dim()):
            x = x.narrow(d, 0, 1)
        return x

    return exact_norm(input, op, first, lambda t: t.to(input.dtype), precision_state)


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    check_finite: bool = False,
    precision_state: Optional[PrecisionState] = None,
) -> Tensor:
    r"""Instance normalization of an ``(N, C, *spatial)`` input (Ulyanov et al., 2016).

    .. math::
        y_{n,c} = \gamma_c\,\frac{x_{n,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} + \beta_c

    with ``mu``/``sigma^2`` (biased) over the spatial positions of each (sample, channel);
    computed as batch norm of the ``(1, N*C, *spatial)`` view. With ``use_input_stats`` and
    running statistics given, they are updated like torch.nn's: the per-instance means and
    unbiased variances are averaged over ``N``, then
    ``running <- running + m * (batch - running)`` (``momentum=None``: cumulative average
    over ``num_batches_tracked``, which torch.nn does not support). With
    ``use_input_stats=False`` the running statistics normalize (eval with tracking).

    Same signature as :func:`torch.nn.functional.instance_norm` plus ``num_batches_tracked``,
    ``check_finite`` (raise before any update if the input or the statistics are not finite)
    and ``precision_state``. Nothing is mutated when the call raises.

    Example::

        >>> y = instance_norm(torch.randn(4, 3, 16, 16))
    """
    what = "instance_norm"
    _check_tensor(input, what, 3)
    if not use_input_stats:  # eval with tracked statistics: batch norm inference
        if running_mean is None:
            raise InputError(f"{what}: use_input_stats=False needs running_mean and running_var")
        return run(input, THIS_BATCH, weight, bias, running_mean, running_var, None, False, momentum, eps,
                   check_finite=check_finite, state=precision_state, what=what)  # fmt: skip
    count = check_input(input, weight, bias, running_mean, running_var, training=False, what=what)
    eps = check_eps(eps, what)
    momentum = check_momentum(momentum, what)
    n, c = input.shape[:2]
    k = count // n if n else 0
    if input.numel() and k < 2:
        raise InputError(
            f"{what}: expected more than 1 spatial value per instance when using input statistics, got input of "
            f"shape {tuple(input.shape)}"
        )
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise InputError(f"{what}: momentum=None (cumulative average) needs num_batches_tracked")
    if torch.jit.is_tracing() or in_transform():  # (torch.jit.trace / ONNX, torch.func: torch's op)
        return torch.instance_norm(input, weight, bias, running_mean, running_var, True,
                                   0.0 if momentum is None else momentum, eps, False)  # fmt: skip
    flat = input.reshape((1, n * c) + tuple(input.shape[2:]))
    w = None if weight is None else weight.repeat(n)
    b = None if bias is None else bias.repeat(n)
    y = run(flat, PerInstance(n, c), w, b, running_mean, running_var, num_batches_tracked, True, momentum, eps,
            check_finite=check_finite, backend="aten", state=precision_state, what=what, count=k)  # fmt: skip
    return y.view(input.shape)
