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
import numbers
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import InputError, InputTypeError, NonFiniteError
from .backends import ACTIVATIONS, epilogue, select
from .normalize import normalize
from .stats import (NOTHING, BatchStats, PrecisionState, centering, host_reads_ok, in_transform, moments, needs_blocks,
                    param_view, recentre, running_off_center, stat_dtype, var_from_rstd)  # fmt: skip

__all__ = [
    "run", "Running", "ThisBatch", "THIS_BATCH", "Virtual", "Renorm", "PerInstance", "check_input", "check_count",
    "check_eps",
    "check_momentum", "check_activation", "update_running", "check_finite_stats",
]  # fmt: skip

_HALF = (torch.float16, torch.bfloat16)


# --- validation: shapes, dtypes, devices, numbers; never values, never state ----------------------


def _param_dtype_ok(param: torch.dtype, x: torch.dtype) -> bool:
    return param == x or (x in _HALF and param == torch.float32)


def check_input(x, weight, bias, running_mean, running_var, *, training: bool, residual=None,
                what: str = "batch_norm", dims: Optional[tuple] = None, num_features: Optional[int] = None) -> int:
    """Validate a call before anything is computed; return the number of values per channel.

    ``dims`` (accepted input ranks) and ``num_features`` are a module's, for its messages.
    Raises :class:`~batchnorm.errors.InputError` / :class:`~batchnorm.errors.InputTypeError`
    (also ``ValueError``/``TypeError`` and ``RuntimeError``) with a message that says what
    to do. Reads metadata only.
    """
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{what}: expected a torch.Tensor input, got {type(x).__name__}")
    xshape, dt = x.shape, x.dtype
    nd = len(xshape)
    if nd < 2 or (dims and nd not in dims) or not dt.is_floating_point or (
            num_features is not None and xshape[1] != num_features):  # fmt: skip
        return _explain_input(x, what, dims, num_features)  # raises, or 0 for an empty 0-d/1-d input
    c = xshape[1]
    shape, dev = (c,), x.device
    half = dt in _HALF
    for t in (weight, bias, running_mean, running_var):  # fast path: one test per tensor, messages below
        if t is not None and not (isinstance(t, Tensor) and t.shape == shape and t.device == dev
                                  and (t.dtype == dt or (half and t.dtype == torch.float32))):  # fmt: skip
            _explain_params(x, weight, bias, running_mean, running_var, what)
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


def _explain_input(x: Tensor, what: str, dims: Optional[tuple], num_features: Optional[int]) -> int:
    """The input checks of :func:`check_input` one by one, in order, with their messages (its slow path)."""
    if dims and x.dim() not in dims:
        raise InputError(f"{what}: expected {' or '.join(f'{d}D' for d in dims)} input, got {x.dim()}D input of "
                         f"shape {tuple(x.shape)}")  # fmt: skip
    if num_features is not None and x.dim() >= 2 and x.shape[1] != num_features:
        raise InputError(
            f"{what}({num_features}): input has {x.shape[1]} channels (dimension 1 of shape {tuple(x.shape)}); "
            f"expected {num_features}. Check num_features, or permute channels-last data to (N, C, ...) first."
        )
    if not x.dtype.is_floating_point:
        raise InputTypeError(
            f"{what}: input has dtype {x.dtype}; batch norm needs a floating-point input "
            f"(float32, float64, float16 or bfloat16). Convert it first, e.g. x.float()."
        )
    if x.dim() < 2 and x.numel() == 0:
        return 0  # torch.nn returns an empty output for an input without values, whatever its rank
    if x.dim() < 2:
        raise InputError(
            f"{what}: expected an input of shape (N, C, *) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}. For a single sample use x.unsqueeze(0)."
        )
    raise AssertionError("unreachable: check_input's fast test and its explanation disagree")  # pragma: no cover


def _explain_params(x, weight, bias, running_mean, running_var, what: str) -> None:
    """Raise the error that says what is wrong with a parameter or buffer (the slow path of :func:`check_input`)."""
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


