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

from .pipeline import THIS_BATCH, Virtual, run
from .stats import PrecisionState

__all__ = ["ghost_batch_norm", "check_virtual_batch_size"]


def check_virtual_batch_size(virtual_batch_size) -> None:
    """``virtual_batch_size`` must be a positive int."""
    Virtual(virtual_batch_size)


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
    source = Virtual(virtual_batch_size) if training else THIS_BATCH
    if not training:
        check_virtual_batch_size(virtual_batch_size)
    return run(input, source, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
               check_finite=check_finite, backend=backend, state=precision_state, what="ghost_batch_norm")
