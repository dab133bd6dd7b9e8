"""Normalization written plainly in NumPy float64: the teaching code and the test oracle.

Every normalization in this library is the same three steps over different axes:

1. **moments** over the reduction axes ``A`` of ``x`` (``m = prod(x.shape[a] for a in A)``)::

       mu      = (1/m) * sum_A x
       sigma^2 = (1/m) * sum_A (x - mu)^2          # biased: the normalizing variance

   computed in two passes (first the mean, then squared deviations from it),
   never as ``E[x^2] - E[x]^2``, which cancels catastrophically when ``|mu| >> sigma``;
2. **normalize**: ``xhat = (x - mu) * rstd`` with ``rstd = 1 / sqrt(sigma^2 + eps)``;
3. **affine**: ``y = gamma * xhat + beta``.

Batch norm reduces over ``(N, *spatial)`` per channel (axes ``(0, 2, 3, ...)``),
layer norm over the trailing normalized dimensions per sample, instance norm over
the spatial dimensions per (sample, channel); group norm reshapes ``(N, C, *)`` to
``(N, G, C/G, *)`` and reduces over ``(2, 3, ...)``.

The backward pass (Ioffe & Szegedy, 2015, section 3) follows from the chain rule.
Write ``g = dL/dxhat = dy * gamma`` and let ``mean_A`` average over the reduction
axes. Because ``mu`` and ``sigma`` both depend on every element of the group::

       dL/dx     = rstd * (g - mean_A(g) - xhat * mean_A(g * xhat))
       dL/dgamma = sum over the non-parameter axes of dy * xhat
       dL/dbeta  = sum over the non-parameter axes of dy

The running (moving-average) statistics follow PyTorch's convention: with
momentum ``m`` (weight of the *new* batch)::

       running_mean <- (1 - m) * running_mean + m * mu
       running_var  <- (1 - m) * running_var  + m * sigma^2 * k / (k - 1)   # unbiased

where ``k`` is the number of values per channel. ``momentum=None`` means the
cumulative average: ``m = 1 / t`` at the ``t``-th update (``t`` counted from 1).
Keras and the original papers speak of a *decay* ``d`` instead: ``m = 1 - d``
(decay 0.99 is momentum 0.01; PyTorch's default 0.1 is decay 0.9).

This module imports NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "Moments",
    "moments",
    "normalize",
    "normalize_backward",
    "batch_norm_axes",
    "param_shape",
    "batch_norm_train",
    "batch_norm_eval",
    "batch_norm_backward",
    "running_update",
    "running_stats_after",
    "batch_renorm_train",
    "batch_renorm_backward",
    "group_norm",
    "layer_norm",
    "instance_norm",
    "chan_merge",
]


@dataclass(frozen=True)
class Moments:
    """Statistics of one normalization group, broadcastable against ``x``.

    ``mean``/``var`` keep the reduced axes as size-1 dimensions; ``count`` is the
    number of values ``m`` averaged per group.
    """

    mean: np.ndarray
    var: np.ndarray  # biased (divide by m)
    count: int

    @property
    def var_unbiased(self) -> np.ndarray:
        """``var * m / (m - 1)``: the estimate of the population variance."""
        return self.var * self.count / (self.count - 1)


def _as64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def moments(x: np.ndarray, axes: Sequence[int]) -> Moments:
    """Mean and biased variance of ``x`` over ``axes``, in two passes (float64)."""
    x = _as64(x)
    axes = tuple(int(a) % x.ndim for a in axes)
    count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return Moments(mean=mean, var=var, count=count)


def normalize(x: np.ndarray, axes: Sequence[int], eps: float):
    """``xhat = (x - mean) / sqrt(var + eps)`` over ``axes``; returns ``(xhat, rstd, moments)``."""
    st = moments(x, axes)
    rstd = 1.0 / np.sqrt(st.var + eps)
    return (_as64(x) - st.mean) * rstd, rstd, st


def normalize_backward(g: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Gradient through ``xhat = (x - mean(x)) * rstd(x)`` given ``g = dL/dxhat``.

    ``dx = rstd * (g - mean_A(g) - xhat * mean_A(g * xhat))``.
    """
    axes = tuple(int(a) % xhat.ndim for a in axes)
    g = _as64(g)
    return rstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))


