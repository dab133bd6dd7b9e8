r"""Ghost (virtual) batch norm (Hoffer, Hubara & Soudry, 2017): batch norm per virtual sub-batch.

Training splits the batch along ``N`` into consecutive chunks ``B_1, ..., B_K`` of
``virtual_batch_size`` samples and normalizes each with its own statistics:

.. math::
    y_i = \gamma\,\frac{x_i - \mu_{B_k}}{\sqrt{\sigma^2_{B_k} + \epsilon}} + \beta
    \qquad (i \in B_k)

Decisions (documented in ``docs/family.md``):

* **N not a multiple** of ``virtual_batch_size``: the last chunk is smaller
  (``N mod virtual_batch_size`` samples), like ``torch.split``. A last chunk with fewer
  than 2 values per channel cannot be normalized and raises ``ValueError``.
  ``virtual_batch_size > N`` in training raises ``ValueError`` (it would silently be
  plain batch norm, which is rarely what was meant).
* **Running statistics**: one update per forward with the *pooled* statistics of all
  chunks, merged exactly (Chan et al.) from the chunks' ``(count, mean, M2)``. They equal
  the statistics of the whole batch, so ``num_batches_tracked`` counts optimizer steps,
  the ``momentum`` tuned for plain batch norm keeps its meaning, and eval mode (plain
  batch norm with these statistics) sees the same estimate of the population
  statistics plain batch norm would. Sequential per-chunk updates would compound the
  momentum to ``1 - (1 - m)^K`` and make it depend on the batch size.
* **Inference** is plain batch norm with the running statistics.

It is the normalization pipeline with :class:`~batchnorm.functional.pipeline.Virtual`
as the statistics source: per-chunk statistics under the one precision rule
(:func:`~batchnorm.functional.stats.moments` with ``chunk``), normalized by the one
"given statistics" Function, chunk by chunk into slices of one output.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..errors import InputError
from .pipeline import Running, Virtual, check_eps, check_input, check_momentum, run
from .stats import PrecisionState

__all__ = ["ghost_batch_norm", "check_virtual_batch_size"]


def check_virtual_batch_size(virtual_batch_size) -> None:
    """``virtual_batch_size`` must be a positive int."""
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise InputError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")


def ghost_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    check_finite: bool = False,
    backend: str = "auto",
    precision_state: Optional[PrecisionState] = None,
) -> Tensor:
    r"""Ghost batch norm of an ``(N, C, *)`` input: batch norm on each chunk of ``virtual_batch_size`` samples.

    Training: chunk ``k`` (samples ``k*v .. min((k+1)*v, N) - 1``) is normalized with its own
    mean and biased variance; the running statistics, if given, are updated once with the
    statistics of the whole batch (exact merge of the chunks'), see the module docstring.
    Inference (``training=False``): plain batch norm with the running statistics.

    Args are those of :func:`batchnorm.functional.batch_norm` plus ``virtual_batch_size``.
    Raises ``ValueError`` if ``virtual_batch_size > N`` in training, or if the last chunk has
    fewer than 2 values per channel. Nothing is mutated when the call raises.

    Shapes: input ``(N, C, *)``; weight, bias, running statistics ``(C,)``. Output: input's shape.

    Example::

        >>> x = torch.randn(64, 8, 4, 4)
        >>> rm, rv = torch.zeros(8), torch.ones(8)
        >>> y = ghost_batch_norm(x, rm, rv, training=True, virtual_batch_size=16)
    """
    what = "ghost_batch_norm"
    count = check_input(input, weight, bias, running_mean, running_var, training=training, what=what)
    check_eps(eps, what)
    check_momentum(momentum, what)
    check_virtual_batch_size(virtual_batch_size)
    if not training and running_mean is None:
        raise InputError(f"{what}: inference (training=False) needs running_mean and running_var")
    n = input.shape[0]
    if training and n > 0:
        if virtual_batch_size > n:
            raise InputError(
                f"{what}: virtual_batch_size={virtual_batch_size} is larger than the batch ({n} samples); "
                f"use virtual_batch_size <= {n} or a larger batch (plain batch norm is batchnorm.BatchNorm*d)"
            )
        per_sample = count // n
        last = n % virtual_batch_size
        if virtual_batch_size * per_sample < 2:
            raise InputError(
                f"{what}: virtual batches of {virtual_batch_size} sample(s) have {virtual_batch_size * per_sample} "
                f"value per channel, which cannot be normalized; use a larger virtual_batch_size"
            )
        if last and last * per_sample < 2:
            raise InputError(
                f"{what}: the batch of {n} samples leaves a last virtual batch of {last} sample(s) "
                f"({last * per_sample} value(s) per channel), which cannot be normalized; choose a "
                f"virtual_batch_size that divides {n} or leaves at least 2 values per channel"
            )
        if running_mean is not None and momentum is None and num_batches_tracked is None:
            raise InputError(f"{what}: momentum=None (cumulative average) needs num_batches_tracked")
    running = None if running_mean is None else Running(running_mean, running_var, num_batches_tracked)
    return run(input, Virtual(virtual_batch_size), weight=weight, bias=bias, running=running, training=training,
               momentum=momentum, eps=eps, count=count, check_finite=check_finite, backend=backend,
               state=precision_state, what=what)  # fmt: skip
