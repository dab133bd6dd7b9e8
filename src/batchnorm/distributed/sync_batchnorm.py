r"""Synchronized batch norm on ``torch.distributed``: one set of statistics for all processes.

It is the normalization pipeline (:mod:`batchnorm.functional.pipeline`) with
:class:`AllRanks` as the statistics source.

Forward (training). Every rank ``r`` computes, per channel, its count ``n_r``, mean
``mu_r`` and biased variance under the one precision rule
(:func:`batchnorm.functional.stats.moments`); the ranks all-gather them in **one**
collective of ``HEADER + 2C`` float64 numbers per rank, a header included (channel count,
dtype, layout, and whether the rank rejected its input), and each rank merges them
exactly (Chan et al. 1979, :func:`batchnorm.functional.stats.merge`)::

    n = sum n_r,   mu = sum n_r mu_r / n,   M2 = sum n_r var_r + sum n_r (mu_r - mu)^2,   var = M2 / n

- not an average of per-rank variances, which is wrong for uneven batches. At large
offsets (``|mu| * rstd > SHIFT_LIMIT``) the global statistics are re-centred on ``mu``
rounded to the input dtype, so float32 stays exact. Then ``x`` is normalized by the
one "given statistics" Function, and the running statistics get the same update as
single-process batch norm on the concatenated batch (unbiased with the global ``n``).

Backward. The Function's native reduce (``sum dy``, ``sum dy * xhat``) -> one all-reduce of
``2C`` numbers -> ``dx = gamma * rstd * (dy - S1/n - xhat * S2/n)``. The parameter
gradients are per-rank, as in ``torch.nn.SyncBatchNorm``: summed over ranks (what
DistributedDataParallel's all-reduce does, up to its averaging) they are the full-batch
gradients.

Failures are collective: a rank whose input is rejected still joins the exchange, with the
header saying so, and every rank raises the same error before anything is updated; ranks
whose channel counts, dtypes or layouts differ raise together too. Every wait is bounded
by ``timeout`` (default :data:`DEFAULT_TIMEOUT_S`, well under the process group's 30
minutes), so a rank that crashed, hangs, or skipped the layer ends in a clear error on
the others instead of a silent wait. A rank with an empty batch contributes ``n_r = 0``
and still joins both collectives. Without an initialized process group, or with a group
of one process, the layer is plain batch norm.

Host reads. The exchanged header is read on the host once per training step (the same
synchronization ``torch.nn.SyncBatchNorm`` makes), so SyncBatchNorm, unlike the other
modules, synchronizes a GPU once per layer and step and cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import numbers
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InputError, InputTypeError
from ..functional.batch_norm import batch_norm
from ..functional.pipeline import THIS_BATCH, ThisBatch, check_eps, check_momentum, run
from ..functional.stats import BatchStats, PrecisionState, merge, moments, off_center, stat_dtype
from ..nn._base import check_num_features, torch_init
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm", "world_size", "DEFAULT_TIMEOUT_S"]

#: seconds any rank waits for the others in one collective of this layer (the process
#: group's own default is 30 minutes); long enough for a rank that evaluates alone between steps
DEFAULT_TIMEOUT_S = 600.0

_DTYPE_CODES = {torch.float32: 1.0, torch.float64: 2.0, torch.float16: 3.0, torch.bfloat16: 4.0}
_DTYPE_NAMES = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
_LAYOUTS = ("contiguous", "channels_last", "other")
#: header of the exchanged statistics: count, channels, dtype code, layout code, rejected (0/1)
HEADER = 5


def world_size(process_group=None) -> int:
    """Processes in ``process_group`` (the default group if None); 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _layout_code(x) -> float:
    if not isinstance(x, Tensor) or x.is_contiguous():
        return 0.0
    if x.dim() in (4, 5) and x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                             else torch.channels_last_3d):  # fmt: skip
        return 1.0
    return 2.0


def _wait(op: str, work, timeout: Optional[float], process_group) -> None:
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as e:  # gloo/NCCL errors and timeouts (DistBackendError is a RuntimeError)
        after = "the process group timeout" if timeout is None else f"{timeout:g} s"
        raise RuntimeError(
            f"SyncBatchNorm: the {op} across {world_size(process_group)} processes failed or timed out after "
            f"{after} - a process died, hangs, raised before reaching this layer, or did not call it (every "
            f"rank must run it, also with an empty batch). Original error: {e}"
        ) from e


