r"""Precise batch-norm statistics: replace each BN's running estimates by the exact
population statistics of its input over a set of batches.

The moving average that training leaves in ``running_mean``/``running_var`` lags behind
the weights and mixes statistics of many past weight states. After the weights change
without the statistics following (weight averaging, pruning, fine-tuning with frozen
statistics, a learning-rate drop) the eval-mode model is off. :func:`recalibrate` runs the
model over ``K`` batches and sets, per BN and channel,

.. math::
    n = \sum_k n_k,\qquad \hat\mu = \frac1n \sum_k n_k \mu_k,\qquad
    \hat\sigma^2 = \frac{1}{n - 1}\Big(\sum_k M_{2,k} + \sum_k n_k (\mu_k - \hat\mu)^2\Big)

where batch ``k`` has ``n_k`` values per channel with mean ``mu_k`` and
``M_{2,k} = n_k * var_k`` (Chan et al.'s exact merge, :func:`merge_moments`).
This is the mean and (unbiased, PyTorch's convention for ``running_var``) variance of the
union of all the batches - *not* the average of per-batch variances that
``momentum=None`` computes, which ignores the spread of the batch means and weights
batches of unequal size wrongly.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ..nn.kinds import batchnorm_modules, has_running_stats, is_frozen

__all__ = ["recalibrate", "channel_moments", "merge_moments"]

#: a channel is off-centre when ``|mean| > SHIFT_LIMIT * std``: its float32 mean is then re-measured about
#: the rounded mean (an exact subtraction), as the library's batch norms do
SHIFT_LIMIT = 8.0


def _var_mean(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel biased variance and mean. The native statistics kernel is fast and accurate for
    contiguous ``(N, C, *spatial)`` input with more than one spatial value; for ``(N, C)``, ``(N, C, 1)``
    and channels_last it sums in float32 (relative error 1e-4 at 2**20 values per channel), so those
    go through ``torch.var_mean``, which accumulates in float64 on the CPU."""
    if x.dim() > 2 and x.is_contiguous() and x[0, 0].numel() > 1:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return var, mean
    return torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=0)


def channel_moments(x: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    r"""Per-channel count, mean and biased variance of ``(N, C, *)`` input, in float64.

    Returns ``(n, mean, var, shift)`` with ``n = N * prod(*)``, ``mean``/``var`` of shape ``(C,)``
    over ``(N, *)``, and ``shift`` (``(C,)`` in ``x``'s dtype, or ``None``): for an input whose
    channels are off-centre (``|mean| > SHIFT_LIMIT * std``) the moments are re-measured on
    ``x - shift`` with ``shift`` the mean rounded to ``x``'s dtype (an exact subtraction), so
    ``mean = shift + mean(x - shift)`` keeps the digits a float32 mean would lose.
    float16/bfloat16 are read in float32.

    Example::

        >>> n, mean, var, shift = channel_moments(torch.randn(8, 3, 4, 4))   # n = 128, shapes (3,)
    """
    c = x.shape[1]
    n = x.numel() // c if c else 0
    xs = x.detach()
    if xs.dtype in (torch.float16, torch.bfloat16):
        xs = xs.float()
    var, mean = _var_mean(xs)
    shift = None
    if xs.dtype != torch.float64 and n and bool((mean.abs() > SHIFT_LIMIT * var.sqrt()).any()):
        shift = mean.to(x.dtype)
        view = (1, c) + (1,) * (x.dim() - 2)
        var, res = _var_mean(xs - shift.to(xs.dtype).view(view))
        return n, shift.double() + res.double(), var.double(), shift
    return n, mean.double(), var.double(), shift


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    r"""Exact merge of per-part ``(n_k, mean_k, M2_k)`` into the whole's ``(n, mean, M2)`` (Chan et al. 1979).

    ``counts``: ``(K,)``; ``means``, ``m2s``: ``(K, C)`` with ``M2 = sum (x - mean)^2``. Returns
    ``n = sum n_k``, ``mean = sum n_k mean_k / n`` and ``M2 = sum M2_k + sum n_k (mean_k - mean)^2``.

    Example::

        >>> n, mean, m2 = merge_moments(torch.tensor([3., 5.]), torch.zeros(2, 4), torch.ones(2, 4))
    """
    counts = counts.to(means.dtype)
    n = counts.sum()
    mean = (counts.unsqueeze(1) * means).sum(0) / n.clamp_min(1)
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean).square()).sum(0)
    return n, mean, m2


def _default_call(model: nn.Module, batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])  # (inputs, targets) as a DataLoader yields them
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"recalibrate: cannot feed a batch of type {type(batch).__name__} to the model; pass tensors, "
        f"(input, target) tuples, dicts of keyword arguments, or forward_fn=lambda model, batch: ..."
    )


