"""The statistics core every batch-norm variant in this library is built on.

Three pieces, each written once:

* :func:`check_input` - validation that runs *before* anything is computed or
  mutated, so a rejected call leaves running statistics exactly as they were;
* :func:`batch_moments_and_normalize` - training-mode statistics and the
  normalized output from PyTorch's native kernel, re-centred when float32
  statistics would lose precision (see below);
* :func:`update_running_stats` - the moving-average update of ``running_mean``,
  ``running_var`` and ``num_batches_tracked``, done last and only after every
  check passed.

Precision at large offsets
--------------------------
A float32 kernel stores the batch mean ``mu`` rounded to float32, so every
normalized value carries an error of about ``ulp(mu) / sigma``: at
``mu = 1e6, sigma = 1`` that is 3% (PyTorch's own ``BatchNorm2d``). We measure
``|mu| * rstd`` per channel after the native call (``C`` numbers, no extra pass
over the data). When it exceeds :data:`SHIFT_LIMIT` the statistics are recomputed on
``x - s`` with ``s = round(mu)`` per channel: the subtraction is exact for values
near ``s`` (Sterbenz), and the recomputed mean is the small residual, stored with
full relative precision. The output is invariant to the shift, so gradients are
unchanged. Ordinary activations never pay for this; under ``torch.compile`` the
shift (by one sample of each channel) is always applied because the compiler
fuses it into the reduction for free and a data-dependent branch would break the
graph.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

#: ``|mean| * rstd`` above which float32 statistics are recomputed about a shift. The
#: forward's error grows as ``SHIFT_LIMIT * 2**-24``, but the native backward's (its
#: dgamma/dx reductions) grows faster: ~2e-5 relative at a ratio of 37 (measured, CPU,
#: channels_last). 8 keeps both near float32 rounding; activations rarely get there
#: (post-ReLU channels sit near 1.4), and those that do pay one extra pass.
SHIFT_LIMIT = 8.0

_HALF = (torch.float16, torch.bfloat16)


def param_view(t: Tensor, ndim: int) -> Tensor:
    """View a per-channel vector ``(C,)`` so it broadcasts against ``(N, C, *spatial)``."""
    return t.view((1, -1) + (1,) * (ndim - 2))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float32 for float16/bfloat16/float32 inputs and float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_dtype_ok(param: torch.dtype, x: torch.dtype) -> bool:
    return param == x or (x in _HALF and param == torch.float32)


def check_input(
    x,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    *,
    what: str = "batch_norm",
) -> int:
    """Validate a batch-norm call; return the number of values per channel.

    Raises ``TypeError``/``ValueError`` with a message that says what to do. Pure:
    reads shapes, dtypes and devices only.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{what}: input has dtype {x.dtype}; batch norm needs a floating-point input "
            f"(float32, float64, float16 or bfloat16). Convert it first, e.g. x.float()."
        )
    if x.dim() < 2:
        raise ValueError(
            f"{what}: expected an input of shape (N, C, *) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}. For a single sample use x.unsqueeze(0)."
        )
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != (c,):
            raise ValueError(
                f"{what}: {name} has shape {tuple(t.shape)} but the input has {c} channels "
                f"(dimension 1 of shape {tuple(x.shape)}); expected shape ({c},). "
                f"Check num_features and that channels are on dimension 1."
            )
        if t.device != x.device:
            raise ValueError(
                f"{what}: {name} is on {t.device} but the input is on {x.device}; "
                f"move the module or the input, e.g. module.to(x.device)."
            )
        if not _param_dtype_ok(t.dtype, x.dtype):
            raise TypeError(
                f"{what}: {name} has dtype {t.dtype} but the input has dtype {x.dtype}; "
                f"use the same dtype (float32 parameters are also accepted for float16/bfloat16 inputs)."
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{what}: pass both running_mean and running_var, or neither")
    count = x.numel() // c if c else 0
    if training and count < 2:
        raise ValueError(
            f"{what}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)} ({count} value(s) per channel). Use a larger batch, call "
            f"model.eval() to use the running statistics, or use a norm that does not need "
            f"batch statistics (batchnorm.GroupNorm / LayerNorm)."
        )
    return count


def check_momentum(momentum) -> None:
    """``momentum`` is ``None`` (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (the weight of the new batch), got {momentum}. "
            f"Keras/TF 'decay' d corresponds to momentum 1 - d."
        )


def _first_of_each_channel(x: Tensor) -> Tensor:
    """``x[0, :, 0, ..., 0]``: a cheap per-channel value close to the channel's data."""
    return x[(0, slice(None)) + (0,) * (x.dim() - 2)]


def _upcast(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """Half-precision parameters are used in float32 so statistics stay float32."""
    if t is not None and t.dtype in _HALF:
        return t.float()
    return t


def _affine_args(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    weight, bias = _upcast(weight, x), _upcast(bias, x)
    if x.dtype in _HALF and weight is None:
        # The native kernel keeps its statistics in the parameter dtype; without a
        # float32 weight it would keep them in half precision.
        weight = torch.ones(x.shape[1], device=x.device, dtype=torch.float32)
    return weight, bias


def is_off_center(mean: Tensor, rstd: Optional[Tensor] = None, var: Optional[Tensor] = None, eps: float = 0.0) -> bool:
    """Whether ``max_c |mean_c| * rstd_c > SHIFT_LIMIT`` (``rstd`` given, or ``1/sqrt(var + eps)``).

    ``C`` numbers; on the CPU they are read through zero-copy NumPy views because
    a handful of tiny torch ops would cost more than the check is worth.
    """
    mean = mean.detach()
    if mean.device.type == "cpu" and mean.dtype in (torch.float32, torch.float64):
        m = mean.numpy()
        r = rstd.detach().numpy() if rstd is not None else 1.0 / np.sqrt(var.detach().numpy() + eps)
        return bool(m.size) and float(np.max(np.abs(m) * r)) > SHIFT_LIMIT
    r = rstd.detach() if rstd is not None else torch.rsqrt(var.detach() + eps)
    return mean.numel() > 0 and bool((mean.abs() * r).amax() > SHIFT_LIMIT)


def _running_stats_off_center(running_mean: Tensor, running_var: Tensor, eps: float) -> bool:
    """:func:`is_off_center` of the running statistics, remembered until a buffer is written.

    Inference calls the check with the same buffers again and again; its ~C-sized
    work is measurable next to a memory-bound kernel, so the answer is cached under
    the buffers' version counters (bumped by every in-place write) and data pointers,
    stored on the ``running_mean`` tensor itself.
    """
    if running_mean.is_inference() or running_var.is_inference():
        # inference tensors have no version counter (reading it raises), so nothing can be cached
        return is_off_center(running_mean, var=running_var, eps=eps)
    key = (running_mean._version, running_var._version, running_mean.data_ptr(), running_var.data_ptr(), eps)
    hit = getattr(running_mean, "_batchnorm_off_center", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = is_off_center(running_mean, var=running_var, eps=eps)
    running_mean._batchnorm_off_center = (key, result)
    return result


def _recentred(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, shift: Tensor):
    """Native training-mode batch norm of ``x - shift`` (per channel); the mean is returned un-shifted."""
    shift = shift.detach().to(x.dtype)
    y, mean, rstd = torch.native_batch_norm(x - param_view(shift, x.dim()), weight, bias, None, None, True, 0.0, eps)
    return y, mean.detach() + shift.to(mean.dtype), rstd.detach()


def batch_moments_and_normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """Training-mode batch norm through the native kernel.

    Returns ``(y, mean, rstd)``: ``y = weight * (x - mean) * rstd + bias`` with
    ``mean``/``rstd`` of shape ``(C,)`` in :func:`stat_dtype`; differentiable in
    ``x``, ``weight`` and ``bias``. ``mean`` and ``rstd`` are for the running
    statistics and carry no gradient.
    """
    weight, bias = _affine_args(x, weight, bias)
    precise = x.dtype != torch.float64
    if precise and torch.compiler.is_compiling():
        return _recentred(x, weight, bias, eps, _first_of_each_channel(x))
    y, mean, rstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    if precise and is_off_center(mean, rstd):
        return _recentred(x, weight, bias, eps, mean)
    return y, mean.detach(), rstd.detach()


def can_update_in_kernel(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> bool:
    """Whether :func:`train_and_update_in_kernel` applies: eager mode, running buffers in the statistics dtype."""
    return (
        running_mean is not None
        and running_mean.dtype == stat_dtype(x.dtype)
        and running_var.dtype == running_mean.dtype
        and not torch.compiler.is_compiling()
    )


def train_and_update_in_kernel(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    count: int,
) -> Tensor:
    """Training step whose running-statistics update happens inside the native kernel.

    The fast path for eager mode: the same single native call ``torch.nn`` makes, so
    small tensors pay no extra per-channel ops. The buffers are snapshotted first
    (``2 C`` numbers); when the batch turns out to be off-centre (see the module
    docstring) they are restored, the statistics are recomputed about a shift and
    the update is redone by :func:`update_running_stats`. Exceptions raised by the
    native call happen before it writes anything.
    """
    if momentum is None:  # cumulative average; eager only, so reading the counter is fine
        factor = 1.0 / (int(num_batches_tracked) + 1)
    else:
        factor = float(momentum)
    saved = (running_mean.clone(), running_var.clone())
    w, b = _affine_args(x, weight, bias)
    y, mean, rstd = torch.native_batch_norm(x, w, b, running_mean, running_var, True, factor, eps)
    if x.dtype != torch.float64 and is_off_center(mean, rstd):
        running_mean.copy_(saved[0])
        running_var.copy_(saved[1])
        y, mean, rstd = _recentred(x, w, b, eps, mean)
        update_running_stats(running_mean, running_var, num_batches_tracked, mean, var_from_rstd(rstd, eps), count, momentum)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y


def normalize_with_running_stats(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tensor:
    """Inference-mode batch norm ``weight * (x - running_mean) / sqrt(running_var + eps) + bias``.

    The native kernel folds this into ``x * scale + shift``, which cancels
    catastrophically when ``|running_mean| >> sqrt(running_var)``; such channels are
    first shifted by ``running_mean`` rounded to the input dtype (exact
    subtraction), the remainder of the mean staying in float32.
    """
    weight, bias = _affine_args(x, weight, bias)
    rm, rv = _upcast(running_mean, x), _upcast(running_var, x)
    precise = x.dtype != torch.float64
    if precise and (torch.compiler.is_compiling() or _running_stats_off_center(rm, rv, eps)):
        shift = rm.detach().to(x.dtype)
        x = x - param_view(shift, x.dim())
        rm = rm - shift.to(rm.dtype)
    return torch.native_batch_norm(x, weight, bias, rm, rv, False, 0.0, eps)[0]


def check_finite_stats(mean: Tensor, rstd: Tensor, *, what: str = "batch_norm") -> None:
    """Raise if the batch statistics are NaN/Inf (any NaN/Inf in the input makes them so)."""
    if not bool(torch.isfinite(mean).all() & torch.isfinite(rstd).all()):
        raise FloatingPointError(
            f"{what}: the batch statistics are not finite (the input contains NaN or Inf, or "
            f"its variance overflows); running statistics were left unchanged."
        )


def check_finite_input(x: Tensor, *, what: str = "batch_norm") -> None:
    """Raise if ``x`` has a NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{what}: the input contains NaN or Inf")


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var_biased: Tensor,
    count: int,
    momentum: Optional[float],
) -> None:
    """Moving-average update in place (PyTorch's convention).

    ``running <- running + m * (batch - running)`` with ``m = momentum``, or
    ``m = 1 / num_batches_tracked`` (after incrementing it) when ``momentum is None``
    - the cumulative average. ``running_var`` receives the unbiased batch variance
    ``var_biased * count / (count - 1)``. Computed in float32/float64 and written
    back in the buffers' dtype. Uses tensor arithmetic only, so it traces under
    ``torch.compile`` (no ``.item()``).
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    work = stat_dtype(running_mean.dtype)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        weight = num_batches_tracked.to(work).reciprocal()
    else:
        weight = float(momentum)
    var_unbiased = var_biased.to(work) * (count / (count - 1))
    for buf, new in ((running_mean, mean.to(work)), (running_var, var_unbiased)):
        if buf.dtype == work:
            buf.lerp_(new, weight)
        else:  # half-precision buffers: update in float32, store rounded
            buf.copy_(buf.to(work).lerp_(new, weight))


def var_from_rstd(rstd: Tensor, eps: float) -> Tensor:
    """Biased variance recovered from ``rstd = 1 / sqrt(var + eps)``, clamped at 0."""
    return rstd.pow(-2).sub_(eps).clamp_min_(0.0)


# --- appended for the normalization family (issue 4): statistics without normalizing ---------


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``(N, C, *)`` input, without normalizing.

    ``mean_c = (1/m) sum x``, ``var_c = (1/m) sum (x - mean_c)^2`` over ``(N, *spatial)``,
    returned as ``(C,)`` tensors in :func:`stat_dtype` (float32 also for float16/bfloat16
    input), detached. One read of ``x`` through the native statistics kernel; channels
    whose ``|mean| / std`` exceeds :data:`SHIFT_LIMIT` are recomputed about
    ``s = mean`` rounded to the input dtype (exact subtraction), as in
    :func:`batch_moments_and_normalize`. An empty input (``m = 0``) gives zeros.

    Used where the statistics are needed before (batch renorm's ``r``, ``d``) or apart
    from (sync batch norm's per-rank moments) the normalization.

    Example::

        >>> mean, var = batch_moments(torch.randn(8, 3, 4, 4))   # shapes (3,), (3,)
    """
    work = stat_dtype(x.dtype)
    x = x.detach()
    if x.numel() == 0:
        z = torch.zeros(x.shape[1], device=x.device, dtype=work)
        return z, z.clone()
    xs = x.to(work) if x.dtype in _HALF else x
    mean, var = torch.batch_norm_update_stats(xs, None, None, 0.0)
    if work != torch.float64 and is_off_center(mean, var=var, eps=1e-30):
        shift = mean.to(x.dtype)
        mean, var = torch.batch_norm_update_stats(xs - param_view(shift.to(xs.dtype), x.dim()), None, None, 0.0)
        mean = mean + shift.to(work)
    return mean, var


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of per-part ``(count, mean, M2)`` into the whole's (Chan et al. 1979).

    ``counts``: ``(K,)``; ``means``, ``m2s``: ``(K, C)`` with ``M2 = sum (x - mean)^2``.
    Returns ``(n, mean, M2)`` with ``n = sum n_k``, ``mean = sum n_k mean_k / n`` and
    ``M2 = sum M2_k + sum n_k (mean_k - mean)^2`` - the pairwise formula of Chan et al.
    applied to all parts at once (deviations are taken from the merged mean, so there is
    no ``E[x^2] - E[x]^2`` cancellation). Parts with ``n_k = 0`` contribute nothing.
    ``n`` is a 0-d tensor; with ``n = 0`` the mean and M2 are zeros.
    :func:`batchnorm.reference.chan_merge` is the float64 oracle.

    Example::

        >>> n, mean, m2 = merge_moments(torch.tensor([3., 5.]), torch.zeros(2, 4), torch.ones(2, 4))
    """
    counts = counts.to(means.dtype)
    n = counts.sum()
    w = counts / n.clamp_min(1)
    mean = (w.unsqueeze(1) * means).sum(0)
    m2 = (m2s * (counts > 0).unsqueeze(1)).sum(0) + (counts.unsqueeze(1) * (means - mean).square()).sum(0)
    return n, mean, m2


# --- normalization with statistics computed beforehand (batch renorm's fast path) --------------


class _NormalizeWithBatchStats(torch.autograd.Function):
    """``y = weight * (x - mean) * rstd + bias`` where ``mean``/``var`` are ``x``'s own batch
    statistics, computed beforehand: forward through the native *inference* kernel (one
    read, one write), backward through the native *training* backward, so gradients flow
    through the statistics exactly as in training-mode batch norm."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):
        y = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.eps, ctx.has_bias = eps, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[1], ctx.has_bias and need[2]]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(dy, x, weight, None, None, mean, rstd, True, ctx.eps, mask)
        return dx, dw if mask[1] else None, db if mask[2] else None, None, None, None


def can_normalize_with_batch_stats(x: Tensor, weight: Optional[Tensor], mean: Tensor, var: Tensor, eps: float) -> bool:
    """Whether :func:`normalize_with_batch_stats` is exact here: eager mode, float32/float64
    input with parameters of its dtype, and no off-centre channel (whose inference form
    ``x * scale + shift`` would cancel)."""
    return (
        x.dtype in (torch.float32, torch.float64)
        and (weight is None or weight.dtype == x.dtype)
        and mean.dtype == x.dtype
        and not torch.compiler.is_compiling()
        and not is_off_center(mean, var=var, eps=eps)
    )


def normalize_with_batch_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                               eps: float) -> Tensor:  # fmt: skip
    """Training-mode batch norm of ``x`` given its batch ``mean``/biased ``var`` (shape ``(C,)``).

    Same result and gradients as :func:`batch_moments_and_normalize` (check
    :func:`can_normalize_with_batch_stats` first) without recomputing the statistics:
    for layers that need them before normalizing, like batch renorm.
    """
    return _NormalizeWithBatchStats.apply(x, weight, bias, mean.detach(), var.detach(), eps)
