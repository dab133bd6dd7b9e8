r"""The normalization pipeline, written once: validate -> statistics -> check -> normalize -> update.

Every batch-statistics norm of this library (batch norm, ghost, renorm, instance norm,
SyncBatchNorm) is :func:`run` with a **statistics source**:

=====================  ===============================================================
source                 where the training statistics come from
=====================  ===============================================================
:class:`ThisBatch`     the batch itself (plain batch norm; fused with the normalization)
:class:`Virtual`       each virtual batch of ``v`` samples (ghost batch norm)
:class:`Renorm`        the batch, with the affine corrected by ``r`` and ``d`` (batch renorm)
:class:`PerInstance`   each (sample, channel) plane (instance norm, on the ``(1, N*C, *)`` view)
``AllRanks``           every process of a group (SyncBatchNorm, in :mod:`batchnorm.distributed`)
running statistics     eval mode (``training=False``): the buffers, for every source
=====================  ===============================================================

A source says how to get the :class:`~batchnorm.functional.stats.BatchStats` to normalize
with (``stats``), which statistics the running buffers track (``pooled``), whether the
affine changes (``affine``), whether the backward needs a reduction across processes
(``hook``) and whether the statistics can be computed *while* normalizing (``fusable``: one
native call, the fast path of plain batch norm).

State changes come last: a call that raises leaves ``running_mean``, ``running_var`` and
``num_batches_tracked`` bit-identical (``torch.nn`` increments the counter first).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import InputError, InputTypeError, NonFiniteError
from .backends import ACTIVATIONS, Aten, select
from .normalize import normalize
from .stats import (BatchStats, PrecisionState, centering, host_reads_ok, moments, param_view, redo_centred,
                    running_off_center, stat_dtype)  # fmt: skip

__all__ = [
    "run", "Running", "ThisBatch", "THIS_BATCH", "Virtual", "Renorm", "PerInstance", "check_input", "check_eps",
    "check_momentum", "check_activation", "update_running", "check_finite_stats",
]  # fmt: skip

_HALF = (torch.float16, torch.bfloat16)


# --- validation: shapes, dtypes, devices, numbers; never values, never state ----------------------


def _param_dtype_ok(param: torch.dtype, x: torch.dtype) -> bool:
    return param == x or (x in _HALF and param == torch.float32)


def check_input(x, weight, bias, running_mean, running_var, *, training: bool, residual=None,
                what: str = "batch_norm") -> int:  # fmt: skip
    """Validate a call before anything is computed; return the number of values per channel.

    Raises :class:`~batchnorm.errors.InputError` / :class:`~batchnorm.errors.InputTypeError`
    (also ``ValueError``/``TypeError`` and ``RuntimeError``) with a message that says what
    to do. Reads metadata only.
    """
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{what}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise InputTypeError(
            f"{what}: input has dtype {x.dtype}; batch norm needs a floating-point input "
            f"(float32, float64, float16 or bfloat16). Convert it first, e.g. x.float()."
        )
    if x.dim() < 2:
        raise InputError(
            f"{what}: expected an input of shape (N, C, *) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}. For a single sample use x.unsqueeze(0)."
        )
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise InputTypeError(f"{what}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != (c,):
            raise InputError(
                f"{what}: {name} has shape {tuple(t.shape)} but the input has {c} channels "
                f"(dimension 1 of shape {tuple(x.shape)}); expected shape ({c},). "
                f"Check num_features and that channels are on dimension 1."
            )
        if t.device != x.device:
            raise InputError(
                f"{what}: {name} is on {t.device} but the input is on {x.device}; "
                f"move the module or the input, e.g. module.to(x.device)."
            )
        if not _param_dtype_ok(t.dtype, x.dtype):
            raise InputTypeError(
                f"{what}: {name} has dtype {t.dtype} but the input has dtype {x.dtype}; "
                f"use the same dtype (float32 parameters are also accepted for float16/bfloat16 inputs)."
            )
    if (running_mean is None) != (running_var is None):
        raise InputError(f"{what}: pass both running_mean and running_var, or neither")
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.shape != x.shape:
            shape = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise InputError(f"{what}: residual must have the input's shape {tuple(x.shape)}, got {shape}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise InputTypeError(
                f"{what}: residual has dtype {residual.dtype} on {residual.device} but the input has dtype "
                f"{x.dtype} on {x.device}; convert it first, e.g. residual.to(x)."
            )
    count = x.numel() // c if c else 0
    if training and count == 1:
        raise InputError(
            f"{what}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)} ({count} value per channel). Use a larger batch, call "
            f"model.eval() to use the running statistics, or use a norm that does not need "
            f"batch statistics (batchnorm.GroupNorm / LayerNorm)."
        )
    return count


def check_eps(eps, what: str = "batch_norm") -> None:
    """``eps`` is a finite number >= 0 (``eps = 0`` is allowed, as in torch.nn)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise InputError(
            f"{what}: eps must be a finite number >= 0 (it is added to the variance), got {eps!r}; "
            f"the usual value is 1e-5"
        )