def _is_real(v) -> bool:
    """A real number: Python, NumPy (``np.float32(0.1)``) or a 0-d real tensor (as torch.nn); not a bool."""
    if isinstance(v, Tensor):
        return v.dim() == 0 and not (v.dtype == torch.bool or v.is_complex())
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_count(n, name: str, meaning: str = "") -> int:
    """A positive integer - Python, NumPy or a 0-d integer tensor, as torch.nn accepts; ``bool`` is
    not one - returned as an ``int`` (``meaning`` is added to the message, e.g. " (the channel count C)")."""
    if isinstance(n, Tensor) and n.dim() == 0 and not (n.is_floating_point() or n.is_complex()
                                                       or n.dtype == torch.bool):  # fmt: skip
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InputError(f"{name} must be a positive int{meaning}, got {n!r}")
    return int(n)


def check_eps(eps, what: str = "batch_norm") -> float:
    """``eps`` is a finite number >= 0 (``eps = 0`` is allowed: torch.nn's instance norm and eval
    accept it, its batch-norm training does not - docs/compat.md); returns it as a float."""
    if type(eps) is float and 0.0 <= eps < math.inf:  # the usual case, without the number-type tests
        return eps
    if not _is_real(eps):
        raise InputTypeError(
            f"{what}: eps must be a number (it is added to the variance), got {type(eps).__name__} {eps!r}; "
            f"the usual value is 1e-5"
        )
    if not math.isfinite(float(eps)) or float(eps) < 0:
        raise InputError(
            f"{what}: eps must be a finite number >= 0 (it is added to the variance), got {eps!r}; "
            f"the usual value is 1e-5"
        )
    return float(eps)


def check_momentum(momentum, what: str = "batch_norm"):
    """``momentum`` is ``None`` (cumulative average) or a number in [0, 1]: a Python or NumPy
    number, or a 0-d tensor as torch.nn accepts (read with ``float()`` at every step, which on a
    GPU waits for the device: prefer a Python float). Returns a NumPy number as a float and
    anything else unchanged (a tensor stays the same object, so a schedule that updates it in
    place takes effect, as in torch.nn)."""
    if momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0):  # the usual cases
        return momentum
    if not _is_real(momentum):
        raise InputTypeError(f"{what}: momentum must be a number in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise InputError(
            f"{what}: momentum must be in [0, 1] (the weight of the new batch), got {momentum}. "
            f"Keras/TF 'decay' d corresponds to momentum 1 - d."
        )
    return momentum if isinstance(momentum, (Tensor, float)) else float(momentum)


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


def _new_running(running: Running, stats: BatchStats, momentum: Optional[float]):
    """``(work dtype, weight, [(buffer, new batch value)])`` of the moving-average update (nothing written)."""
    work = stat_dtype(running.mean.dtype)
    if momentum is None:  # the counter is incremented before it weighs the batch: 1 / (steps + 1)
        weight = (running.count.to(work) + 1).reciprocal()
    else:
        weight = float(momentum)
    return work, weight, ((running.mean, stats.total_mean().to(work)), (running.var, stats.unbiased_var().to(work)))


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
    work, weight, pairs = _new_running(running, stats, momentum)
    if running.count is not None:
        running.count.add_(1)
    for buf, new in pairs:
        if buf.dtype == work:
            buf.lerp_(new, weight)
        else:  # half-precision buffers: update in float32, store rounded
            buf.copy_(buf.to(work).lerp_(new, weight))


