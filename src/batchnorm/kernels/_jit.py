r"""Tier 1: the ``@triton.jit`` kernels. Only Triton and pointer arithmetic live here.

The derivation these kernels implement is written out in ``docs/kernels.md``; the
symbols below are the ones used there.

Data view
---------
Every tensor is seen as ``(N', C, S')`` with its own strides ``(s_n, s_c, s_s)``
(the host launcher builds the view: ``(N, C, prod(spatial))``, or ``(1, C, N*S)``
when batch and spatial indices merge into one "row" axis, e.g. channels_last or
``(N, C)`` inputs). A *tile* is ``BLOCK_C`` channels by ``BLOCK_S`` consecutive
``s`` indices of one ``n``; the ``T = N' * ceil(S'/BLOCK_S)`` tiles of a channel
block are split into contiguous ranges, one per program along grid axis 1. Batch
and spatial sizes are runtime arguments: only the block sizes are compile-time.

Statistics (forward, pass 1)
----------------------------
Each channel is shifted by ``k_c = x[0, c, 0]`` (exact in float32 for values near
``k_c``), so ``v = x - k`` is small even when ``|mean| >> std``. Each tile gives an
exact-in-registers two-pass ``(n_t, mean_t, M2_t)`` of ``v``; tiles are merged into
the program's running ``(n_a, mean_a, M2_a)`` with Chan's formula::

    delta = mean_t - mean_a,  n = n_a + n_t
    mean  = mean_a + delta * n_t / n
    M2    = M2_a + M2_t + delta^2 * n_a * n_t / n

and the per-program partials are merged the same way, in a fixed order, by the
programs of pass 2 (deterministic, no atomics). The channel mean is
``mu = k + d`` with ``d = mean(v)``; normalization uses ``xhat = ((x - k) - d) * rstd``
so the float32 rounding of ``mu`` never enters ``xhat``.

Backward
--------
``z = gamma * xhat + beta [+ r]``, ``y = act(z)``, ``g = dy * act'(z)`` (recomputed
from ``x``; for a residual ``g`` is written once as ``d r`` and re-read). Pass 1
reduces ``sum(g)`` and ``sum(g * xhat)`` per program; pass 2 merges the partials and
writes ``dx = gamma * rstd * (g - sum(g)/m - xhat * sum(g*xhat)/m)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(t, n_sblocks, c, C, S, BLOCK_S: tl.constexpr):
    """Indices of tile ``t``: batch index ``n`` (int64), spatial offsets ``s`` (int64), 2-D mask, element count.

    ``s`` is formed in int64 *before* the multiply: with merged rows ``S' = N * S`` can pass
    2**31 (e.g. channels_last with few channels), where ``sb * BLOCK_S`` in int32 would wrap.
    """
    n = t // n_sblocks
    sb = (t - n * n_sblocks).to(tl.int64)
    s0 = sb * BLOCK_S
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (c[:, None] < C) & (s[None, :] < S)
    n_t = tl.minimum(S - s0, BLOCK_S).to(tl.float32)
    return n.to(tl.int64), s, mask, n_t


@triton.jit
def _act(z, ACT: tl.constexpr):
    """``act(z)`` for the fused activation."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _act_grad(dy, z, ACT: tl.constexpr):
    """``dy * act'(z)``: ReLU's derivative is 0 at ``z = 0`` (as PyTorch's);
    SiLU's is ``sig(z) * (1 + z * (1 - sig(z)))``."""
    if ACT == 1:
        dy = tl.where(z > 0.0, dy, 0.0)
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-z))
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy


@triton.jit
def _merge_partials(PCOUNT, PMEAN, PM2, c, C, n_split, BLOCK_C: tl.constexpr):
    """Chan-merge ``n_split`` partial ``(count, mean, M2)`` rows of ``(n_split, C)`` buffers in order."""
    cmask = c < C
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for j in range(n_split):
        n_b = tl.load(PCOUNT + j * C + c, mask=cmask, other=0.0)
        mean_b = tl.load(PMEAN + j * C + c, mask=cmask, other=0.0)
        m2_b = tl.load(PM2 + j * C + c, mask=cmask, other=0.0)
        n = cnt + n_b
        frac = tl.where(n > 0.0, n_b / tl.maximum(n, 1.0), 0.0)
        delta = mean_b - mean
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * cnt * frac
        cnt = n
    return cnt, mean, m2


@triton.jit
def _program_channels(C, BLOCK_C: tl.constexpr):
    """This program's place in the grid: split index ``j`` (axis 1) and its block of channels
    ``c`` (axis 0), their mask, and ``c`` as int64 for pointer arithmetic."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.program_id(1), c, c < C, c.to(tl.int64)


@triton.jit
def _affine_params(W, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel ``gamma`` (1 without a weight) and ``beta`` (0 without a bias), in float32."""
    if HAS_W:
        gamma = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_B:
        beta = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([BLOCK_C], tl.float32)
    return gamma, beta


