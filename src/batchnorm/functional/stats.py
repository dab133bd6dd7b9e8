r"""Batch statistics: the one place where a mean and a variance are computed.

Everything that normalizes in this library gets its statistics from here:

* :class:`BatchStats` - the value passed between the steps of the pipeline: per-channel
  ``mean`` and biased ``var`` of ``x - shift`` over ``count`` values, and the ``shift``
  (``None`` when the data was not re-centred);
* :func:`moments` - statistics of an ``(N, C, *)`` tensor under **the one precision rule**
  (below);
* :func:`merge` - the exact merge of parts (Chan et al., 1979), for virtual batches,
  ranks and blocks;
* :func:`centering` / :func:`recentre` / :class:`PrecisionState` - the off-centre
  decision, taken without reading device memory on the host.

The precision rule
------------------
1. **dtype**: statistics are float32 for float16/bfloat16/float32 input and float64 for
   float64 input (:func:`stat_dtype`); float64 needs nothing else.
2. **blocks**: PyTorch's CPU kernel accumulates channels-inner layouts ((N, C),
   channels_last, and strided views) in float32 vectors, so its error grows with the
   number of values per channel (measured: 2.7e-5 relative at 2^18 values for an (N, 64)
   input, mean 2.47 instead of 3 at 2^26). Such inputs are reduced in blocks of at most
   :data:`BLOCK_VALUES` values per channel and the blocks merged in float64
   (:func:`merge`); contiguous (N, C, *spatial) inputs are accumulated in float64 by the
   kernel itself and need no blocks. Other devices split along ``N`` into chunks of at
   most :data:`DEVICE_BLOCK_VALUES` values per channel.
3. **shift**: a float32 mean is rounded to ``ulp(mean)``, an error of ``ulp(mean) / std``
   in every normalized value (3% at mean 1e6, std 1). When ``max_c |mean_c| * rstd_c``
   exceeds :data:`SHIFT_LIMIT` the statistics are recomputed on ``x - s`` with ``s`` the
   mean rounded to the input dtype: the subtraction is exact for values near ``s``
   (Sterbenz), and the remaining mean is small and kept to full relative precision.
   The output is invariant to ``s``, so gradients need no change.

Who decides, and when (the device policy)
-----------------------------------------
The shift decision reads ``C`` numbers. On the CPU that read is free and happens at once
(:func:`off_center`). On a GPU it would stall the host on every layer, so it never
happens there: a layer's :class:`PrecisionState` receives this step's flag through an
asynchronous copy and the *next* step shifts (by the first sample of each channel, a
pivot that needs no statistics) when the flag was set. Under ``torch.compile`` the pivot
shift is always applied: the compiler fuses it into the reduction.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BatchStats", "moments", "merge", "stat_dtype", "param_view", "off_center", "PrecisionState",
    "centering", "recentre", "NOTHING", "CHECK", "PUBLISH", "running_off_center", "device_policy", "host_read",
    "in_transform", "SHIFT_LIMIT",
    "BLOCK_VALUES", "DEVICE_BLOCK_VALUES", "exact_norm", "var_from_rstd",
]  # fmt: skip

#: ``|mean| * rstd`` above which float32 statistics are recomputed about a shift. The
#: forward's error grows as ``SHIFT_LIMIT * 2**-24``; the native backward's (its
#: dgamma/dx reductions) grows faster: ~2e-5 relative at a ratio of 37 (measured, CPU,
#: channels_last). 8 keeps both near float32 rounding; activations rarely get there
#: (post-ReLU channels sit near 1.4), and those that do pay one extra pass.
SHIFT_LIMIT = 8.0

#: values per channel per native call for layouts the CPU kernel accumulates in float32
#: (measured relative error of the variance at 4096 values: ~1e-6)
BLOCK_VALUES = 4096

#: values per channel per native call on other devices (chunks along N; not yet measured)
DEVICE_BLOCK_VALUES = 1 << 20

_HALF = (torch.float16, torch.bfloat16)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 input, float32 for float32/float16/bfloat16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def param_view(t: Tensor, ndim: int) -> Tensor:
    """View a per-channel vector ``(C,)`` so it broadcasts against ``(N, C, *spatial)``."""
    return t.view((1, -1) + (1,) * (ndim - 2))


class BatchStats(NamedTuple):
    r"""Per-channel statistics of a batch, as the pipeline passes them between its steps.

    ``mean`` and ``var`` (biased: :math:`\frac1n\sum (x-\mu)^2`) are of ``x - shift`` over
    ``count`` values per channel, in :func:`stat_dtype`, shape ``(C,)``. For a batch in
    ``K`` parts (virtual batches) they have shape ``(K, C)``, ``parts`` holds each part's
    count and ``count`` their sum. ``shift`` is ``None`` or a tensor of ``mean``'s shape in
    the input dtype; the batch mean is ``shift + mean``.

    Example::

        >>> s = moments(torch.randn(8, 3, 4, 4) + 1e6)
        >>> s.total_mean(), s.var                      # exact, though the data sit at 1e6
    """

    mean: Tensor
    var: Tensor
    count: int
    shift: Optional[Tensor] = None
    parts: Optional[tuple] = None

    def total_mean(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``shift + mean``, computed and returned in ``dtype`` (default: the statistics dtype)."""
        mean = self.mean if dtype is None else self.mean.to(dtype)
        return mean if self.shift is None else mean + self.shift.to(mean.dtype)

    def rstd(self, eps: float) -> Tensor:
        """``1 / sqrt(var + eps)``."""
        return torch.rsqrt(self.var + eps)

    def unbiased_var(self) -> Tensor:
        """``var * n / (n - 1)``, the estimate the running variance tracks (needs ``count >= 2``)."""
        return self.var * (self.count / (self.count - 1))

    def pooled(self) -> "BatchStats":
        """The whole batch's statistics from its parts (exact merge); itself when not in parts."""
        if self.parts is None:
            return self
        m = merge(list(self.parts), self.total_mean(torch.float64), self.var.double())
        return BatchStats(m.mean.to(self.mean.dtype), m.var.to(self.var.dtype), self.count)