def check_finite_stats(stats: BatchStats, running: Optional[Running], what: str,
                       momentum: Optional[float] = None) -> None:  # fmt: skip
    """Raise :class:`~batchnorm.errors.NonFiniteError` unless the statistics, and the running
    buffers after the update (in their dtype), are finite. Any NaN/Inf in the input makes the
    statistics non-finite; a finite input whose variance overflows does too, and so does an
    update that overflows float16 buffers. Reads one flag on the host (``check_finite`` is
    opt-in: a synchronization on a GPU)."""
    values = [stats.total_mean(), stats.var]
    if stats.count > 1:
        values.append(stats.unbiased_var())
    if running is not None and running.var.dtype != values[0].dtype and stats.count > 1:
        _, weight, pairs = _new_running(running, stats, momentum)
        values += [buf.to(new.dtype).lerp(new, weight).to(buf.dtype) for buf, new in pairs]
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

    def check(self, x: Tensor, count: int, what: str) -> None:
        """Source-specific validation of a training call (shapes only); raise to reject it."""

    def reject(self, x) -> None:
        """Called when the call is rejected, before the error propagates (SyncBatchNorm tells the other ranks)."""

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
        self.chunk = check_count(v, "virtual_batch_size")

    def check(self, x: Tensor, count: int, what: str) -> None:
        n, v = x.shape[0], self.chunk
        if n == 0:
            return
        if v > n:
            raise InputError(
                f"{what}: virtual_batch_size={v} is larger than the batch ({n} samples); "
                f"use virtual_batch_size <= {n} or a larger batch (plain batch norm is batchnorm.BatchNorm*d)"
            )
        per_sample, last = count // n, n % v
        if v * per_sample < 2:
            raise InputError(f"{what}: virtual batches of {v} sample(s) have {v * per_sample} value per channel, "
                             f"which cannot be normalized; use a larger virtual_batch_size")  # fmt: skip
        if last and last * per_sample < 2:
            raise InputError(
                f"{what}: the batch of {n} samples leaves a last virtual batch of {last} sample(s) "
                f"({last * per_sample} value(s) per channel), which cannot be normalized; choose a "
                f"virtual_batch_size that divides {n} or leaves at least 2 values per channel"
            )

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
    return epilogue(y, residual, activation)


def run(
    x: Tensor,
    source: ThisBatch,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
    check_finite: bool = False,
    backend: str = "auto",
    state: Optional[PrecisionState] = None,
    what: str = "batch_norm",
    dims: Optional[tuple] = None,
    num_features: Optional[int] = None,
    count: Optional[int] = None,
) -> Tensor:
    """One call of a batch-statistics norm: validate -> statistics -> check -> normalize -> update.

    ``source`` gives the training statistics (see the module docstring); ``training=False`` uses
    the running statistics. Validation comes first and reads metadata only; a rejected call
    raises before anything is computed (``source.reject`` lets SyncBatchNorm's other ranks
    know). ``count`` skips validation for a caller that validated already (instance norm,
    which runs on a reshaped view). Then one of three paths: inference with the running
    statistics; the *fused* path (the statistics computed by the backend while it normalizes:
    one native call for plain batch norm, with the running update inside the kernel when
    nothing needs checking first); and the *given* path (the source computes the statistics,
    the one normalize Function applies them).
    """
    if count is None:
        try:
            count = check_input(x, weight, bias, running_mean, running_var, training=training, residual=residual,
                                what=what, dims=dims, num_features=num_features)  # fmt: skip
            eps = check_eps(eps, what)
            momentum = check_momentum(momentum, what)
            if activation is not None:
                check_activation(activation, what)
            if running_mean is None:
                if not training:
                    raise InputError(f"{what}: inference (training=False) needs running_mean and running_var")
            elif training and momentum is None and num_batches_tracked is None:
                raise InputError(f"{what}: momentum=None (cumulative average) needs num_batches_tracked")
            if training:
                source.check(x, count, what)
        except (InputError, InputTypeError):
            source.reject(x)
            raise
    running = None if running_mean is None else Running(running_mean, running_var, num_batches_tracked)
    if x.numel() == 0 and source.hook is None:  # (a rank of SyncBatchNorm still joins its collectives)
        return _empty_output(x, weight, bias)
    # torch.nn's own op, which is what plain batch norm and every variant's eval mode compute: recorded
    # by torch.jit.trace (the TorchScript ONNX exporter), and run inside torch.func transforms (nothing
    # can be read on the host there, and torch.nn's running update is the one functorch handles)
    plain = not training or type(source) is ThisBatch
    tracing = torch.jit.is_tracing()
    if tracing and not plain:  # a variant's training statistics are not torch's op
        raise InputError(f"{what}: torch.jit.trace cannot record this layer's training-mode statistics "
                         f"({type(source).__name__}); trace the model in eval mode (model.eval()), or use "
                         f"torch.export / the dynamo ONNX exporter")  # fmt: skip
    if tracing or (plain and in_transform()):
        return _traced(x, weight, bias, running, training, momentum, eps, residual, activation)
    be = select(backend, x, fused=residual is not None or (activation is not None and activation != "identity"))
    if not training:
        return _infer(x, be, weight, bias, running, eps, residual, activation, check_finite, what)
    if source.fusable and (be.centres_itself or not needs_blocks(x, count)):
        return _train_fused(x, source, be, weight, bias, running, momentum, eps, count, residual, activation,
                            check_finite, state, what)  # fmt: skip
    stats = source.stats(x, state)
    pooled = source.pooled(stats)
    if check_finite:
        check_finite_stats(pooled, running, what, momentum)
    w, b = source.affine(stats, weight, bias, running, eps)
    y = normalize(x, stats, w, b, eps, chunk=source.chunk, hook=source.hook)
    if residual is not None or activation is not None:
        y = epilogue(y, residual, activation)
    if running is not None:
        update_running(running, pooled, momentum)
    return y