def check_momentum(momentum, what: str = "batch_norm") -> None:
    """``momentum`` is ``None`` (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise InputTypeError(f"{what}: momentum must be a number in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise InputError(
            f"{what}: momentum must be in [0, 1] (the weight of the new batch), got {momentum}. "
            f"Keras/TF 'decay' d corresponds to momentum 1 - d."
        )


def check_activation(activation, what: str = "batch_norm") -> None:
    """``activation`` is ``None`` or one of :data:`~batchnorm.functional.backends.ACTIVATIONS`."""
    if activation is not None and activation not in ACTIVATIONS:
        raise InputError(f"{what}: unknown activation {activation!r}; choose one of {ACTIVATIONS} or None")


# --- running statistics ------------------------------------------------------------------------


class Running(NamedTuple):
    """The buffers a training step updates: ``(C,)`` mean and variance, and the step counter (or None)."""

    mean: Tensor
    var: Tensor
    count: Optional[Tensor] = None


@torch.no_grad()
def update_running(running: Running, stats: BatchStats, momentum: Optional[float]) -> None:
    r"""Moving-average update in place, PyTorch's convention.

    ``num_batches_tracked += 1``; then :math:`\hat\mu \leftarrow \hat\mu + m(\mu - \hat\mu)` and
    :math:`\hat\sigma^2 \leftarrow \hat\sigma^2 + m(\sigma^2\,\tfrac{n}{n-1} - \hat\sigma^2)` with
    ``m = momentum``, or ``m = 1 / num_batches_tracked`` (the cumulative average) when
    ``momentum is None``. Computed in float32/float64 and written in the buffers' dtype.
    Tensor arithmetic only (the counter is never read on the host), so it traces under
    ``torch.compile`` and never synchronizes a GPU.
    """
    if running.count is not None:
        running.count.add_(1)
    work = stat_dtype(running.mean.dtype)
    weight = running.count.to(work).reciprocal() if momentum is None else float(momentum)
    for buf, new in ((running.mean, stats.total_mean()), (running.var, stats.unbiased_var())):
        new = new.to(work)
        if buf.dtype == work:
            buf.lerp_(new, weight)
        else:  # half-precision buffers: update in float32, store rounded
            buf.copy_(buf.to(work).lerp_(new, weight))


def check_finite_stats(stats: BatchStats, running: Optional[Running], what: str) -> None:
    """Raise :class:`~batchnorm.errors.NonFiniteError` unless the statistics, and the values the
    running buffers would receive (in their dtype), are finite. Any NaN/Inf in the input makes
    the statistics non-finite; a finite input whose variance overflows does too. Reads one
    flag on the host (``check_finite`` is opt-in: a synchronization on a GPU)."""
    values = [stats.total_mean(), stats.var]
    if stats.count > 1:
        values.append(stats.unbiased_var())
    if running is not None and running.var.dtype != values[0].dtype:
        values += [v.to(running.var.dtype) for v in values]
    if not bool(torch.stack([torch.isfinite(v).all() for v in values]).all()):
        raise NonFiniteError(
            f"{what}: the batch statistics are not finite (the input contains NaN or Inf, or its variance "
            f"overflows {values[-1].dtype}); running statistics were left unchanged."
        )


# --- statistics sources ---------------------------------------------------------------------------


class ThisBatch:
    """Statistics of the batch itself (plain batch norm)."""

    fusable = True  # the backend computes the statistics while normalizing
    in_kernel = True  # and may update the running buffers inside the same native call
    chunk: Optional[int] = None
    hook: Optional[Callable] = None

    def stats(self, x: Tensor, state: Optional[PrecisionState]) -> BatchStats:
        return moments(x, state)

    def pooled(self, stats: BatchStats) -> BatchStats:
        return stats.pooled()

    def affine(self, stats: BatchStats, weight, bias, running: Optional[Running], eps: float):
        return weight, bias


#: the stateless source of plain batch norm
THIS_BATCH = ThisBatch()


class Virtual(ThisBatch):
    """Each consecutive chunk of ``v`` samples has its own statistics (ghost batch norm); the
    running statistics track the pooled (exactly merged) statistics of the whole batch."""

    fusable = False
    in_kernel = False

    def __init__(self, v: int) -> None:
        self.chunk = v

    def stats(self, x: Tensor, state: Optional[PrecisionState]) -> BatchStats:
        return moments(x, state, chunk=self.chunk)


class Renorm(ThisBatch):
    r"""Batch statistics with the affine corrected towards the running statistics (batch renorm):
    ``gamma' = gamma * r``, ``beta' = gamma * d + beta`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``."""

    fusable = False
    in_kernel = False

    def __init__(self, r_max: float, d_max: float) -> None:
        self.r_max, self.d_max = float(r_max), float(d_max)

    def affine(self, stats: BatchStats, weight, bias, running: Optional[Running], eps: float):
        work = stats.mean.dtype
        with torch.no_grad():
            sigma = (running.var.to(work) + eps).sqrt()
            r = ((stats.var + eps).sqrt() / sigma).clamp(1.0 / self.r_max, self.r_max)
            d = ((stats.total_mean() - running.mean.to(work)) / sigma).clamp(-self.d_max, self.d_max)
        gamma = torch.ones_like(r) if weight is None else weight.to(work)
        return gamma * r, (gamma * d if bias is None else gamma * d + bias.to(work))


class PerInstance(ThisBatch):
    """Statistics per (sample, channel) plane, computed on the ``(1, N*C, *)`` view (instance norm);
    the running statistics track the average over the batch of the planes' mean and variance."""

    in_kernel = False

    def __init__(self, n: int, c: int) -> None:
        self.n, self.c = n, c

    def pooled(self, stats: BatchStats) -> BatchStats:
        n, c = self.n, self.c
        return BatchStats(stats.total_mean().view(n, c).mean(0), stats.var.view(n, c).mean(0), stats.count)


# --- the orchestration -------------------------------------------------------------------------------


def _var_from_rstd(rstd: Tensor, eps: float) -> Tensor:
    return rstd.pow(-2).sub_(eps).clamp_min_(0.0)


def _empty_output(x: Tensor, weight, bias) -> Tensor:
    """torch.nn's answer for an input without values: an empty output still connected to the
    graph (zero gradients), nothing computed, nothing updated."""
    y = x.clone()
    if weight is not None:
        y = y * weight[0].to(y.dtype)
    if bias is not None:
        y = y + bias[0].to(y.dtype)
    return y


def _traced(x, weight, bias, running, training, momentum, eps, residual, activation) -> Tensor:
    """Under ``torch.jit.trace`` (the TorchScript ONNX exporter): record torch.nn's own op."""
    rm, rv = (running.mean, running.var) if running is not None else (None, None)
    factor = 0.0 if momentum is None else float(momentum)
    if training and running is not None:
        if running.count is not None:
            running.count.add_(1)
            if momentum is None:
                factor = 1.0 / float(running.count)
    y = torch.batch_norm(x, weight, bias, rm, rv, training, factor, eps, torch.backends.cudnn.enabled)
    if residual is not None:
        y = y + residual
    from .backends import apply_activation

    return apply_activation(y, activation)


def run(
    x: Tensor,
    source: ThisBatch,
    *,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running: Optional[Running],
    training: bool,
    momentum: Optional[float],
    eps: float,
    count: int,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
    check_finite: bool = False,
    backend: str = "auto",
    state: Optional[PrecisionState] = None,
    what: str = "batch_norm",
) -> Tensor:
    """Normalize a validated call (see the module docstring); ``count`` is from :func:`check_input`."""
    if x.numel() == 0 and source.hook is None:  # (a rank of SyncBatchNorm still joins its collectives)
        return _empty_output(x, weight, bias)
    if torch.jit.is_tracing():
        return _traced(x, weight, bias, running, training, momentum, eps, residual, activation)
    be = select(backend, x, fused=residual is not None or activation not in (None, "identity"))
    if not training:  # the running statistics are the source
        if check_finite and not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"{what}: the input contains NaN or Inf")
        shift = None
        if x.dtype != torch.float64 and (torch.compiler.is_compiling()
                                         or running_off_center(running.mean, running.var, eps)):  # fmt: skip
            shift = running.mean.detach().to(x.dtype)
        return be.infer(x, running.mean, running.var, weight, bias, eps, residual, activation, shift)

    if source.fusable and (be.centres_itself or not _blocked(x)):
        y, stats, updated = _fused(x, source, be, weight, bias, eps, residual, activation, running, momentum,
                                   check_finite, state, count)  # fmt: skip
        pooled = source.pooled(stats)
    else:
        stats = source.stats(x, state)
        pooled = source.pooled(stats)
        if check_finite:
            check_finite_stats(pooled, running, what)
        w, b = source.affine(stats, weight, bias, running, eps)
        y = normalize(x, stats, w, b, eps, chunk=source.chunk, hook=source.hook)
        if residual is not None or activation not in (None, "identity"):
            from .backends import _epilogue

            y = _epilogue(y, residual, activation)
        updated = False
    if running is not None:
        if updated:
            if running.count is not None:
                running.count.add_(1)
        else:
            update_running(running, pooled, momentum)
    return y


def _blocked(x: Tensor) -> bool:
    from .stats import _blocks

    return _blocks(x) is not None


def _fused(x, source, be, weight, bias, eps, residual, activation, running, momentum, check_finite, state, count):
    """Statistics and output from one backend call; returns ``(y, stats, updated_in_kernel)``."""
    shift = None if be.centres_itself else centering(x, state)
    factor = 0.0
    in_kernel = (
        running is not None
        and be.updates_in_kernel
        and source.in_kernel
        and not check_finite
        and shift is None
        and running.mean.dtype == running.var.dtype == stat_dtype(x.dtype)
        and not torch.compiler.is_compiling()
    )
    if in_kernel:
        if momentum is not None:
            factor = float(momentum)
        elif running.count is not None and host_reads_ok(running.count):
            factor = 1.0 / (int(running.count) + 1)
        else:
            in_kernel = False  # the cumulative factor would need a host read of the counter
    xs = x if shift is None else x - param_view(shift, x.dim())
    buffers = (running.mean, running.var) if in_kernel else None
    y, mean, rstd = be.train(xs, weight, bias, eps, residual, activation, buffers, factor)
    if not be.centres_itself and redo_centred(x, mean, rstd, state, shift):
        shift = mean.to(x.dtype)
        y, mean_c, rstd_c = be.train(x - param_view(shift, x.dim()), weight, bias, eps, residual, activation)
        if in_kernel:  # the kernel updated with the imprecise statistics: add the difference
            with torch.no_grad():
                unbiased = count / (count - 1)
                running.mean.add_(mean_c + shift.to(mean_c.dtype) - mean, alpha=factor)
                running.var.add_((_var_from_rstd(rstd_c, eps) - _var_from_rstd(rstd, eps)) * unbiased, alpha=factor)
        mean, rstd = mean_c, rstd_c
    stats = BatchStats(mean, _var_from_rstd(rstd, eps), count, shift)
    if check_finite:
        check_finite_stats(source.pooled(stats), running, "batch_norm")
    return y, stats, in_kernel