@triton.jit
def _saved_stats(SHIFT, DMEAN, RSTD, c, cmask):
    """The forward's saved per-channel ``(shift k, mean - k, rstd)`` for the backward kernels."""
    k = tl.load(SHIFT + c, mask=cmask, other=0.0)
    d = tl.load(DMEAN + c, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + c, mask=cmask, other=0.0)
    return k, d, rstd


@triton.jit
def bn_stats_partial_kernel(
    X, sxn, sxc, sxs,            # input view (N', C, S') and its strides
    PCOUNT, PMEAN, PM2,          # out: (n_split, C) float32 partial count / mean of x-k / M2
    C, S,                        # channels, S' (runtime)
    n_sblocks, n_tiles, tiles_per_prog,  # tiling of the N' * ceil(S'/BLOCK_S) tiles of a channel block
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Pass 1 of the training forward: per-program ``(count, mean, M2)`` of ``x - k`` per channel."""
    j, c, cmask, c64 = _program_channels(C, BLOCK_C)
    k = tl.load(X + c64 * sxc, mask=cmask, other=0.0).to(tl.float32)  # shift k_c = x[0, c, 0]
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    t_begin = j * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    for t in range(t_begin, t_end):
        n, s, mask, n_t = _tile(t, n_sblocks, c, C, S, BLOCK_S)
        x = tl.load(X + n * sxn + c64[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0)
        v = tl.where(mask, x.to(tl.float32) - k[:, None], 0.0)
        mean_t = tl.sum(v, axis=1) / n_t
        dev = tl.where(mask, v - mean_t[:, None], 0.0)
        m2_t = tl.sum(dev * dev, axis=1)
        n_new = cnt + n_t
        frac = n_t / n_new
        delta = mean_t - mean
        mean = mean + delta * frac
        m2 = m2 + m2_t + delta * delta * cnt * frac
        cnt = n_new
    tl.store(PCOUNT + j * C + c, cnt, mask=cmask)
    tl.store(PMEAN + j * C + c, mean, mask=cmask)
    tl.store(PM2 + j * C + c, m2, mask=cmask)


@triton.jit
def bn_apply_kernel(
    X, sxn, sxc, sxs,            # input view (N', C, S')
    Y, syn, syc, sys,            # out: y, same view
    R, srn, src, srs,            # residual (read iff HAS_RES)
    W, B,                        # gamma, beta (C,) (read iff HAS_W / HAS_B)
    PCOUNT, PMEAN, PM2, n_split,  # training: partials from pass 1
    RM, RV,                      # inference: running mean / var (C,)
    MEAN, RSTD, SHIFT, DMEAN,    # training out: mu = k + d, rstd, k, d (C,) float32
    C, S, eps,
    n_sblocks, n_tiles, tiles_per_prog,
    TRAINING: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Pass 2 of the training forward, or the whole inference forward:
    ``y = act(gamma * ((x - k) - d) * rstd + beta [+ r])``.

    Training: ``k = x[0, c, 0]``, ``(d, var)`` from the merged partials, ``rstd = 1/sqrt(var + eps)``;
    the programs with ``program_id(1) == 0`` also write the statistics.
    Inference: ``k = running_mean``, ``d = 0``, ``rstd = 1/sqrt(running_var + eps)`` (no folding
    into ``x * scale + shift``, which cancels when ``|running_mean| >> std``).
    """
    j, c, cmask, c64 = _program_channels(C, BLOCK_C)
    if TRAINING:
        k = tl.load(X + c64 * sxc, mask=cmask, other=0.0).to(tl.float32)
        cnt, d, m2 = _merge_partials(PCOUNT, PMEAN, PM2, c, C, n_split, BLOCK_C)
        var = tl.maximum(m2 / tl.maximum(cnt, 1.0), 0.0)  # masked lanes: cnt = 0
        rstd = tl.rsqrt(var + eps)
        if j == 0:
            tl.store(MEAN + c, k + d, mask=cmask)
            tl.store(RSTD + c, rstd, mask=cmask)
            tl.store(SHIFT + c, k, mask=cmask)
            tl.store(DMEAN + c, d, mask=cmask)
    else:
        k = tl.load(RM + c, mask=cmask, other=0.0).to(tl.float32)
        d = tl.zeros([BLOCK_C], tl.float32)
        rstd = tl.rsqrt(tl.load(RV + c, mask=cmask, other=1.0).to(tl.float32) + eps)
    gamma, beta = _affine_params(W, B, c, cmask, HAS_W, HAS_B, BLOCK_C)
    scale = gamma * rstd
    t_begin = j * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    for t in range(t_begin, t_end):
        n, s, mask, _n_t = _tile(t, n_sblocks, c, C, S, BLOCK_S)
        x = tl.load(X + n * sxn + c64[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        z = ((x - k[:, None]) - d[:, None]) * scale[:, None] + beta[:, None]
        if HAS_RES:
            r = tl.load(R + n * srn + c64[:, None] * src + s[None, :] * srs, mask=mask, other=0.0)
            z = z + r.to(tl.float32)
        y = _act(z, ACT)
        tl.store(Y + n * syn + c64[:, None] * syc + s[None, :] * sys, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bn_bwd_reduce_kernel(
    DY, sdn, sdc, sds,           # upstream gradient dL/dy
    X, sxn, sxc, sxs,            # saved input
    R, srn, src, srs,            # residual (read iff HAS_RES; only needed to recompute z)
    G, sgn, sgc, sgs,            # out iff WRITE_G: g = dy * act'(z) (= d residual)
    W, B, SHIFT, DMEAN, RSTD,    # (C,) gamma, beta, k, d, rstd
    PSUM_G, PSUM_GX,             # out: (n_split, C) float32 partial sum(g), sum(g * xhat)
    C, S,
    n_sblocks, n_tiles, tiles_per_prog,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_G: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Backward pass 1: ``g`` through the fused activation, per-program ``sum(g)``, ``sum(g * xhat)``."""
    j, c, cmask, c64 = _program_channels(C, BLOCK_C)
    k, d, rstd = _saved_stats(SHIFT, DMEAN, RSTD, c, cmask)
    gamma, beta = _affine_params(W, B, c, cmask, HAS_W, HAS_B, BLOCK_C)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    t_begin = j * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    for t in range(t_begin, t_end):
        n, s, mask, _n_t = _tile(t, n_sblocks, c, C, S, BLOCK_S)
        x = tl.load(X + n * sxn + c64[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        xhat = ((x - k[:, None]) - d[:, None]) * rstd[:, None]
        g = tl.load(DY + n * sdn + c64[:, None] * sdc + s[None, :] * sds, mask=mask, other=0.0).to(tl.float32)
        if ACT != 0:
            z = gamma[:, None] * xhat + beta[:, None]
            if HAS_RES:
                r = tl.load(R + n * srn + c64[:, None] * src + s[None, :] * srs, mask=mask, other=0.0)
                z = z + r.to(tl.float32)
            g = _act_grad(g, z, ACT)
        if WRITE_G:
            tl.store(G + n * sgn + c64[:, None] * sgc + s[None, :] * sgs, g.to(G.dtype.element_ty), mask=mask)
        g = tl.where(mask, g, 0.0)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(tl.where(mask, g * xhat, 0.0), axis=1)
    tl.store(PSUM_G + j * C + c, sum_g, mask=cmask)
    tl.store(PSUM_GX + j * C + c, sum_gx, mask=cmask)


@triton.jit
def bn_bwd_dx_kernel(
    DY, sdn, sdc, sds,           # g source: dL/dy (ACT recomputed), or g written by pass 1 (ACT = 0)
    X, sxn, sxc, sxs,            # saved input
    DX, sxgn, sxgc, sxgs,        # out: dL/dx
    W, B, SHIFT, DMEAN, RSTD,    # (C,)
    PSUM_G, PSUM_GX, n_split,    # partials from pass 1
    DW, DB,                      # out (C,) float32: dgamma = sum(g * xhat), dbeta = sum(g)
    C, S, m,                     # m: values per channel (float)
    n_sblocks, n_tiles, tiles_per_prog,
    TRAINING: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Backward pass 2: ``dx = gamma * rstd * (g - sum(g)/m - xhat * sum(g*xhat)/m)`` (training),
    ``dx = gamma * rstd * g`` (inference: the statistics are constants)."""
    j, c, cmask, c64 = _program_channels(C, BLOCK_C)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    for i in range(n_split):
        sum_g += tl.load(PSUM_G + i * C + c, mask=cmask, other=0.0)
        sum_gx += tl.load(PSUM_GX + i * C + c, mask=cmask, other=0.0)
    if j == 0:
        tl.store(DW + c, sum_gx, mask=cmask)
        tl.store(DB + c, sum_g, mask=cmask)
    k, d, rstd = _saved_stats(SHIFT, DMEAN, RSTD, c, cmask)
    gamma, beta = _affine_params(W, B, c, cmask, HAS_W, HAS_B, BLOCK_C)
    c1 = sum_g / m                   # mean of g
    c2 = sum_gx / m                  # mean of g * xhat
    scale = gamma * rstd
    t_begin = j * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    for t in range(t_begin, t_end):
        n, s, mask, _n_t = _tile(t, n_sblocks, c, C, S, BLOCK_S)
        x = tl.load(X + n * sxn + c64[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        xhat = ((x - k[:, None]) - d[:, None]) * rstd[:, None]
        g = tl.load(DY + n * sdn + c64[:, None] * sdc + s[None, :] * sds, mask=mask, other=0.0).to(tl.float32)
        if ACT != 0:
            g = _act_grad(g, gamma[:, None] * xhat + beta[:, None], ACT)
        if TRAINING:
            dx = scale[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        else:
            dx = scale[:, None] * g
        tl.store(DX + n * sxgn + c64[:, None] * sxgc + s[None, :] * sxgs, dx.to(DX.dtype.element_ty), mask=mask)