# --- host reads: allowed on the CPU, deferred elsewhere ----------------------------------------

_policy = threading.local()
#: how many device_policy() blocks are open in any thread: while 0 (always, outside tests), the
#: thread-local flag is not read (reading a threading.local costs ~0.3 us per call)
_policy_open = 0


#: the innermost active torch.func transform (vmap/grad/jacrev/...), or None outside them: inside one,
#: tensors are wrappers with no storage to read on the host
_transform_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", lambda: None)


def in_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) is running in eager mode (the compiler's
    own functionalization also uses that stack; compiled code has its own path)."""
    return not torch.compiler.is_compiling() and _transform_stack() is not None  # (dynamo <= 2.6 cannot trace it)


def host_reads_ok(t: Tensor) -> bool:
    """Whether a decision may read ``t``'s values on the host now: CPU tensors, outside
    :func:`device_policy`, not inside a torch.func transform. (A GPU tensor read would
    synchronize the host with the device; a torch.func wrapper has no storage to read.)"""
    return t.is_cpu and not (_policy_open and getattr(_policy, "device", False)) and not in_transform()


@contextlib.contextmanager
def device_policy() -> Iterator[None]:
    """Treat CPU tensors as device tensors: no host reads of their values, decisions deferred.

    For tests: the CUDA code path runs on the CPU, and a guard on tensor reads proves that
    only :meth:`PrecisionState.decide` (the one allowed reader) touches values on the host.
    """
    global _policy_open
    before = getattr(_policy, "device", False)
    _policy.device = True
    _policy_open += 1
    try:
        yield
    finally:
        _policy_open -= 1
        _policy.device = before


@contextlib.contextmanager
def host_read() -> Iterator[None]:
    """Marks the one place allowed to read tensor values on the host under :func:`device_policy`
    (tests install a guard that fails any other read)."""
    before = getattr(_policy, "reading", False)
    _policy.reading = True
    try:
        yield
    finally:
        _policy.reading = before


def host_read_allowed() -> bool:
    """Whether the current code is inside :func:`host_read` (used by test guards)."""
    return getattr(_policy, "reading", False)


def off_center(mean: Tensor, rstd: Tensor) -> bool:
    """``max |mean| * rstd > SHIFT_LIMIT`` over all channels, read on the host.

    Only for tensors where :func:`host_reads_ok`; ``C`` numbers read through zero-copy
    NumPy views (cheaper than a handful of tiny torch ops on the CPU).
    """
    if mean.requires_grad or rstd.requires_grad:
        mean, rstd = mean.detach(), rstd.detach()
    if mean.dtype in (torch.float32, torch.float64) and rstd.dtype == mean.dtype:
        p = mean.numpy() * rstd.numpy()
        return bool(p.size) and float(np.abs(p, out=p).max()) > SHIFT_LIMIT
    return mean.numel() > 0 and bool((mean.float().abs() * rstd.float()).amax() > SHIFT_LIMIT)


def _off_center_flag(mean: Tensor, rstd: Tensor) -> Tensor:
    """The same test as :func:`off_center`, as a 0-d bool tensor on the device (no host read)."""
    return torch.linalg.vector_norm(mean.detach() * rstd.detach(), float("inf")) > SHIFT_LIMIT


class PrecisionState:
    """A layer's off-centre decision on a device, one step late and never waited for.

    :meth:`publish` copies this step's flag (a 0-d device tensor) to host memory
    asynchronously and records an event; :meth:`decide`, called by the next step, reads
    the copy only once the event has completed (``event.query()``, which never blocks),
    and otherwise keeps the last known answer. Nothing happens during CUDA-graph capture,
    so a captured graph keeps the path chosen when it was captured. Not saved in
    ``state_dict`` and not copied by ``deepcopy``/pickle (a copy starts undecided).

    Example::

        >>> state = PrecisionState()          # one per layer, owned by the module
        >>> y = batch_norm(x, rm, rv, training=True, precision_state=state)
    """

    __slots__ = ("value", "_pending", "_event")

    def __init__(self) -> None:
        self.value = False
        self._pending: Optional[Tensor] = None
        self._event = None

    def decide(self) -> bool:
        """Whether the last published step was off-centre (as far as is known without waiting)."""
        if self._pending is not None and (self._event is None or self._event.query()):
            with host_read():
                self.value = bool(self._pending)
            self._pending = None
        return self.value

    def publish(self, flag: Tensor) -> None:
        """Start the copy of ``flag`` (0-d bool tensor) to the host; :meth:`decide` picks it up later."""
        if flag.is_cuda:
            if not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
                return  # a fake/meta run, or inside graph capture: keep the last decision
            self._pending = flag.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif flag.device.type == "cpu":
            self._pending, self._event = flag.clone(), None
        # other devices: no asynchronous read available here; the layer stays on its last decision

    def __deepcopy__(self, memo) -> "PrecisionState":
        return PrecisionState()

    def __reduce__(self):
        return (PrecisionState, ())

    def __repr__(self) -> str:
        return f"PrecisionState(off_center={self.value})"


def _first_sample(x: Tensor) -> Tensor:
    """``x[0, :, 0, ..., 0]``: a value of each channel's data, the pivot when no statistics are known."""
    x = x.detach().select(0, 0)
    while x.dim() > 1:
        x = x.select(1, 0)
    return x


