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

Each chunk runs through the same backend ``train_forward`` as plain batch norm (slices
along ``N`` are views, so no copy on the way in; one ``cat`` on the way out).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _core
from .batch_norm import _Aten, _backend_impl, batch_norm, resolve_backend

__all__ = ["ghost_batch_norm", "check_virtual_batch_size"]


def check_virtual_batch_size(virtual_batch_size) -> None:
    """``virtual_batch_size`` must be a positive int."""
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")


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
    count = _core.check_input(input, weight, bias, running_mean, running_var, training, what=what)
    _core.check_momentum(momentum)
    check_virtual_batch_size(virtual_batch_size)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                          check_finite=check_finite, backend=backend)  # fmt: skip
    n = input.shape[0]
    if virtual_batch_size > n:
        raise ValueError(
            f"{what}: virtual_batch_size={virtual_batch_size} is larger than the batch ({n} samples); "
            f"use virtual_batch_size <= {n} or a larger batch (plain batch norm is batchnorm.BatchNorm*d)"
        )
    per_sample = count // n
    last = n % virtual_batch_size
    if last and last * per_sample < 2:
        raise ValueError(
            f"{what}: the batch of {n} samples leaves a last virtual batch of {last} sample(s) "
            f"({last * per_sample} value(s) per channel), which cannot be normalized; choose a "
            f"virtual_batch_size that divides {n} or leaves at least 2 values per channel"
        )
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError(f"{what}: momentum=None (cumulative average) needs num_batches_tracked")
    impl = _backend_impl(resolve_backend(backend, input))

    counts = [chunk.numel() // chunk.shape[1] for chunk in input.split(virtual_batch_size, dim=0)]
    y, off_centre = None, None  # off_centre: whether a chunk has |mean| > SHIFT_LIMIT * std
    if impl is _Aten and _can_normalize_in_place(input, weight):
        y, means, rstds = _GhostNormalize.apply(input, weight, bias, virtual_batch_size, eps)
        off_centre = _core.is_off_center(means.reshape(-1), rstds.reshape(-1))
        if off_centre:
            y = None  # redo through the re-centring core below
    if y is None:
        ys, means, rstds = [], [], []
        for chunk in input.split(virtual_batch_size, dim=0):
            yc, mean, rstd = impl.train_forward(chunk, weight, bias, eps, None, None)
            ys.append(yc)
            means.append(mean)
            rstds.append(rstd)
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=0)
        means, rstds = torch.stack(means), torch.stack(rstds)
    if check_finite or running_mean is not None:
        if off_centre is None:
            off_centre = _core.is_off_center(means.reshape(-1), rstds.reshape(-1))
        if off_centre:
            # float32 chunk means near a large offset carry ulp(mean) errors that the merge's
            # between-chunk term would amplify: take the whole batch's re-centred moments
            mean, var = _core.batch_moments(input)
        else:
            k = torch.tensor(counts, device=input.device)
            m2s = _core.var_from_rstd(rstds, eps) * k.unsqueeze(1).to(rstds.dtype)
            _, mean, m2 = _core.merge_moments(k, means, m2s)
            var = m2 / count
        if check_finite:
            _core.check_finite_stats(mean, var, what=what)
        if running_mean is not None:
            _core.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
    return y


def _can_normalize_in_place(x: Tensor, weight: Optional[Tensor]) -> bool:
    """Eager float32/float64 with parameters of the input's dtype: :class:`_GhostNormalize` applies."""
    return (
        x.dtype in (torch.float32, torch.float64)
        and (weight is None or weight.dtype == x.dtype)
        and not torch.compiler.is_compiling()
        and _chunks_are_contiguous(x)
    )


def _chunks_are_contiguous(x: Tensor) -> bool:
    """Contiguous or channels_last ``x``: ``empty_like(x)`` then has ``N`` outermost, so its
    slices along ``N`` are contiguous blocks the ``out=`` kernels can write. Other layouts
    (e.g. a permuted view with ``N`` inner) would get a strided ``out=`` and wrong values."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


class _GhostNormalize(torch.autograd.Function):
    """Batch norm of each virtual batch (consecutive ``v`` samples) written into one output.

    Forward and backward call the native kernels once per virtual batch with ``out=``
    slices of a single buffer (the chunks are contiguous along ``N`` in both contiguous
    and channels_last layouts), so no ``torch.cat`` copies the output or the gradient.
    Returns ``(y, mean, rstd)`` with per-chunk statistics of shape ``(K, C)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, v, eps):
        k = -(-x.shape[0] // v)
        y = torch.empty_like(x)
        mean = x.new_empty((k, x.shape[1]))
        rstd = x.new_empty((k, x.shape[1]))
        for i, (xc, yc) in enumerate(zip(x.split(v), y.split(v))):
            torch.native_batch_norm(xc, weight, bias, None, None, True, 0.0, eps, out=(yc, mean[i], rstd[i]))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.v, ctx.eps, ctx.has_bias = v, eps, bias is not None
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        # all three outputs always: dx needs sum(dy) and sum(dy * xhat) anyway, and the
        # out= overload does not accept masked-off outputs
        dx, dws, dbs = torch.empty_like(x), mean.new_empty(mean.shape), mean.new_empty(mean.shape)
        for i, (dyc, xc, dxc) in enumerate(zip(dy.split(ctx.v), x.split(ctx.v), dx.split(ctx.v))):
            torch.ops.aten.native_batch_norm_backward.out(
                dyc, xc, weight, None, None, mean[i], rstd[i], True, ctx.eps, [True, True, True],
                out0=dxc, out1=dws[i], out2=dbs[i],
            )  # fmt: skip
        mask = [need[0], weight is not None and need[1], ctx.has_bias and need[2]]
        return dx if mask[0] else None, dws.sum(0) if mask[1] else None, dbs.sum(0) if mask[2] else None, None, None
