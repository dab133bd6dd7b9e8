"""Tier 3: the launchers registered as ``torch.library`` custom ops.

``batchnorm::bn_act_train``, ``batchnorm::bn_act_infer`` and ``batchnorm::bn_act_backward``
each get a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces a
model that uses them without graph breaks, and the two forwards get an autograd
formula that only saves tensors (``x``, the parameters, the ``(C,)`` statistics, and
the residual only when the activation must be recomputed) and calls the backward op.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import launch

# No ``from __future__ import annotations`` here: torch.library.custom_op reads the annotations
# as objects, and torch 2.4-2.6 reject string annotations ("unsupported type Tensor").
_Stats = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _stat_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=torch.float32)


# --- training forward -----------------------------------------------------------------


@torch.library.custom_op("batchnorm::bn_act_train", mutates_args=())
def bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                 eps: float, activation: str) -> _Stats:
    """``(y, mean, rstd, shift, dmean)`` of the fused training forward (see :func:`launch.train_forward`)."""
    return launch.train_forward(x, weight, bias, residual, eps, activation)


@bn_act_train.register_fake
def _(x, weight, bias, residual, eps, activation):
    return (launch.output_like(x),) + tuple(_stat_like(x) for _ in range(4))


def _train_setup(ctx, inputs, output):
    x, weight, bias, residual, _eps, activation = inputs
    _, _, rstd, shift, dmean = output
    keep_res = residual if (residual is not None and activation != "identity") else None
    ctx.save_for_backward(x, weight, bias, keep_res, shift, dmean, rstd)
    ctx.activation = activation
    ctx.has_res = residual is not None


def _param_grad(g: Tensor, p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else g.to(p.dtype)


def _res_grad(ctx, dy: Tensor, dres: Tensor) -> Optional[Tensor]:
    if not ctx.has_res:
        return None
    return dy if ctx.activation == "identity" else dres


def _train_backward(ctx, dy, *unused_stat_grads):
    x, weight, bias, residual, shift, dmean, rstd = ctx.saved_tensors
    dx, dgamma, dbeta, dres = bn_act_backward(dy, x, weight, bias, residual, shift, dmean, rstd,
                                              ctx.activation, True, ctx.has_res)
    return dx, _param_grad(dgamma, weight), _param_grad(dbeta, bias), _res_grad(ctx, dy, dres), None, None


bn_act_train.register_autograd(_train_backward, setup_context=_train_setup)


# --- inference forward ----------------------------------------------------------------


@torch.library.custom_op("batchnorm::bn_act_infer", mutates_args=())
def bn_act_infer(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], residual: Optional[Tensor], eps: float, activation: str) -> Tensor:
    """``y`` of the fused inference forward (see :func:`launch.infer_forward`)."""
    return launch.infer_forward(x, running_mean, running_var, weight, bias, residual, eps, activation)


@bn_act_infer.register_fake
def _(x, running_mean, running_var, weight, bias, residual, eps, activation):
    return launch.output_like(x)


def _infer_setup(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, residual, eps, activation = inputs
    keep_res = residual if (residual is not None and activation != "identity") else None
    ctx.save_for_backward(x, running_mean, running_var, weight, bias, keep_res)
    ctx.eps = eps
    ctx.activation = activation
    ctx.has_res = residual is not None


def _infer_backward(ctx, dy):
    x, running_mean, running_var, weight, bias, residual = ctx.saved_tensors
    shift = running_mean.float()
    rstd = torch.rsqrt(running_var.float() + ctx.eps)
    dx, dgamma, dbeta, dres = bn_act_backward(dy, x, weight, bias, residual, shift, torch.zeros_like(shift), rstd,
                                              ctx.activation, False, ctx.has_res)
    return (dx, None, None, _param_grad(dgamma, weight), _param_grad(dbeta, bias), _res_grad(ctx, dy, dres),
            None, None)


bn_act_infer.register_autograd(_infer_backward, setup_context=_infer_setup)


# --- backward ---------------------------------------------------------------------------


@torch.library.custom_op("batchnorm::bn_act_backward", mutates_args=())
def bn_act_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], shift: Tensor, dmean: Tensor, rstd: Tensor, activation: str,
                    training: bool, need_dres: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dgamma, dbeta, dres)`` (see :func:`launch.backward`). Not differentiable again."""
    return launch.backward(dy, x, weight, bias, residual, shift, dmean, rstd, activation, training, need_dres)


@bn_act_backward.register_fake
def _(dy, x, weight, bias, residual, shift, dmean, rstd, activation, training, need_dres):
    if need_dres and activation != "identity":
        dres = launch.output_like(residual if residual is not None else x)
    else:
        dres = x.new_empty((0,))
    return launch.output_like(x), _stat_like(x), _stat_like(x), dres


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward (a gradient of a gradient) through the Triton batch-norm kernels is not "
        "implemented; use backend='aten' for this layer (batchnorm.functional.batch_norm(..., backend='aten') "
        "or the module's backend='aten'), which supports it."
    )


# create_graph=True works; only differentiating the backward itself raises, with that message
bn_act_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --- running statistics -----------------------------------------------------------------


@torch.library.custom_op("batchnorm::bn_running_update", mutates_args=("running_mean", "running_var",
                                                                      "num_batches_tracked"))
def bn_running_update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                      mean: Tensor, rstd: Tensor, eps: float, count: int, momentum: Optional[float]) -> None:
    """In-place running-statistics update in one launch (see :func:`launch.running_stats_update`):
    ``num_batches_tracked += 1``; ``running <- running + w * (batch - running)`` for the mean and the
    unbiased variance, ``w = momentum`` or ``1 / num_batches_tracked`` when ``momentum`` is None.

    Example::

        >>> y, mean, rstd, _, _ = bn_act_train(x, w, b, None, 1e-5, "relu")
        >>> bn_running_update(rm, rv, nbt, mean, rstd, 1e-5, x.numel() // x.shape[1], 0.1)
    """
    launch.running_stats_update(running_mean, running_var, num_batches_tracked, mean, rstd, eps, count, momentum)


@bn_running_update.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, rstd, eps, count, momentum):
    return None
