r"""Batch renormalization (Ioffe, 2017, arXiv:1702.03275) as a corrected affine on batch norm.

Training-mode batch renorm normalizes with the batch statistics and then corrects
towards the running ones:

.. math::
    \hat x = \frac{x - \mu_B}{\sigma_B},\qquad
    r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\qquad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),\qquad
    y = \gamma\,(r\,\hat x + d) + \beta

with ``sigma_B = sqrt(var_B + eps)``, ``sigma = sqrt(running_var + eps)`` and ``mu`` the
running mean *before* this step's update; ``r`` and ``d`` are constants for the
backward (``stop_gradient`` in the paper). Because they are per-channel constants,
``y = gamma' * xhat + beta'`` with

.. math::
    \gamma' = \gamma\, r,\qquad \beta' = \gamma\, d + \beta

so the layer is batch norm with this corrected affine; autograd carries
``d gamma = r * d gamma' + d * d beta'``. It is the normalization pipeline with
:class:`~batchnorm.functional.pipeline.Renorm` as the statistics source: the statistics
are computed first, in one pass under the one precision rule, to get ``r`` and ``d``; the
normalization then runs through the one "given statistics" Function (native inference
kernel forward, native training backward), so the layer moves as many bytes as plain
batch norm. With ``r_max = 1, d_max = 0`` we get ``r = 1, d = 0`` and batch renorm *is*
batch norm, bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..errors import InputError, InputTypeError
from .pipeline import THIS_BATCH, Renorm, run
from .stats import PrecisionState

__all__ = ["batch_renorm", "RenormSchedule", "resolve_limit", "check_limits"]

Limit = Union[float, int, Callable[[int], float]]


class RenormSchedule:
    """Step-based ``r_max``/``d_max`` schedule; the defaults are the paper's (Ioffe 2017, sec. 4).

    Plain batch norm (``r_max = 1``, ``d_max = 0``) for the first ``warmup`` steps, then both
    limits are relaxed linearly: ``r_max`` reaches ``r_max_final`` at ``r_max_steps`` and
    ``d_max`` reaches ``d_max_final`` at ``d_max_steps`` (the paper: 5k warm-up steps, then
    ``r_max -> 3`` by 40k and ``d_max -> 5`` by 25k). Call with the number of training steps
    taken so far (the module passes ``num_batches_tracked`` before its increment) and get
    ``(r_max, d_max)``; :meth:`r_max` / :meth:`d_max` give one of them.

    Example::

        >>> s = RenormSchedule()
        >>> s(0), s(5_000), s(40_000)
        ((1.0, 0.0), (1.0, 0.0), (3.0, 5.0))
        >>> m = BatchRenorm2d(16, r_max=s.r_max, d_max=s.d_max)
    """

    def __init__(
        self,
        warmup: int = 5_000,
        r_max_final: float = 3.0,
        r_max_steps: int = 40_000,
        d_max_final: float = 5.0,
        d_max_steps: int = 25_000,
    ) -> None:
        if warmup < 0 or r_max_steps <= warmup or d_max_steps <= warmup:
            raise ValueError(
                f"RenormSchedule needs 0 <= warmup < r_max_steps and warmup < d_max_steps, got "
                f"warmup={warmup}, r_max_steps={r_max_steps}, d_max_steps={d_max_steps}"
            )
        check_limits(r_max_final, d_max_final)
        self.warmup, self.r_max_final, self.r_max_steps = int(warmup), float(r_max_final), int(r_max_steps)
        self.d_max_final, self.d_max_steps = float(d_max_final), int(d_max_steps)

    def _ramp(self, step: int, start: float, end: float, end_step: int) -> float:
        t = min(max((step - self.warmup) / (end_step - self.warmup), 0.0), 1.0)
        return start + t * (end - start)

    def r_max(self, step: int) -> float:
        """``r_max`` after ``step`` training steps."""
        return self._ramp(step, 1.0, self.r_max_final, self.r_max_steps)

    def d_max(self, step: int) -> float:
        """``d_max`` after ``step`` training steps."""
        return self._ramp(step, 0.0, self.d_max_final, self.d_max_steps)

    def __call__(self, step: int) -> tuple[float, float]:
        return self.r_max(step), self.d_max(step)

    def __repr__(self) -> str:
        return (
            f"RenormSchedule(warmup={self.warmup}, r_max_final={self.r_max_final}, r_max_steps={self.r_max_steps}, "
            f"d_max_final={self.d_max_final}, d_max_steps={self.d_max_steps})"
        )


def check_limits(r_max, d_max) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``r_max >= 1`` and ``d_max >= 0`` (finite numbers)."""
    for name, v in (("r_max", r_max), ("d_max", d_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputTypeError(f"{name} must be a number or a callable step -> number, got {v!r}")
        if not math.isfinite(v):
            raise InputError(f"{name} must be finite, got {v}")
    if r_max < 1:
        raise InputError(
            f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}; r_max=1 gives plain batch norm"
        )
    if d_max < 0:
        raise InputError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}; d_max=0 disables d")


def resolve_limit(limit: Limit, step: int) -> float:
    """A number as is, or ``limit(step)`` for a schedule callable."""
    if callable(limit):
        return limit(step)
    return limit


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    check_finite: bool = False,
    backend: str = "auto",
    precision_state: Optional[PrecisionState] = None,
) -> Tensor:
    r"""Batch renormalization of an ``(N, C, *)`` input (Ioffe, 2017).

    Training: ``y = gamma * (r * (x - mu_B) / sigma_B + d) + beta`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``,
    ``sigma = sqrt(running_var + eps)``, ``mu = running_mean`` (values before the update),
    ``r``/``d`` constant in the backward; then the running statistics are updated from the
    batch statistics exactly as in :func:`batchnorm.functional.batch_norm`. Inference
    (``training=False``) is plain batch norm with the running statistics.

    Args are those of :func:`batchnorm.functional.batch_norm` plus ``r_max >= 1`` and
    ``d_max >= 0`` (numbers; schedules are resolved by the module). ``running_mean`` and
    ``running_var`` are required: ``r`` and ``d`` are defined by them.

    Shapes: input ``(N, C, *)``; weight, bias, running statistics ``(C,)``. Output: input's shape.
    Nothing is mutated when the call raises.

    Example::

        >>> x = torch.randn(16, 4, 8, 8)
        >>> rm, rv = torch.zeros(4), torch.ones(4)
        >>> y = batch_renorm(x, rm, rv, training=True, r_max=3.0, d_max=5.0)
    """
    check_limits(r_max, d_max)
    if running_mean is None:
        raise InputError(
            "batch_renorm: needs running_mean and running_var (r and d are measured against them); "
            "for batch statistics only use batchnorm.functional.batch_norm"
        )
    # inference, or r = 1 and d = 0 identically (e.g. the schedule's warm-up): batch norm itself
    source = Renorm(r_max, d_max) if training and (r_max != 1 or d_max != 0) else THIS_BATCH
    return run(input, source, weight, bias, running_mean, running_var, num_batches_tracked if training else None,
               training, momentum, eps, check_finite=check_finite, backend=backend, state=precision_state,
               what="batch_renorm")
