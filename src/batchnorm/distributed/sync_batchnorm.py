r"""Synchronized batch norm on ``torch.distributed``: one set of statistics for all processes.

Forward (training). Every rank ``r`` computes, per channel, its count ``n_r``, mean
``mu_r`` and ``M2_r = sum (x - mu_r)^2`` (:func:`batchnorm.functional._core.batch_moments`),
the ranks all-gather ``(n_r, mu_r, M2_r)`` (one collective, ``1 + 2C`` float64 numbers
per rank) and each merges them exactly (Chan et al. 1979,
:func:`batchnorm.functional._core.merge_moments`)::

    n = sum n_r,   mu = sum n_r mu_r / n,   M2 = sum M2_r + sum n_r (mu_r - mu)^2,   var = M2 / n

- not an average of per-rank variances, which is wrong for uneven batches. Then
``y = gamma * (x - mu) * rstd + beta`` with ``rstd = 1/sqrt(var + eps)`` (the native
kernel), and the running statistics get the same update as single-process batch
norm on the concatenated batch (unbiased with the global ``n``).

Backward. With ``xhat = (x - mu) * rstd`` and global sums (one all-reduce of ``2C``
numbers)::

    S1 = sum_all dy,   S2 = sum_all dy * xhat
    dx = gamma * rstd * (dy - S1 / n - xhat * S2 / n)
    dgamma = sum_local dy * xhat,   dbeta = sum_local dy

The parameter gradients are per-rank, as in ``torch.nn.SyncBatchNorm``: summed over
ranks (what DistributedDataParallel's all-reduce does, up to its averaging) they are
the full-batch gradients.

A rank with an empty batch (``N = 0``) contributes ``n_r = 0`` and still joins both
collectives; every rank must call the layer (and its backward) the same number of
times, or the others wait until the process group's timeout and then fail with the
error below. Without an initialized process group, or with a group of one process,
the layer is plain batch norm.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional import _core
from ..functional.batch_norm import apply_activation
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm", "world_size"]


def world_size(process_group=None) -> int:
    """Processes in ``process_group`` (the default group if None); 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _collective(op: str, fn, process_group):
    try:
        return fn()
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        raise RuntimeError(
            f"SyncBatchNorm: the {op} across {world_size(process_group)} processes failed - a process died, "
            f"timed out, or did not call this layer (every rank must run it, also with an empty batch). "
            f"Original error: {e}"
        ) from e