#: what :func:`recentre` does after the statistics are known (see :func:`centering`)
NOTHING, CHECK, PUBLISH = 0, 1, 2


def centering(x: Tensor, state: Optional[PrecisionState], first=_first_sample) -> tuple[Optional[Tensor], int]:
    """The precision rule's decision for one call: ``(shift, then)``.

    ``shift`` is subtracted *before* the statistics are computed: ``first(x)`` (the first value
    of each channel, or of each normalization group) when compiling, where the compiler fuses
    it for free, or when ``state`` reports the layer off-centre on a device; otherwise ``None``.
    ``then`` says what :func:`recentre` does once the statistics are known: ``CHECK`` them on
    the host (the CPU), ``PUBLISH`` the flag for the next step (a device), or ``NOTHING``
    (float64, compiled code, or a device call without a state).
    """
    if x.dtype == torch.float64:
        return None, NOTHING
    if torch.compiler.is_compiling():
        return first(x).detach(), NOTHING
    if host_reads_ok(x):
        return None, CHECK
    if state is None or in_transform():  # in torch.func: torch.nn's precision (compat.md)
        return None, NOTHING
    return (first(x).detach() if state.decide() else None), PUBLISH


def recentre(then: int, mean: Tensor, rstd: Tensor, state: Optional[PrecisionState],
             shift: Optional[Tensor] = None) -> bool:  # fmt: skip
    """After :func:`centering`: whether to recompute the statistics about the rounded mean.

    ``mean`` (of ``x - shift``) and ``rstd`` are the statistics just computed. ``CHECK``:
    :func:`off_center`, read now (only where nothing was shifted). ``PUBLISH``: the flag goes
    to ``state`` for the next step and nothing is read (returns False).
    """
    if then == CHECK:
        return shift is None and off_center(mean, rstd)
    if then == PUBLISH:
        total = mean if shift is None else mean + shift.to(mean.dtype)
        state.publish(_off_center_flag(total, rstd))
    return False