def batch_norm_axes(ndim: int) -> tuple[int, ...]:
    """Reduction axes of batch norm for an ``(N, C, *spatial)`` input: all but the channel axis."""
    if ndim < 2:
        raise ValueError(f"batch norm needs an input of shape (N, C, *), got {ndim} dimension(s)")
    return (0,) + tuple(range(2, ndim))


def param_shape(ndim: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``(N, C, *spatial)``."""
    return (1, -1) + (1,) * (ndim - 2)


def _affine(xhat, gamma, beta, ndim):
    y = xhat
    if gamma is not None:
        y = y * _as64(gamma).reshape(param_shape(ndim))
    if beta is not None:
        y = y + _as64(beta).reshape(param_shape(ndim))
    return y


@dataclass(frozen=True)
class BatchNormCache:
    """What the closed-form backward needs: ``xhat``, ``rstd`` and ``gamma``."""

    xhat: np.ndarray
    rstd: np.ndarray
    gamma: np.ndarray | None
    moments: Moments


def batch_norm_train(x, gamma=None, beta=None, eps: float = 1e-5):
    """Training-mode batch norm (Ioffe & Szegedy 2015, Algorithm 1) of ``(N, C, *)`` input.

    Returns ``(y, cache)``; ``cache.moments`` holds the batch mean and biased variance
    (shape ``(1, C, 1, ...)``) used for the running-statistics update.
    """
    x = _as64(x)
    axes = batch_norm_axes(x.ndim)
    xhat, rstd, st = normalize(x, axes, eps)
    return _affine(xhat, gamma, beta, x.ndim), BatchNormCache(xhat, rstd, gamma, st)


def batch_norm_eval(x, running_mean, running_var, gamma=None, beta=None, eps: float = 1e-5):
    """Inference-mode batch norm: ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``."""
    x = _as64(x)
    shape = param_shape(x.ndim)
    xhat = (x - _as64(running_mean).reshape(shape)) / np.sqrt(_as64(running_var).reshape(shape) + eps)
    return _affine(xhat, gamma, beta, x.ndim)


def batch_norm_backward(dy, cache: BatchNormCache):
    """Closed-form gradients ``(dx, dgamma, dbeta)`` of training-mode batch norm."""
    dy = _as64(dy)
    axes = batch_norm_axes(dy.ndim)
    g = dy if cache.gamma is None else dy * _as64(cache.gamma).reshape(param_shape(dy.ndim))
    dx = normalize_backward(g, cache.xhat, cache.rstd, axes)
    dgamma = (dy * cache.xhat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return dx, dgamma, dbeta


def running_update(running_mean, running_var, st: Moments, momentum: float | None, step: int):
    """One update of the running statistics; ``step`` is the 1-based count of updates so far.

    Returns new ``(running_mean, running_var)`` as flat float64 arrays.
    """
    if st.count < 2:
        raise ValueError("the running variance needs at least 2 values per channel")
    m = 1.0 / step if momentum is None else float(momentum)
    mean = st.mean.reshape(-1)
    var_u = st.var_unbiased.reshape(-1)
    return (1 - m) * _as64(running_mean) + m * mean, (1 - m) * _as64(running_var) + m * var_u


def running_stats_after(batches, momentum: float | None, init_mean=None, init_var=None):
    """Running statistics after training-mode steps on each ``(N, C, *)`` array of ``batches``.

    Starts from ``init_mean`` (zeros) and ``init_var`` (ones), as torch.nn does.
    """
    rm = rv = None
    for t, xb in enumerate(batches, start=1):
        st = moments(xb, batch_norm_axes(np.ndim(xb)))
        if rm is None:
            c = st.mean.size
            rm = np.zeros(c) if init_mean is None else _as64(init_mean).copy()
            rv = np.ones(c) if init_var is None else _as64(init_var).copy()
        rm, rv = running_update(rm, rv, st, momentum, t)
    return rm, rv


# --- the family: each a different choice of statistics or axes over the same steps ---------


def batch_renorm_train(x, running_mean, running_var, gamma=None, beta=None, eps=1e-5, r_max=3.0, d_max=5.0):
    """Batch renormalization (Ioffe 2017): ``y = gamma * (r * xhat + d) + beta``.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with ``sigma = sqrt(running_var + eps)``, ``sigma_B = sqrt(var_B + eps)``; ``r`` and ``d``
    are constants for the backward. Returns ``(y, cache, r, d)``.
    """
    x = _as64(x)
    axes = batch_norm_axes(x.ndim)
    shape = param_shape(x.ndim)
    xhat, rstd, st = normalize(x, axes, eps)
    sigma = np.sqrt(_as64(running_var).reshape(shape) + eps)
    r = np.clip(np.sqrt(st.var + eps) / sigma, 1.0 / r_max, r_max)
    d = np.clip((st.mean - _as64(running_mean).reshape(shape)) / sigma, -d_max, d_max)
    y = _affine(r * xhat + d, gamma, beta, x.ndim)
    return y, BatchNormCache(xhat, rstd, gamma, st), r, d


def batch_renorm_backward(dy, cache: BatchNormCache, r, d):
    """Gradients of batch renorm with ``r``, ``d`` held constant: ``(dx, dgamma, dbeta)``."""
    dy = _as64(dy)
    axes = batch_norm_axes(dy.ndim)
    g = dy if cache.gamma is None else dy * _as64(cache.gamma).reshape(param_shape(dy.ndim))
    dx = normalize_backward(g * r, cache.xhat, cache.rstd, axes)
    dgamma = (dy * (r * cache.xhat + d)).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return dx, dgamma, dbeta


def group_norm(x, num_groups: int, gamma=None, beta=None, eps=1e-5):
    """Group norm (Wu & He 2018): statistics per (sample, group of C/G channels); per-channel affine."""
    x = _as64(x)
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {c} channels")
    xg = x.reshape(n, num_groups, -1)
    xhat, _, _ = normalize(xg, (2,), eps)
    return _affine(xhat.reshape(x.shape), gamma, beta, x.ndim)


def layer_norm(x, normalized_shape, gamma=None, beta=None, eps=1e-5):
    """Layer norm (Ba et al. 2016): statistics over the trailing ``normalized_shape``; elementwise affine."""
    x = _as64(x)
    k = len(tuple(normalized_shape))
    xhat, _, _ = normalize(x, tuple(range(x.ndim - k, x.ndim)), eps)
    if gamma is not None:
        xhat = xhat * _as64(gamma)
    if beta is not None:
        xhat = xhat + _as64(beta)
    return xhat


def instance_norm(x, gamma=None, beta=None, eps=1e-5):
    """Instance norm (Ulyanov et al. 2016): statistics per (sample, channel) over the spatial axes."""
    x = _as64(x)
    xhat, _, _ = normalize(x, tuple(range(2, x.ndim)), eps)
    return _affine(xhat, gamma, beta, x.ndim)


def chan_merge(counts, means, m2s):
    """Merge per-part ``(count, mean, M2)`` into the whole's, exactly (Chan et al. 1979).

    ``M2 = sum (x - mean)^2``. For two parts ``a`` and ``b`` with ``n = n_a + n_b`` and
    ``delta = mean_b - mean_a``: ``mean = mean_a + delta * n_b / n`` and
    ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``. Parts with count 0 are skipped.
    Returns ``(count, mean, M2)``.
    """
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in zip(counts, means, m2s):
        if nb == 0:
            continue
        mb, m2b = _as64(mb), _as64(m2b)
        if n == 0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        tot = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta**2 * (n * nb / tot)
        n = tot
    return n, mean, m2