class AllRanks(ThisBatch):
    """Statistics of the union of all ranks' batches (SyncBatchNorm's source); see the module docstring."""

    fusable = False
    in_kernel = False

    def __init__(self, process_group, timeout: Optional[float], channels: int, device) -> None:
        self.group, self.timeout, self.channels, self.device = process_group, timeout, channels, device
        self.n = 0

    def _exchange(self, header: list, mean: Tensor, var: Tensor) -> Tensor:
        c = self.channels
        packed = torch.empty(HEADER + 2 * c, device=self.device, dtype=torch.float64)
        packed[:HEADER].copy_(torch.tensor(header, dtype=torch.float64))
        packed[HEADER:HEADER + c] = mean
        packed[HEADER + c:] = var
        parts = [torch.empty_like(packed) for _ in range(world_size(self.group))]
        _wait("all_gather of batch statistics", dist.all_gather(parts, packed, group=self.group, async_op=True),
              self.timeout, self.group)  # fmt: skip
        return torch.stack(parts)

    @classmethod
    def for_call(cls, process_group, timeout, x, *params) -> "AllRanks":
        """The source for one call: the channel count from the parameters (the layer's, which every
        rank shares) or else the input, on their device."""
        ref = next((t for t in params if isinstance(t, Tensor)), None)
        if ref is not None:
            return cls(process_group, timeout, ref.shape[0], ref.device)
        ok = isinstance(x, Tensor) and x.dim() >= 2
        return cls(process_group, timeout, x.shape[1] if ok else 0, x.device if isinstance(x, Tensor) else "cpu")

    def handshake(self) -> None:
        """Compare the channel count with every rank's in a fixed-size exchange (a module's first call):
        ranks built with different ``num_features`` would otherwise exchange statistics of different
        sizes, which the backends cannot report."""
        mine = torch.full((1,), float(self.channels), device=self.device, dtype=torch.float64)
        parts = [torch.empty_like(mine) for _ in range(world_size(self.group))]
        _wait("exchange of channel counts", dist.all_gather(parts, mine, group=self.group, async_op=True),
              self.timeout, self.group)  # fmt: skip
        counts = [int(p.item()) for p in parts]
        if len(set(counts)) > 1:
            raise InputError(f"SyncBatchNorm: the ranks' layers have different channel counts {counts} (rank "
                             f"order); every rank must run the same model")  # fmt: skip

    def reject(self, x) -> None:
        """Join the exchange as a rank that rejected its input, so the others raise too."""
        zeros = torch.zeros(self.channels, device=self.device, dtype=torch.float64)
        dtype = _DTYPE_CODES.get(getattr(x, "dtype", None), 0.0)
        self._exchange([0.0, float(self.channels), dtype, _layout_code(x), 1.0], zeros, zeros)

    def stats(self, x: Tensor, state: Optional[PrecisionState]) -> BatchStats:
        local = moments(x)
        header = [float(local.count), float(x.shape[1]), _DTYPE_CODES[x.dtype], _layout_code(x), 0.0]
        parts = self._exchange(header, local.total_mean(torch.float64), local.var.double())
        heads = parts[:, :HEADER].cpu().tolist()  # the one host read (see the module docstring)
        self._check_headers(heads, x)
        counts = torch.tensor([h[0] for h in heads], dtype=torch.float64, device=parts.device)
        g = merge(counts, parts[:, HEADER:HEADER + self.channels], parts[:, HEADER + self.channels:])
        self.n = int(sum(h[0] for h in heads))
        if self.n < 2:
            raise InputError(
                f"sync_batch_norm: expected more than 1 value per channel across all processes when training, got "
                f"{self.n}; use larger batches or model.eval()"
            )
        work = stat_dtype(x.dtype)
        shift = None
        if x.dtype != torch.float64 and off_center(g.mean.cpu(), torch.rsqrt(g.var.cpu() + 1e-30)):
            shift = g.mean.to(x.dtype)  # re-centre the global statistics (exact float32 at large offsets)
            return BatchStats((g.mean - shift.double()).to(work), g.var.to(work), self.n, shift)
        return BatchStats(g.mean.to(work), g.var.to(work), self.n, shift)

    def _check_headers(self, heads, x) -> None:
        bad = [r for r, h in enumerate(heads) if h[4]]
        if bad:
            raise InputError(f"SyncBatchNorm: rank(s) {bad} rejected their input (see the error on those ranks); "
                             f"no rank updated anything")  # fmt: skip
        for i, what, names in ((1, "channel counts", None), (2, "dtypes", _DTYPE_NAMES), (3, "layouts", _LAYOUTS)):
            values = [h[i] for h in heads]
            if len(set(values)) > 1:
                shown = [names[int(v)] if isinstance(names, tuple) else (names or {}).get(v, int(v)) for v in values]
                raise InputError(f"SyncBatchNorm: the ranks' inputs disagree in {what}: {shown} (rank order); "
                                 f"every rank must run the same model on inputs of the same kind")  # fmt: skip

    def hook(self, local: Tensor):
        work = dist.all_reduce(local, group=self.group, async_op=True)
        _wait("all_reduce of gradient sums", work, self.timeout, self.group)
        return local, self.n


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    process_group=None,
    check_finite: bool = False,
    timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    handshake: bool = False,
    precision_state: Optional[PrecisionState] = None,
) -> Tensor:
    r"""Training-mode batch norm with statistics over the inputs of all processes of ``process_group``.

    .. math::
        y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta,\qquad
        (n, \mu, M_2) = \mathrm{ChanMerge}_r\,(n_r, \mu_r, M_{2,r}),\ \sigma^2 = M_2 / n

    Equals :func:`batchnorm.functional.batch_norm` (``training=True``) on the concatenation of
    all ranks' inputs along ``N``; ``input`` may have a different ``N`` on every rank, including 0.
    Running statistics (if given) are updated in place with the global statistics on every rank.
    All ranks must call it (collective). With one process it *is* ``batch_norm``.

    Shapes: input ``(N_r, C, *)``; weight, bias, running statistics ``(C,)``.
    Errors are raised on every rank together, after the exchange and before any update: a rank
    whose input is rejected (shape, dtype, eps, ...), ranks that disagree in channels, dtype or
    layout, a global batch with fewer than 2 values per channel, and (``check_finite=True``)
    non-finite global statistics. ``timeout`` (seconds, None for the process group's) bounds
    each wait for the other ranks. ``handshake=True`` first compares the ranks' channel counts
    in a small fixed-size exchange (the module does this on its first call).

    Example (in each of ``world_size`` processes after ``dist.init_process_group("gloo", ...)``)::

        >>> rm, rv = torch.zeros(8), torch.ones(8)
        >>> y = sync_batch_norm(torch.randn(rank + 1, 8, 4, 4), rm, rv)
    """
    what = "sync_batch_norm"
    if world_size(process_group) == 1:
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps,
                          num_batches_tracked=num_batches_tracked, check_finite=check_finite, backend="aten",
                          precision_state=precision_state)  # fmt: skip
    source = AllRanks.for_call(process_group, timeout, input, running_mean, weight, bias)
    if handshake:
        source.handshake()
    return run(input, source, weight, bias, running_mean, running_var, num_batches_tracked, True, momentum, eps,
               check_finite=check_finite, backend="aten", state=precision_state, what="sync_batch_norm")