def _progress(total: int, quiet: bool):
    """A tqdm bar on a terminal (``None`` when quiet, not a tty, or tqdm is missing)."""
    if quiet or not getattr(sys.stderr, "isatty", lambda: False)():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="recalibrate", unit="batch", file=sys.stderr)


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int = 200,
    *,
    forward_fn: Optional[Callable] = None,
    quiet: bool = False,
) -> Dict[str, int]:
    r"""Set every batch norm's running statistics to the exact pooled statistics of its input.

    Runs ``model`` on up to ``num_batches`` batches from ``batches`` with every batch norm
    normalizing by the statistics of the current batch (as in training) and every other
    module in eval mode (dropout off, as at inference), then writes per BN, in place:
    ``running_mean`` = the mean of all values its input took, ``running_var`` = their
    unbiased variance (pooled with Chan's merge in float64, see the module docstring), and
    ``num_batches_tracked +=`` the number of batches it saw (calls, for a BN used twice per
    forward). Nothing else changes: parameters and all other buffers stay bit-identical, and the
    training mode of every module is restored in ``try/finally``. If a batch raises - including
    the ``ValueError`` for a batch norm input with NaN/Inf - the running statistics are restored
    to their values before the call and the error propagates: non-finite data never reaches them.

    How: a forward pre-hook on each BN computes the batch's per-channel ``(n_k, mu_k, var_k)``
    (:func:`channel_moments`: one read of the BN input, re-centred at large offsets) and stores
    them as the BN's running statistics, and the BN runs in eval mode - which then normalizes
    with exactly the batch statistics (for channels with ``|mean| > SHIFT_LIMIT * std``, 8 std,
    the hook hands the BN ``x - s`` with ``s`` the mean rounded to the input dtype, an exact
    subtraction, so float32 rounding of a large mean does not shift the normalized output). So
    the cost is that of plain eval-mode forwards plus one statistics pass per BN, whatever the
    BN variant (renorm, ghost, torch.nn's, this library's, with extras such as an activation),
    and momentum is not touched. Frozen batch norms are left alone.

    Args:
        model: any module containing batch norms with ``track_running_stats=True`` (those
            without running statistics, and frozen batch norms, are left alone).
        batches: iterable of tensors, ``(input, target, ...)`` tuples/lists (the first item is
            fed), or dicts of keyword arguments; e.g. a ``DataLoader``.
        num_batches: at most this many batches are used (must be >= 1).
        forward_fn: ``forward_fn(model, batch)`` to feed a batch some other way.
        quiet: no progress bar (it is also off when stderr is not a terminal).

    Returns:
        ``{bn_name: n}``: the number of values per channel pooled for each batch norm
        (0 for a batch norm the batches never reached; its statistics are kept).

    Shapes: each BN sees ``(N, C, *)``; ``n`` sums ``N * prod(spatial)`` over the batches.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> counts = recalibrate(model, [torch.randn(16, 3, 8, 8) for _ in range(10)], quiet=True)
        >>> counts                            # {'1': 5760}: 10 batches x 16 x 6 x 6
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate expects an nn.Module, got {type(model).__name__}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    try:
        batch_iter = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches (e.g. a DataLoader), got {type(batches).__name__}") from None
    call = forward_fn or _default_call
    bns = [(name, bn) for name, bn in batchnorm_modules(model) if has_running_stats(bn) and not is_frozen(bn)]
    if not bns:
        raise ValueError("recalibrate: the model has no batch norm with running statistics; nothing to recalibrate")

    saved = {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in bns}
    modes = [(m, m.training) for m in model.modules()]
    parts: Dict[str, list] = {name: [] for name, _ in bns}

    def make_hook(name):
        def hook(bn, args):
            x = args[0]
            n, mean, var, shift = channel_moments(x)
            if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
                raise ValueError(
                    f"recalibrate: batch {seen + 1}: the input of batch norm '{name}' contains NaN or Inf "
                    f"(or overflows); running statistics left unchanged - clean the data or find the layer "
                    f"that produces it"
                )
            parts[name].append((n, mean, var * n))
            if shift is None:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                return None
            # Far from zero, a float32 running mean is off by ulp(mean): feed the BN the exactly shifted
            # input x - shift with the small residual mean, so it normalizes with exactly these statistics.
            bn.running_mean.copy_(mean - shift.double())
            bn.running_var.copy_(var)
            return (x - shift.view((1, -1) + (1,) * (x.dim() - 2)),) + tuple(args[1:])

        return hook

    handles = []
    bar = _progress(num_batches, quiet)
    seen = 0
    ok = False
    try:
        model.eval()
        for name, bn in bns:
            handles.append(bn.register_forward_pre_hook(make_hook(name)))
        for batch in batch_iter:
            call(model, batch)
            seen += 1
            if bar is not None:
                bar.update(1)
            if seen >= num_batches:
                break
        if seen == 0:
            raise ValueError("recalibrate: batches yielded no batch; running statistics left unchanged")
        results = {}
        for name, bn in bns:
            if not parts[name]:
                results[name] = None
                continue
            counts = torch.tensor([p[0] for p in parts[name]], dtype=torch.float64)
            n, mean, m2 = merge_moments(
                counts, torch.stack([p[1] for p in parts[name]]), torch.stack([p[2] for p in parts[name]])
            )
            if n < 2:
                raise ValueError(
                    f"recalibrate: batch norm '{name}' saw {int(n)} value(s) per channel in total; "
                    f"the unbiased variance needs at least 2 - pass more or larger batches"
                )
            results[name] = (int(n), mean, m2 / (n - 1))
        ok = True
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.train(mode)
        if bar is not None:
            bar.close()
        for name, bn in bns:
            rm, rv = saved[name]
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
    counts_out = {}
    for name, bn in bns:
        res = results[name] if ok else None
        if res is None:
            counts_out[name] = 0
            continue
        n, mean, var = res
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if isinstance(getattr(bn, "num_batches_tracked", None), torch.Tensor):
            bn.num_batches_tracked.add_(len(parts[name]))
        counts_out[name] = n
    return counts_out