def exact_norm(x: Tensor, op, first, expand, state: Optional[PrecisionState] = None) -> Tensor:
    """Run a native normalization ``op(x) -> (y, mean, rstd)`` under the precision rule.

    For norms whose statistics are per sample (group/layer norm): ``mean``/``rstd`` have the
    shape of the normalization groups, ``expand(t)`` makes such a tensor broadcast against
    ``x``, and ``first(x)`` picks the first value of each group (the pivot). The same
    decisions as batch norm's: a pivot shift first when compiling or when ``state`` reports
    the layer off-centre on a device; on the CPU, a recomputation about the rounded mean when
    ``max |mean| * rstd > SHIFT_LIMIT``. ``y`` is invariant to the shift, so its gradient is
    unchanged.
    """
    pivot, then = centering(x, state, first)
    y, mean, rstd = op(x if pivot is None else x - expand(pivot))
    if recentre(then, mean, rstd, state, pivot):
        y = op(x - expand(mean.detach().to(x.dtype)))[0]
    return y


def running_off_center(running_mean: Tensor, running_var: Tensor, eps: float) -> bool:
    """Whether inference with these running statistics must shift first (CPU only).

    PyTorch's CPU inference kernel folds the affine into ``x * scale + shift``, which
    cancels when ``|running_mean| >> sqrt(running_var)``; CUDA's computes
    ``(x - mean) * invstd`` and is exact, so on devices the answer is False without a
    read. The CPU answer is cached on ``running_mean``, keyed on both buffers' version
    counters (bumped by every in-place write) and data pointers; writes through ``.data``
    bypass the counter (documented in docs/design.md).
    """
    if not host_reads_ok(running_mean) or running_mean.dtype == torch.float64:
        return False
    if running_mean.is_inference() or running_var.is_inference():
        # inference tensors have no version counter (reading it raises): check every call
        return off_center(running_mean, torch.rsqrt(running_var.float() + eps))
    key = (running_mean._version, running_var._version, running_mean.data_ptr(), running_var.data_ptr(), eps)
    hit = getattr(running_mean, "_batchnorm_off_center", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    work = stat_dtype(running_mean.dtype)
    result = off_center(running_mean.to(work), torch.rsqrt(running_var.to(work) + eps))
    running_mean._batchnorm_off_center = (key, result)
    return result


# --- moments ---------------------------------------------------------------------------------


def _native_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """One native pass: per-channel ``(mean, biased var)`` of ``(N, C, *)`` ``x`` in the statistics dtype."""
    if x.dtype in _HALF and not torch.compiler.is_compiling():
        # the native statistics kernel keeps half statistics for half input; with a float32
        # weight the training kernel keeps float32 ones (eps = 0: var = rstd ** -2 exactly)
        one = torch.ones(x.shape[1], device=x.device, dtype=torch.float32)
        _, mean, rstd = torch.native_batch_norm(x, one, None, None, None, True, 0.0, 0.0)
        return mean, var_from_rstd(rstd, 0.0)
    if x.is_cpu and not torch.compiler.is_compiling() and not in_transform():  # (no vmap rule for it)
        return torch.batch_norm_update_stats(x, None, None, 0.0)  # one read; no meta kernel, so eager CPU only
    var, mean = torch.var_mean(x.to(stat_dtype(x.dtype)), [0] + list(range(2, x.dim())), correction=0)
    return mean, var


def var_from_rstd(rstd: Tensor, eps: float) -> Tensor:
    """The biased variance behind a kernel's ``rstd = 1 / sqrt(var + eps)``, clamped at 0."""
    return rstd.pow(-2).sub_(eps).clamp_min_(0.0)


def needs_blocks(x: Tensor, count: int) -> bool:
    """Whether the native kernel's single pass would lose precision on ``x`` (``count`` values
    per channel): rule 2 of the module docstring."""
    if count <= BLOCK_VALUES:
        return False
    if not x.is_cpu:
        return count > DEVICE_BLOCK_VALUES
    return not (x.is_contiguous() and x.stride(1) != 1)


def _blocks(x: Tensor) -> Optional[List[Tensor]]:
    """The parts to reduce separately (see the module docstring), or ``None`` for one native call."""
    c = x.shape[1]
    count = x.numel() // c if c else 0
    if not needs_blocks(x, count):
        return None
    if x.device.type == "cpu":
        rows = x.movedim(1, -1)
        if rows.is_contiguous() or x.dim() == 2:
            return list(rows.reshape(-1, c).split(BLOCK_VALUES))  # (rows, C) blocks, channels inner
        per_sample = max(count // max(x.shape[0], 1), 1)
        return list(x.split(max(BLOCK_VALUES // per_sample, 1)))
    per_sample = max(count // max(x.shape[0], 1), 1)
    return list(x.split(max(DEVICE_BLOCK_VALUES // per_sample, 1)))


def _raw_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` of ``x`` (rules 1 and 2), without any shift."""
    parts = _blocks(x)
    if parts is None:
        return _native_moments(x)
    c = x.shape[1]  # row blocks are (rows, C): channels stay on dimension 1 in every part
    counts = [p.numel() // c for p in parts]
    means, vars_ = zip(*(_native_moments(p) for p in parts))
    merged = merge(counts, torch.stack(means).double(), torch.stack(vars_).double())
    work = stat_dtype(x.dtype)
    return merged.mean.to(work), merged.var.to(work)


def moments(x: Tensor, state: Optional[PrecisionState] = None, chunk: Optional[int] = None) -> BatchStats:
    r"""Per-channel statistics of ``x`` of shape ``(N, C, *)`` over ``(N, *spatial)``, exactly.

    .. math::
        \mu_c = \frac1n \sum x,\qquad \sigma_c^2 = \frac1n \sum (x - \mu_c)^2,\qquad n = N\prod\text{spatial}

    under the precision rule of this module (dtype, blocks for large reductions, shift at
    large offsets). With ``chunk``, separately for each part of ``chunk`` samples along
    ``N`` (virtual batches): ``(K, C)`` statistics, each part with its own shift. Detached;
    an input without values gives zeros with ``count = 0``. ``state`` is the layer's
    :class:`PrecisionState` for the device policy (optional).

    Example::

        >>> st = moments(torch.randn(64, 8, 16, 16))
        >>> st.mean.shape, st.count                      # (torch.Size([8]), 16384)
        >>> moments(torch.randn(64, 8), chunk=16).mean.shape   # torch.Size([4, 8])
    """
    x = x.detach()
    c = x.shape[1]
    count = x.numel() // c if c else 0
    if count == 0:
        z = torch.zeros(c, device=x.device, dtype=stat_dtype(x.dtype))
        return BatchStats(z, z.clone(), 0)
    parts = (x,) if chunk is None else x.split(chunk)

    def stats_about(shift):
        if chunk is None:
            return _raw_moments(x if shift is None else x - param_view(shift, x.dim()))
        pairs = [_raw_moments(p if shift is None else p - param_view(shift.select(0, k), x.dim()))
                 for k, p in enumerate(parts)]
        return torch.stack([m for m, _ in pairs]), torch.stack([v for _, v in pairs])

    shift, then = centering(x, state)
    if shift is not None and chunk is not None:
        shift = shift.expand(len(parts), c)
    mean, var = stats_about(shift)
    if recentre(then, mean, torch.rsqrt(var + 1e-30), state, shift):
        shift = mean.to(x.dtype)
        mean, var = stats_about(shift)
    counts = None if chunk is None else tuple(p.numel() // c for p in parts)
    return BatchStats(mean, var, count, shift, counts)


class Merged(NamedTuple):
    """Result of :func:`merge`: total count ``n`` (0-d), ``mean``, biased ``var`` (``M2 / n``)."""

    n: Tensor
    mean: Tensor
    var: Tensor


def merge(counts, means: Tensor, variances: Tensor) -> Merged:
    r"""Exact merge of ``K`` parts' statistics into the whole's (Chan, Golub & LeVeque, 1979).

    ``counts``: ``(K,)`` tensor, or a sequence of ints (then no tensor is built from host
    data, which on a GPU would synchronize); ``means``, ``variances`` (biased): ``(K, C)``.
    With :math:`M_{2,k} = n_k \sigma_k^2`:

    .. math::
        n = \sum n_k,\quad \mu = \sum \tfrac{n_k}{n}\mu_k,\quad
        M_2 = \sum M_{2,k} + \sum n_k(\mu_k - \mu)^2,\quad \sigma^2 = M_2 / n

    Deviations are taken from the merged mean, so there is no ``E[x^2] - E[x]^2``
    cancellation. Parts with ``n_k = 0`` contribute nothing; with ``n = 0`` the mean and
    variance are zeros. Computed in the dtype of ``means`` (callers pass float64).
    :func:`batchnorm.reference.chan_merge` is the float64 oracle.

    Example::

        >>> m = merge([3, 5], torch.zeros(2, 4), torch.ones(2, 4))
        >>> m.n, m.var                       # 8, ones
    """
    if isinstance(counts, Tensor):
        counts = counts.to(means.dtype)
        n = counts.sum()
        w = (counts / n.clamp_min(1)).unsqueeze(1)
        variances = variances * (counts > 0).unsqueeze(1)
    else:
        total = sum(counts)
        w = means.new_empty((len(counts), 1))
        w.fill_(counts[0] / max(total, 1))
        for k, ck in enumerate(counts):
            if ck != counts[0]:
                w[k].fill_(ck / max(total, 1))
        n = torch.tensor(float(total), dtype=means.dtype)
    mean = (w * means).sum(0)
    var = (w * variances).sum(0) + (w * (means - mean).square()).sum(0)
    return Merged(n, mean, var)
