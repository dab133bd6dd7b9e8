r"""Fused batch-norm kernels in Triton: the ``backend="triton"`` of :func:`batchnorm.functional.batch_norm`.

Three tiers (see ``docs/kernels.md`` for the derivation):

* :mod:`._jit` - ``@triton.jit`` kernels: partial Welford/Chan statistics, the fused
  normalize + affine + residual + activation pass, and the two-pass backward;
* :mod:`.launch` - host launchers: per-channel ``(N, C, S)`` views of contiguous,
  channels_last and strided tensors, block sizes, split, ``num_warps``;
* :mod:`.ops` - ``torch.library`` custom ops with fake implementations and autograd,
  so ``torch.compile(fullgraph=True)`` traces them.

This module is the backend interface the functional calls *after* its own
validation; the running-statistics update stays in the shared core, so
:func:`train_forward` returns the batch statistics and owns no buffers.

Importing this package never imports Triton; :func:`is_available` says whether it can run.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["is_available", "train_forward", "infer_forward", "ACTIVATIONS"]

#: fused activations; ``None`` means ``"identity"``
ACTIVATIONS = ("identity", "relu", "silu")

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def is_available(x: Tensor) -> bool:
    """Whether the kernels can run on ``x``: Triton is installed and ``x`` is on a CUDA device,
    or ``x`` is on the CPU and ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).

    Example::

        >>> is_available(torch.zeros(2, 3))   # True only under TRITON_INTERPRET=1
        False
    """
    if not _HAS_TRITON or not isinstance(x, Tensor):
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _activation_name(activation: Optional[str]) -> str:
    name = "identity" if activation is None else activation
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS} or None")
    return name


def _check_residual(x: Tensor, residual: Optional[Tensor]) -> None:
    if residual is None:
        return
    if not isinstance(residual, Tensor) or residual.shape != x.shape:
        raise ValueError(f"residual must be a tensor of the input's shape {tuple(x.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise TypeError(
            f"residual has dtype {residual.dtype} on {residual.device} but the input has dtype {x.dtype} on "
            f"{x.device}; convert it first, e.g. residual.to(x)."
        )


def _aten():
    from ..functional.batch_norm import _Aten  # float64 inputs: the kernels compute in float32

    return _Aten


def train_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  residual: Optional[Tensor], activation: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Fused training-mode batch norm: ``(y, mean, rstd)``.

    .. math::
        \mu_c = \tfrac1m \textstyle\sum x,\quad \sigma_c^2 = \tfrac1m \sum (x-\mu_c)^2,\quad
        y = \mathrm{act}\big(\gamma_c (x-\mu_c)/\sqrt{\sigma_c^2+\epsilon} + \beta_c\ [+\ r]\big)

    over ``(N, *spatial)`` per channel, in one statistics pass and one output pass.

    Args:
        x: ``(N, C, *)`` float32/float16/bfloat16 (float64 is delegated to the ATen backend),
            any memory format; ``y`` keeps it.
        weight, bias: ``(C,)`` or None, the input's dtype or float32.
        eps: added to the variance.
        residual: None or a tensor of ``x``'s shape and dtype, added before the activation.
        activation: None/``"identity"``, ``"relu"`` or ``"silu"``.

    Returns:
        ``y`` (differentiable in ``x``, ``weight``, ``bias``, ``residual``), and the batch
        ``mean`` and ``rstd = 1/sqrt(var + eps)`` (biased variance), ``(C,)`` float32, detached.

    Example::

        >>> y, mean, rstd = train_forward(x, None, None, 1e-5, None, "relu")
    """
    act = _activation_name(activation)
    _check_residual(x, residual)
    if x.dtype == torch.float64:
        return _aten().train_forward(x, weight, bias, eps, residual, activation)
    from . import ops

    y, mean, rstd, _, _ = ops.bn_act_train(x, weight, bias, residual, float(eps), act)
    return y, mean.detach(), rstd.detach()


def infer_forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], eps: float, residual: Optional[Tensor],
                  activation: Optional[str]) -> Tensor:
    r"""Fused inference-mode batch norm, one read and one write:

    .. math::
        y = \mathrm{act}\big(\gamma_c (x - \hat\mu_c)/\sqrt{\hat\sigma^2_c+\epsilon} + \beta_c\ [+\ r]\big)

    with the running statistics ``running_mean`` (:math:`\hat\mu`) and ``running_var``
    (:math:`\hat\sigma^2`), shapes ``(C,)``. Differentiable in ``x``, ``weight``, ``bias``
    and ``residual`` (the statistics are constants). Same argument rules as :func:`train_forward`.

    Example::

        >>> y = infer_forward(x, torch.zeros(3), torch.ones(3), None, None, 1e-5, None, "relu")
    """
    act = _activation_name(activation)
    _check_residual(x, residual)
    if x.dtype == torch.float64:
        return _aten().infer_forward(x, running_mean, running_var, weight, bias, eps, residual, activation)
    if x.numel() == 0:
        return _aten().infer_forward(x, running_mean, running_var, weight, bias, eps, residual, activation)
    from . import ops

    return ops.bn_act_infer(x, running_mean, running_var, weight, bias, residual, float(eps), act)