def _all_gather_moments(x: Tensor, process_group):
    """Local ``(count, mean, M2)`` gathered from all ranks and merged: global ``(n, mean, var)`` in float64."""
    c = x.shape[1]
    n_local = x.numel() // c if c else 0
    mean, var = _core.batch_moments(x)
    packed = torch.empty(1 + 2 * c, device=x.device, dtype=torch.float64)
    packed[0] = n_local
    packed[1 : 1 + c] = mean
    packed[1 + c :] = var.to(torch.float64) * n_local
    parts = [torch.empty_like(packed) for _ in range(world_size(process_group))]
    _collective("all_gather of batch statistics", lambda: dist.all_gather(parts, packed, group=process_group),
                process_group)  # fmt: skip
    parts = torch.stack(parts)
    n, g_mean, g_m2 = _core.merge_moments(parts[:, 0], parts[:, 1 : 1 + c], parts[:, 1 + c :])
    return int(n.item()), g_mean, g_m2 / max(int(n.item()), 1)


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = weight * (x - mean) * rstd + bias`` with global statistics; backward all-reduces ``S1``, ``S2``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps, process_group):
        # x: (N, C, *) local batch; weight/bias: (C,) or None; mean/var: (C,) global, stat dtype
        y = _core.normalize_with_running_stats(x, mean, var, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.count, ctx.eps, ctx.process_group = count, eps, process_group
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var = ctx.saved_tensors
        work = mean.dtype
        axes = [0] + list(range(2, x.dim()))
        rstd = torch.rsqrt(var + ctx.eps)
        view = lambda t: _core.param_view(t, x.dim())  # noqa: E731
        xhat = (x.to(work) - view(mean)) * view(rstd)
        dy_w = dy.to(work)
        sums = torch.cat([dy_w.sum(axes), (dy_w * xhat).sum(axes)])  # local (S1, S2)
        local_s1, local_s2 = sums.chunk(2)
        local_s1, local_s2 = local_s1.clone(), local_s2.clone()
        _collective("all_reduce of gradient sums", lambda: dist.all_reduce(sums, group=ctx.process_group),
                    ctx.process_group)  # fmt: skip
        s1, s2 = sums.chunk(2)
        scale = rstd if weight is None else weight.to(work) * rstd
        dx = (dy_w - view(s1 / ctx.count) - xhat * view(s2 / ctx.count)) * view(scale)
        dx = dx.to(x.dtype)
        dweight = dbias = None
        if weight is not None:
            dweight = local_s2.to(weight.dtype) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            dbias = local_s1.to(weight.dtype if weight is not None else x.dtype)
        return dx, dweight, dbias, None, None, None, None, None


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
    Raises ``ValueError`` if the global batch has fewer than 2 values per channel (on every
    rank, after the statistics exchange, so no rank is left waiting); nothing is mutated then.
    With ``check_finite=True``, non-finite global statistics (a NaN/Inf on any rank) raise
    ``FloatingPointError`` on every rank, likewise after the exchange and before any update.

    Example (in each of ``world_size`` processes after ``dist.init_process_group("gloo", ...)``)::

        >>> rm, rv = torch.zeros(8), torch.ones(8)
        >>> y = sync_batch_norm(torch.randn(rank + 1, 8, 4, 4), rm, rv)
    """
    what = "sync_batch_norm"
    _core.check_input(input, weight, bias, running_mean, running_var, False, what=what)
    _core.check_momentum(momentum)
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError(f"{what}: momentum=None (cumulative average) needs num_batches_tracked")
    if world_size(process_group) == 1:
        from ..functional.batch_norm import batch_norm

        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps,
                          num_batches_tracked=num_batches_tracked, check_finite=check_finite,
                          backend="aten")  # fmt: skip
    count, mean, var = _all_gather_moments(input, process_group)
    if count < 2:
        raise ValueError(
            f"{what}: expected more than 1 value per channel across all processes when training, got {count}; "
            f"use larger batches or model.eval()"
        )
    if check_finite:  # every rank sees the same global statistics, so all raise together
        _core.check_finite_stats(mean, var, what=what)
    work = _core.stat_dtype(input.dtype)
    mean_w, var_w = mean.to(work), var.to(work)
    y = _SyncBatchNormFunction.apply(input, weight, bias, mean_w, var_w, count, eps, process_group)
    if running_mean is not None:
        _core.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
    return y


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm whose training statistics span all processes of a ``torch.distributed`` group.

    .. math::
        y = \gamma\,\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with ``E``/``Var`` over the union of all ranks' batches (exact Chan merge; see
    :func:`sync_batch_norm`). Eval mode, and training without an initialized process
    group or with one process, is plain batch norm. Constructor and state_dict are those
    of :class:`torch.nn.SyncBatchNorm` (``process_group`` is not saved). Accepts any
    ``(N, C, *)`` input; ranks may have different ``N``, including 0.

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
        check_finite: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         check_finite=check_finite, backend=backend)  # fmt: skip
        self.process_group = process_group

    def _forward(self, input: Tensor, residual=None, activation=None) -> Tensor:
        # only training synchronizes (torch.nn's rule): eval mode without running statistics uses
        # the local batch, so a rank evaluating alone (e.g. validation on rank 0) does not wait
        if not (self.training and world_size(self.process_group) > 1):
            return super()._forward(input, residual, activation)
        self._check_input_dim(input)
        if residual is not None and (not isinstance(residual, Tensor) or residual.shape != input.shape):
            raise ValueError(f"SyncBatchNorm: residual must have the input's shape {tuple(input.shape)}")
        running_mean, running_var, num_batches_tracked = self._running_stats_to_update()
        y = sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, self.momentum, self.eps,
                            num_batches_tracked=num_batches_tracked, process_group=self.process_group,
                            check_finite=self.check_finite)  # fmt: skip
        if residual is not None:
            y = y + residual
        return apply_activation(y, activation)


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
