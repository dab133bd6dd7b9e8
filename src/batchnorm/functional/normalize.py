r"""The one autograd Function that normalizes with statistics computed elsewhere.

Batch renorm (statistics first, to get ``r`` and ``d``), ghost batch norm (one set per
virtual batch), SyncBatchNorm (statistics of all ranks) and large reductions (statistics in
blocks) all normalize ``x`` with a :class:`~batchnorm.functional.stats.BatchStats` that was
computed before, yet need the *training* gradient, in which the statistics depend on ``x``.

Forward: PyTorch's native inference kernel with the given ``mean``/``var`` (one read, one
write), per part when the statistics have ``K`` parts (``chunk`` samples each), writing
into slices of one output. With a ``shift`` the kernel sees ``x - shift`` (its folded
``x * scale + shift`` form is exact only near the mean).

Backward, with :math:`\hat x = (x - \mu)\,r` and :math:`r = 1/\sqrt{\sigma^2+\epsilon}`:

.. math::
    \frac{\partial L}{\partial \gamma} = \sum \mathrm{d}y\,\hat x,\qquad
    \frac{\partial L}{\partial \beta} = \sum \mathrm{d}y,\qquad
    \mathrm{d}x = \gamma\,r\Big(\mathrm{d}y - \tfrac1n\sum \mathrm{d}y - \hat x\,\tfrac1n\sum \mathrm{d}y\,\hat x\Big)

* without a reduction hook: PyTorch's native training backward (per part), which computes
  the two sums and ``dx`` in one call;
* with a hook (SyncBatchNorm): the two local sums (``native_batch_norm_backward`` with only
  the parameter gradients requested) -> ``hook`` (an all-reduce of the ``2 C`` numbers) ->
  ``dx`` from the global sums, as an inference-kernel pass plus one fused multiply-add
  (``dx = A dy + B \hat x + D`` per channel): no full-size float32 temporaries.

Double backward works without a hook (the native backward is itself differentiable); with a
hook it raises, since the all-reduce is not.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import InputError
from .stats import BatchStats, in_transform, param_view

__all__ = ["normalize", "affine_args"]

_HALF = (torch.float16, torch.bfloat16)


def affine_args(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """Parameters as the native kernels need them: half parameters in float32, and a float32
    weight of ones for half input without one (else the kernel keeps half statistics)."""
    if weight is not None and weight.dtype in _HALF:
        weight = weight.float()
    if bias is not None and bias.dtype in _HALF:
        bias = bias.float()
    if x.dtype in _HALF and weight is None:
        weight = torch.ones(x.shape[1], device=x.device, dtype=torch.float32)
    return weight, bias


def _parts(t: Tensor, chunk: Optional[int]):
    return (t,) if chunk is None else t.split(chunk)


def _centred(x: Tensor, shift: Optional[Tensor], k: int, chunk: Optional[int]) -> Tensor:
    """Part ``k`` of ``x`` minus its shift (``(C,)``, or ``(K, C)`` per part)."""
    if shift is None:
        return x
    return x - param_view(shift if chunk is None else shift.select(0, k), x.dim())


def _per_part(t: Tensor, k: int, chunk: Optional[int]) -> Tensor:
    return t if chunk is None else t.select(0, k)


def _n_outermost(x: Tensor) -> bool:
    """Whether ``empty_like(x)`` has ``N`` outermost, so its slices along ``N`` are dense blocks the
    ``out=`` kernels can fill (contiguous and channels_last; a permuted view with ``N`` inner is not)."""
    if x.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and x.is_contiguous(memory_format=fmt)


#: the native kernels writing into slices of larger outputs (one part of ``K``)
_native_into = torch.ops.aten.native_batch_norm.out
_native_backward_into = torch.ops.aten.native_batch_norm_backward.out


class _Normalize(torch.autograd.Function):
    # forward / setup_context / backward in the form torch.func transforms need (vmap rule generated
    # from the native ops; the out= shortcuts are skipped inside a transform)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, mean, var, shift, eps, chunk, hook):
        if chunk is None:
            y = torch.native_batch_norm(_centred(x, shift, 0, None), weight, bias, mean, var, False, 0.0, eps)[0]
        elif _n_outermost(x) and not torch.compiler.is_compiling() and not in_transform():  # parts written in place
            y = torch.empty_like(x)
            none = mean.new_empty(0)  # (the statistics outputs have the statistics dtype)
            for k, (xc, yc) in enumerate(zip(x.split(chunk), y.split(chunk))):
                _native_into(_centred(xc, shift, k, chunk), weight, bias, mean.select(0, k), var.select(0, k), False,
                             0.0, eps, out=yc, save_mean=none, save_invstd=none)  # fmt: skip
        else:
            y = torch.cat([torch.native_batch_norm(_centred(xc, shift, k, chunk), weight, bias, mean.select(0, k),
                                                   var.select(0, k), False, 0.0, eps)[0]
                           for k, xc in enumerate(x.split(chunk))])  # fmt: skip
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, mean, var, shift, eps, chunk, hook = inputs
        ctx.save_for_backward(x, weight, mean, var, shift)
        ctx.eps, ctx.chunk, ctx.hook, ctx.has_bias = eps, chunk, hook, bias is not None

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var, shift = ctx.saved_tensors
        rstd = torch.rsqrt(var + ctx.eps)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        need_b = need_b and ctx.has_bias
        chunk, eps = ctx.chunk, ctx.eps
        if ctx.hook is not None:
            if torch.is_grad_enabled():
                raise InputError("double backward through SyncBatchNorm is not supported (its all-reduce is "
                                 "not differentiable); use batchnorm.BatchNorm*d for higher-order gradients")
            dx, dw, db = _backward_with_hook(dy, _centred(x, shift, 0, None), weight, mean, var, rstd, eps,
                                             ctx.hook, need_x)  # fmt: skip
        elif (chunk is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
              and not in_transform() and _n_outermost(x) and dy.stride() == x.stride()):  # fmt: skip
            # parts written in place into one gradient buffer (out= kernels are not differentiable:
            # under create_graph the general loop below runs instead)
            dx = torch.empty_like(x)
            dws, dbs = mean.new_empty(mean.shape), mean.new_empty(mean.shape)
            for k, (dyc, xc, dxc) in enumerate(zip(dy.split(chunk), x.split(chunk), dx.split(chunk))):
                _native_backward_into(dyc, _centred(xc, shift, k, chunk), weight, None, None, mean.select(0, k),
                                      rstd.select(0, k), True, eps, [True, True, True],
                                      out0=dxc, out1=dws.select(0, k), out2=dbs.select(0, k))  # fmt: skip
            dw, db = dws.sum(0), dbs.sum(0)
        else:
            dxs, dws, dbs = [], [], []
            for k, (dyc, xc) in enumerate(zip(_parts(dy, chunk), _parts(x, chunk))):
                # x - shift is recomputed here so that double backward sees it as a function of x
                dx, dw, db = torch.ops.aten.native_batch_norm_backward(
                    dyc, _centred(xc, shift, k, chunk), weight, None, None, _per_part(mean, k, chunk),
                    _per_part(rstd, k, chunk), True, eps, [need_x, need_w, need_b])
                dxs.append(dx), dws.append(dw), dbs.append(db)
            dx = dxs[0] if len(dxs) == 1 or not need_x else torch.cat(dxs)
            dw = dws[0] if len(dws) == 1 or not need_w else torch.stack(dws).sum(0)
            db = dbs[0] if len(dbs) == 1 or not need_b else torch.stack(dbs).sum(0)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                None, None, None, None, None, None)  # fmt: skip


def _backward_with_hook(dy, xs, weight, mean, var, rstd, eps, hook, need_x):
    # local sums: native_batch_norm_backward's parameter gradients are sum(dy * xhat) and sum(dy)
    if xs.numel():
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, xs, None, None, None, mean, rstd, True, eps, [False, True, True])
    else:  # an empty rank still joins the all-reduce (the native kernel would divide by its count 0)
        sum_dy_xhat, sum_dy = rstd.new_zeros(rstd.shape), rstd.new_zeros(rstd.shape)
    total, n = hook(torch.stack([sum_dy, sum_dy_xhat]))  # global sums (2, C) (reduced in place) and count
    dx = None
    if not xs.numel():
        return (torch.zeros_like(dy) if need_x else None), sum_dy_xhat, sum_dy
    if need_x:
        gamma = rstd.new_ones(()) if weight is None else weight.to(rstd.dtype)
        a = gamma * rstd  # dx = a * (dy - S1/n - xhat * S2/n) = a*dy + [(-a*S2/n) * xhat + (-a*S1/n)]
        dx = torch.native_batch_norm(xs, -a * total[1] / n, -a * total[0] / n, mean, var, False, 0.0, eps)[0]
        dx.addcmul_(dy, param_view(a.to(dy.dtype), dy.dim()))
    return dx, sum_dy_xhat, sum_dy


def normalize(x: Tensor, stats: BatchStats, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, *,
              chunk: Optional[int] = None, hook: Optional[Callable] = None) -> Tensor:  # fmt: skip
    r"""Training-mode batch norm of ``x`` with statistics computed beforehand.

    .. math::
        y = \gamma\,\frac{x - s - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with ``stats = (mu, sigma^2, n, s)`` (``(C,)``, or ``(K, C)`` with ``chunk`` samples per
    part); gradients as if the statistics were computed from ``x`` inside (see the module
    docstring). ``hook(local_sums) -> (global_sums, n)`` all-reduces the two backward sums.

    Example::

        >>> st = moments(x)
        >>> y = normalize(x, st, weight, bias, 1e-5)     # == batch_norm(x, None, None, weight, bias, True)
    """
    w, b = affine_args(x, weight, bias)
    work = stats.mean.dtype
    w = None if w is None else w.to(work)
    b = None if b is None else b.to(work)
    return _Normalize.apply(x, w, b, stats.mean.detach(), stats.var.detach(), stats.shift, eps, chunk, hook)