class SyncBatchNorm(_BatchNorm, nn.SyncBatchNorm):
    r"""Batch norm whose training statistics span all processes of a ``torch.distributed`` group.

    .. math::
        y = \gamma\,\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with ``E``/``Var`` over the union of all ranks' batches (exact Chan merge; see
    :func:`sync_batch_norm`). Eval mode, and training without an initialized process
    group or with one process, is plain batch norm. A :class:`torch.nn.SyncBatchNorm`: its
    constructor (plus keyword-only ``check_finite``, ``backend`` and ``timeout``) and state_dict
    (``process_group`` is not saved). Accepts any ``(N, C, *)`` input; ranks may have
    different ``N``, including 0.

    Example::

        >>> bn = SyncBatchNorm(64)                    # or convert_sync_batchnorm(model)
        >>> y = bn(torch.randn(8, 64, 16, 16))        # plain BN when not distributed
    """

    _input_dims = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        check_finite: bool = False,
        backend: str = "auto",
        timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    ) -> None:
        num_features = check_num_features(num_features)
        eps = check_eps(eps, "SyncBatchNorm")
        momentum = check_momentum(momentum, "SyncBatchNorm")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                    or not timeout > 0):  # fmt: skip
            raise InputError(f"SyncBatchNorm: timeout must be a positive number of seconds or None, got {timeout!r}")
        torch_init(self, nn.SyncBatchNorm, num_features, eps, momentum, affine, track_running_stats, process_group,
                   device, dtype, bias=bias)  # fmt: skip
        self._init_options(check_finite, backend)
        #: seconds to wait for the other ranks in each collective (None: the process group's timeout)
        self.timeout = None if timeout is None else float(timeout)
        self._verified = False  # channel counts compared with the other ranks (first training call)

    def _source(self) -> ThisBatch:
        # only training synchronizes (torch.nn's rule): eval mode without running statistics uses
        # the local batch, so a rank evaluating alone (e.g. validation on rank 0) does not wait
        if not self.training or world_size(self.process_group) == 1:
            return THIS_BATCH
        ref = self.running_mean if self.running_mean is not None else self.weight
        source = AllRanks(self.process_group, self.timeout, self.num_features, ref.device if ref is not None else "cpu")
        if not self._verified:  # first training call: compare the layer's channel count with the other ranks'
            source.handshake()
            self._verified = True
        return source


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every plain batch norm in ``module`` by :class:`SyncBatchNorm`, keeping its state.

    Converts ``torch.nn.BatchNorm1d/2d/3d`` and this library's ``BatchNorm1d/2d/3d`` (exact
    types; subclasses with other semantics - batch renorm, ghost batch norm - are left
    alone). The parameter objects themselves are moved over (an optimizer built before
    the conversion keeps working), buffers are shared, and ``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, the training flag and ``requires_grad`` are kept.
    Returns the converted module (a new object when ``module`` itself is a batch norm).

    Example::

        >>> model = convert_sync_batchnorm(model)       # before wrapping in DDP
    """
    if type(module) in _PLAIN_BN:
        ref = module.running_mean if module.running_mean is not None else module.weight
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)  # fmt: skip
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        return out
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