def _infer(x, be, weight, bias, running, eps, residual, activation, check_finite, what) -> Tensor:
    """Eval mode: the running statistics are the source (shifted first where the CPU kernel would cancel)."""
    if check_finite and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what}: the input contains NaN or Inf")
    shift = None
    if x.dtype != torch.float64 and (torch.compiler.is_compiling() or running_off_center(running.mean, running.var, eps)):
        shift = running.mean.detach().to(x.dtype)
    return be.infer(x, running.mean, running.var, weight, bias, eps, residual, activation, shift)


def _train_fused(x, source, be, weight, bias, running, momentum, eps, count, residual, activation, check_finite, state,
                 what) -> Tensor:  # fmt: skip
    """Statistics and output from one backend call, then the running update (inside the kernel if possible)."""
    shift, then = (None, NOTHING) if be.centres_itself else centering(x, state)
    factor = 0.0
    in_kernel = (running is not None and source.in_kernel and be.updates_in_kernel and not check_finite
                 and shift is None and running.mean.dtype == running.var.dtype == stat_dtype(x.dtype)
                 and not torch.compiler.is_compiling())  # fmt: skip
    if in_kernel:
        if momentum is not None:
            factor = float(momentum)
        elif running.count is not None and host_reads_ok(running.count):
            factor = 1.0 / (int(running.count) + 1)
        else:
            in_kernel = False  # the cumulative factor would need a host read of the counter
    xs = x if shift is None else x - param_view(shift, x.dim())
    y, mean, rstd = be.train(xs, weight, bias, eps, residual, activation,
                             (running.mean, running.var) if in_kernel else None, factor)  # fmt: skip
    if then and recentre(then, mean, rstd, state, shift):
        shift = mean.to(x.dtype)
        y, mean_c, rstd_c = be.train(x - param_view(shift, x.dim()), weight, bias, eps, residual, activation)
        if in_kernel:  # the kernel updated with the imprecise statistics: add the difference
            with torch.no_grad():
                unbiased = count / (count - 1)
                running.mean.add_(mean_c + shift.to(mean_c.dtype) - mean, alpha=factor)
                running.var.add_((var_from_rstd(rstd_c, eps) - var_from_rstd(rstd, eps)) * unbiased, alpha=factor)
        mean, rstd = mean_c, rstd_c
    if in_kernel:
        if running.count is not None:
            running.count.add_(1)
        return y
    if (running is not None and not check_finite and source.in_kernel
            and be.update_running(running, mean if shift is None else mean + shift.to(mean.dtype), rstd, eps, count,
                                  momentum)):  # fmt: skip
        return y
    if check_finite or running is not None:
        pooled = source.pooled(BatchStats(mean, var_from_rstd(rstd, eps), count, shift))
        if check_finite:
            check_finite_stats(pooled, running, what, momentum)
        if running is not None:
            update_running(running, pooled, momentum)
    return y
