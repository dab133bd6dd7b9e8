"""``batchnorm.functional.batch_norm``: plain batch norm, the pipeline with the batch as its source."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .pipeline import THIS_BATCH, run
from .stats import PrecisionState

__all__ = ["batch_norm"]


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
    precision_state: Optional[PrecisionState] = None,
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
            fused GPU kernels) or ``"auto"`` (Triton only for the fused form - a residual or an
            activation - on CUDA; PyTorch's kernels otherwise).
        precision_state: the layer's :class:`~batchnorm.functional.stats.PrecisionState`, which
            remembers the off-centre decision across steps on a GPU (modules pass their own).

    Shapes: input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``, any memory
    format (the output keeps it); float32/float64/float16/bfloat16. Statistics are kept in
    float32 (float64 for float64 inputs) and are accurate even when ``|mean| >> std``.

    An input without values (``N = 0`` or a zero-size spatial dimension) gives an empty
    output (zero gradients) and changes nothing. Nothing is mutated when the call raises.

    Example::

        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, rm, rv, training=True)           # updates rm, rv
        >>> y_eval = batch_norm(x, rm, rv, training=False)     # uses them
    """
    return run(input, THIS_BATCH, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
               eps, residual, activation, check_finite, backend, precision_state)
