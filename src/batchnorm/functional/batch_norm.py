"""``batchnorm.functional.batch_norm``: the public functional entry point."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from . import _core

__all__ = ["batch_norm", "ACTIVATIONS", "apply_activation", "resolve_backend"]

#: Activations that can follow the normalization (fused in the Triton backend).
ACTIVATIONS = ("identity", "relu", "silu")

BACKENDS = ("auto", "aten", "triton")


def apply_activation(y: Tensor, activation: Optional[str]) -> Tensor:
    """Apply one of :data:`ACTIVATIONS` (``None`` means identity)."""
    if activation is None or activation == "identity":
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def _check_activation(activation: Optional[str]) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS} or None")


def triton_available(x: Tensor) -> bool:
    """Whether the Triton backend can run on ``x``'s device (CUDA, or the CPU interpreter)."""
    try:
        from ..kernels import is_available
    except ImportError:
        return False
    return is_available(x)


def resolve_backend(backend: str, x: Tensor) -> str:
    """``"auto"`` picks ``"triton"`` on CUDA when Triton is installed, else ``"aten"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available(x) else "aten"
    if backend == "triton" and not triton_available(x):
        raise RuntimeError(
            "backend='triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1 "
            "for the CPU interpreter); install with `pip install batchnorm[triton]` or use backend='aten'."
        )
    return backend


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
    check_finite: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Batch normalization of an ``(N, C, *)`` input (Ioffe & Szegedy, 2015).

    Training (``training=True``) normalizes with the batch statistics of each channel
    over ``(N, *spatial)``:

    .. math::
        \mu_c = \frac1m\sum x,\quad \sigma_c^2 = \frac1m\sum (x-\mu_c)^2,\quad
        y = \mathrm{act}\Big(\gamma_c\,\frac{x-\mu_c}{\sqrt{\sigma_c^2+\epsilon}} + \beta_c
        \;[+\ \mathrm{residual}]\Big)

    and, if running statistics are given, updates them in place:
    ``running_mean += m * (mu - running_mean)``, ``running_var += m * (sigma^2 * k/(k-1) - running_var)``
    with ``m = momentum`` (PyTorch's convention; Keras' ``decay`` is ``1 - m``), or
    ``m = 1/num_batches_tracked`` when ``momentum=None`` (cumulative average).
    Inference (``training=False``) uses ``running_mean``/``running_var`` instead.

    Same positional signature and semantics as :func:`torch.nn.functional.batch_norm`, plus:

    Args:
        num_batches_tracked: int64 scalar tensor, incremented in place on each
            training step with running statistics; required for ``momentum=None``.
        residual: tensor of the input's shape added after the affine, before the activation.
        activation: ``None``/``"identity"``, ``"relu"`` or ``"silu"``.
        check_finite: raise ``FloatingPointError`` if the input or the batch statistics
            hold NaN/Inf, *before* the running statistics are touched (eager mode only:
            under ``torch.compile`` it is a data-dependent branch, i.e. a graph break).
        backend: ``"aten"`` (PyTorch's native kernels), ``"triton"`` (this library's
            fused GPU kernels) or ``"auto"`` (Triton on CUDA when available).

    Shapes: input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``, any memory
    format (the output keeps it); float32/float64/float16/bfloat16. Statistics are kept in
    float32 (float64 for float64 inputs) and are accurate even when ``|mean| >> std``.

    Nothing is mutated when the call raises.

    Example::

        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, rm, rv, training=True)           # updates rm, rv
        >>> y_eval = batch_norm(x, rm, rv, training=False)     # uses them
    """
    what = "batch_norm"
    count = _core.check_input(input, weight, bias, running_mean, running_var, training, what=what)
    _core.check_momentum(momentum)
    _check_activation(activation)
    if residual is not None and (not isinstance(residual, Tensor) or residual.shape != input.shape):
        shape = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
        raise ValueError(f"{what}: residual must have the input's shape {tuple(input.shape)}, got {shape}")
    if training and running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError(f"{what}: momentum=None (cumulative average) needs num_batches_tracked")
    impl = _backend_impl(resolve_backend(backend, input))

    if training:
        if impl is _Aten and not check_finite and _core.can_update_in_kernel(input, running_mean, running_var):
            y = _core.train_and_update_in_kernel(
                input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, count
            )
            return _Aten._epilogue(y, residual, activation)
        y, mean, rstd = impl.train_forward(input, weight, bias, eps, residual, activation)
        if check_finite:
            _core.check_finite_stats(mean, rstd, what=what)
        if running_mean is not None:
            var = _core.var_from_rstd(rstd, eps)
            _core.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
        return y
    if running_mean is None:
        raise ValueError(f"{what}: inference (training=False) needs running_mean and running_var")
    if check_finite:
        _core.check_finite_input(input, what=what)
    return impl.infer_forward(input, running_mean, running_var, weight, bias, eps, residual, activation)


class _Aten:
    """Backend on PyTorch's native kernels: normalize, then residual add and activation as separate ops.

    A backend provides two functions (the Triton one fuses all three steps):

    * ``train_forward(x, weight, bias, eps, residual, activation) -> (y, mean, rstd)``
      with ``mean``/``rstd`` of shape ``(C,)`` in float32 (float64 for float64 input), detached;
    * ``infer_forward(x, running_mean, running_var, weight, bias, eps, residual, activation) -> y``.
    """

    @staticmethod
    def _epilogue(y, residual, activation):
        if residual is not None:
            y = y + residual
        return apply_activation(y, activation)

    @staticmethod
    def train_forward(x, weight, bias, eps, residual, activation):
        y, mean, rstd = _core.batch_moments_and_normalize(x, weight, bias, eps)
        return _Aten._epilogue(y, residual, activation), mean, rstd

    @staticmethod
    def infer_forward(x, running_mean, running_var, weight, bias, eps, residual, activation):
        y = _core.normalize_with_running_stats(x, running_mean, running_var, weight, bias, eps)
        return _Aten._epilogue(y, residual, activation)


def _backend_impl(name: str):
    if name == "triton":
        from .. import kernels

        return kernels
    return _Aten
