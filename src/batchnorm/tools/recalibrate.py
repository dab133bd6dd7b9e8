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
``M_{2,k} = n_k * var_k`` (Chan et al.'s exact merge, :func:`batchnorm.functional.stats.merge`).
This is the mean and (unbiased, PyTorch's convention for ``running_var``) variance of the
union of all the batches - *not* the average of per-batch variances that
``momentum=None`` computes, which ignores the spread of the batch means and weights
batches of unequal size wrongly.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..functional.stats import merge, moments, param_view
from ..nn.kinds import batchnorm_modules, has_running_stats, is_frozen

__all__ = ["recalibrate"]


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
    (:func:`batchnorm.functional.stats.moments`: the library's one precision rule, exact for large
    reductions and re-centred at large offsets) and stores
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
            st = moments(x)  # the one precision rule: blocks for large reductions, a shift far from zero
            mean, var = st.total_mean(torch.float64), st.var.double()
            if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
                raise ValueError(
                    f"recalibrate: batch {seen + 1}: the input of batch norm '{name}' contains NaN or Inf "
                    f"(or overflows); running statistics left unchanged - clean the data or find the layer "
                    f"that produces it"
                )
            parts[name].append((st.count, mean, var))
            bn.running_mean.copy_(st.mean)
            bn.running_var.copy_(st.var)
            if st.shift is not None:
                # Far from zero, a float32 mean is off by ulp(mean): feed the BN the exactly shifted
                # input x - s with the small residual mean, so its normalization stays exact too.
                return (x - param_view(st.shift, x.dim()),) + tuple(args[1:])
            return None

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
            n, mean, var = merge(counts, torch.stack([p[1] for p in parts[name]]), torch.stack([p[2] for p in parts[name]]))
            m2 = var * n
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
