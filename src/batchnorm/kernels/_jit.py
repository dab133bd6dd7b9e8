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
and spatial sizes are runtime arguments: only the block sizes and two layout facts
are compile-time:

* ``VEC``: every non-unit stride, the extent along the unit-stride axis and every
  base offset are multiples of ``VEC`` elements (the launcher checks it). The kernels
  round those runtime integers down to multiples of ``VEC`` (a no-op for the values
  passed) so Triton's alignment analysis can prove 16-byte vectors where Triton's own
  specialization (only "divisible by 16" or "equal to 1") cannot, e.g. ``H*W = 196``.
* ``INT64``: offsets are formed in int64 only when some offset of the call can pass
  ``2**31``; int32 offsets otherwise (half the registers per address).

Kernels are built so that Triton 3.0's interpreter can run them: every ``tl.arange``
is taken in the kernel itself and handed to the helpers.

Statistics (forward, pass 1)
----------------------------
Each channel is shifted by ``k_c = x[0, c, 0]`` (exact in float32 for values near
``k_c``), so ``v = x - k`` is small even when ``|mean| >> std``. Each tile gives an
exact-in-registers two-pass ``(n_t, mean_t, M2_t)`` of ``v``; tiles are merged into
the program's running ``(n_a, mean_a, M2_a)`` with Chan's formula::

    delta = mean_t - mean_a,  n = n_a + n_t
    mean  = mean_a + delta * n_t / n
    M2    = M2_a + M2_t + delta^2 * n_a * n_t / n

The per-program partials are merged *once* (:func:`_merge_rows`, the parallel form of
the same formula over a block of rows at a time, in a fixed order: deterministic, no
atomics) - by :func:`bn_stats_finalize_kernel` when there are many, or by each program
of the output pass when there are few (``n_split <= BLOCK_J``: one 2-D load, no extra
launch). The channel mean is ``mu = k + d`` with ``d = mean(v)``; normalization uses
``xhat = ((x - k) - d) * rstd`` so the float32 rounding of ``mu`` never enters ``xhat``.

Backward
--------
``z = gamma * xhat + beta [+ r]``, ``y = act(z)``, ``g = dy * act'(z)`` (recomputed
from ``x``; for a residual ``g`` is written once as ``d r`` and re-read). Pass 1
reduces ``sum(g)`` and ``sum(g * xhat)`` per program; the partials are summed once
(:func:`bn_bwd_finalize_kernel`, or inline for few) and pass 2 writes
``dx = gamma * rstd * (g - sum(g)/m - xhat * sum(g*xhat)/m)``.
"""

# No ``from __future__ import annotations``: Triton 3.0's interpreter recognizes ``tl.constexpr``
# parameters by comparing the annotation objects, and strings never match.
import triton
import triton.language as tl

#: runtime integers Triton must not specialize (on "equal to 1" / "divisible by 16"): sizes and
#: tile counts change with the batch, and a new batch size should not compile new kernels. The
#: alignment the loads need comes from ``VEC`` instead.
RUNTIME_INTS = ["C", "S", "n_sblocks", "n_tiles", "tiles_per_prog", "n_split"]
_kernel = triton.jit(do_not_specialize=RUNTIME_INTS)

#: streamed (activation-sized) pointer parameters of each kernel: name -> (access, flag that
#: enables it or None). The compiled-code check (benchmarks/compiled.py) counts bytes with it.
STREAMED = {
    "bn_stats_partial_kernel": {"X": ("r", None)},
    "bn_apply_kernel": {"X": ("r", None), "Y": ("w", None), "R": ("r", "HAS_RES")},
    "bn_bwd_reduce_kernel": {"DY": ("r", None), "X": ("r", None), "R": ("r", "HAS_RES"), "G": ("w", "WRITE_G")},
    "bn_bwd_dx_kernel": {"DY": ("r", None), "X": ("r", None), "DX": ("w", None)},
}


@triton.jit
def _mult(v, VEC: tl.constexpr):
    """``v`` rounded down to a multiple of ``VEC``: the identity for the extents the launcher
    passes (it checks ``VEC`` divides them), and a proof of divisibility for Triton's
    alignment analysis, which only knows "divisible by 16" of a runtime integer."""
    if VEC > 1:
        v = (v // VEC) * VEC
    return v


@triton.jit
def _tile(t, n_sblocks, c, s_ar, C, S, BLOCK_S: tl.constexpr, VEC: tl.constexpr, C_INNER: tl.constexpr,
          INT64: tl.constexpr):
    """Tile ``t`` of a channel block ``c``: batch index ``n``, spatial indices ``s``
    (``s_ar = arange(0, BLOCK_S)``), the 2-D mask and the element count ``n_t`` (float32).
    The extent along the unit-stride axis is seen as a multiple of ``VEC``."""
    if INT64:
        t = t.to(tl.int64)
    n = t // n_sblocks
    s0 = (t - n * n_sblocks) * BLOCK_S
    s = s0 + s_ar
    if C_INNER:
        mask = (c[:, None] < _mult(C, VEC)) & (s[None, :] < S)
    else:
        mask = (c[:, None] < C) & (s[None, :] < _mult(S, VEC))
    n_t = tl.minimum(S - s0, BLOCK_S).to(tl.float32)
    return n, s, mask, n_t


@triton.jit
def _offsets(n, c, s, sn, sc, ss, VEC: tl.constexpr, C_INNER: tl.constexpr, INT64: tl.constexpr):
    """Element offsets ``n*s_n + c*s_c + s*s_s`` of a ``(BLOCK_C, BLOCK_S)`` tile. The part
    across the unit-stride axis is a multiple of ``VEC`` (the launcher checks the strides)."""
    if INT64:
        c = c.to(tl.int64)
    if C_INNER:
        base = tl.multiple_of(n * sn + s * ss, VEC)
        off = c[:, None] * sc + base[None, :]
    else:
        base = tl.multiple_of(n * sn + c * sc, VEC)
        off = base[:, None] + s[None, :] * ss
    return off


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
def _merge_rows(PCOUNT, PMEAN, PM2, c, cmask, C, n_rows, rows, BLOCK_J: tl.constexpr):
    """Merge the ``n_rows`` partial ``(count, mean, M2)`` rows of ``(n_rows, C)`` buffers for the
    channels ``c``: ``BLOCK_J`` rows at a time with the parallel form of Chan's formula
    (``n = sum n_j``, ``mean = sum n_j mean_j / n``, ``M2 = sum M2_j + n_j (mean_j - mean)^2``),
    the blocks folded in order with the pairwise form. ``rows = arange(0, BLOCK_J)``."""
    cnt = c.to(tl.float32) * 0.0
    mean = cnt
    m2 = cnt
    for j0 in range(0, n_rows, BLOCK_J):
        j = j0 + rows
        mask = (j[:, None] < n_rows) & cmask[None, :]
        off = j[:, None] * C + c[None, :]
        n_b = tl.load(PCOUNT + off, mask=mask, other=0.0)
        mean_b = tl.load(PMEAN + off, mask=mask, other=0.0)
        n_blk = tl.sum(n_b, axis=0)
        mean_blk = tl.sum(n_b * mean_b, axis=0) / tl.maximum(n_blk, 1.0)
        dev = mean_b - mean_blk[None, :]
        m2_blk = tl.sum(tl.load(PM2 + off, mask=mask, other=0.0) + n_b * dev * dev, axis=0)
        n = cnt + n_blk
        frac = tl.where(n > 0.0, n_blk / tl.maximum(n, 1.0), 0.0)
        delta = mean_blk - mean
        mean = mean + delta * frac
        m2 = m2 + m2_blk + delta * delta * cnt * frac
        cnt = n
    return cnt, mean, m2


@triton.jit
def _sum_rows(PSUM_G, PSUM_GX, c, cmask, C, n_rows, rows, BLOCK_J: tl.constexpr):
    """Column sums of two ``(n_rows, C)`` partial buffers, ``BLOCK_J`` rows at a time, in order."""
    sum_g = c.to(tl.float32) * 0.0
    sum_gx = sum_g
    for j0 in range(0, n_rows, BLOCK_J):
        j = j0 + rows
        mask = (j[:, None] < n_rows) & cmask[None, :]
        off = j[:, None] * C + c[None, :]
        sum_g += tl.sum(tl.load(PSUM_G + off, mask=mask, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(PSUM_GX + off, mask=mask, other=0.0), axis=0)
    return sum_g, sum_gx


@triton.jit
def _finish_stats(X, sxc, c, cmask, wmask, cnt, d, m2, eps, MEAN, RSTD, SHIFT, DMEAN):
    """From the merged ``(count, mean of x - k, M2)``: ``k``, ``d`` and ``rstd = 1/sqrt(var + eps)``
    (biased variance), written to the ``(C,)`` outputs where ``wmask``."""
    k = tl.load(X + c.to(tl.int64) * sxc, mask=cmask, other=0.0).to(tl.float32)  # shift k_c = x[0, c, 0]
    var = tl.maximum(m2 / tl.maximum(cnt, 1.0), 0.0)  # masked lanes: cnt = 0
    rstd = tl.rsqrt(var + eps)
    tl.store(MEAN + c, k + d, mask=wmask)
    tl.store(RSTD + c, rstd, mask=wmask)
    tl.store(SHIFT + c, k, mask=wmask)
    tl.store(DMEAN + c, d, mask=wmask)
    return k, rstd


@triton.jit
def _affine_params(W, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel ``gamma`` (1 without a weight) and ``beta`` (0 without a bias), in float32."""
    if HAS_W:
        gamma = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        gamma = tl.where(cmask, 1.0, 1.0)
    if HAS_B:
        beta = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        beta = tl.where(cmask, 0.0, 0.0)
    return gamma, beta


@triton.jit
def _saved_stats(SHIFT, DMEAN, RSTD, c, cmask):
    """The forward's saved per-channel ``(shift k, mean - k, rstd)``."""
    k = tl.load(SHIFT + c, mask=cmask, other=0.0)
    d = tl.load(DMEAN + c, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + c, mask=cmask, other=0.0)
    return k, d, rstd


@_kernel
def bn_stats_partial_kernel(
    X, sxn, sxc, sxs,            # input view (N', C, S') and its strides
    PCOUNT, PMEAN, PM2,          # out: (n_split, C) float32 partial count / mean of x-k / M2
    C, S,                        # channels, S' (runtime)
    n_sblocks, n_tiles, tiles_per_prog,  # tiling of the N' * ceil(S'/BLOCK_S) tiles of a channel block
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr, C_INNER: tl.constexpr, INT64: tl.constexpr,
):
    """Pass 1 of the training forward: per-program ``(count, mean, M2)`` of ``x - k`` per channel."""
    j = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ar = tl.arange(0, BLOCK_S)
    cmask = c < C
    k = tl.load(X + c.to(tl.int64) * sxc, mask=cmask, other=0.0).to(tl.float32)  # shift k_c = x[0, c, 0]
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    t_begin = j * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    for t in range(t_begin, t_end):
        n, s, mask, n_t = _tile(t, n_sblocks, c, s_ar, C, S, BLOCK_S, VEC, C_INNER, INT64)
        x = tl.load(X + _offsets(n, c, s, sxn, sxc, sxs, VEC, C_INNER, INT64), mask=mask, other=0.0)
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


@_kernel
def bn_stats_finalize_kernel(
    X, sxc,                      # input (for the shift k_c = x[0, c, 0]) and its channel stride
    PCOUNT, PMEAN, PM2, n_split,  # partials of pass 1
    MEAN, RSTD, SHIFT, DMEAN,    # out (C,) float32: mu = k + d, rstd, k, d
    C, eps,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Merge the ``n_split`` partials of every channel once (grid ``ceil(C / BLOCK_C)``)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cnt, d, m2 = _merge_rows(PCOUNT, PMEAN, PM2, c, cmask, C, n_split, tl.arange(0, BLOCK_J), BLOCK_J)
    _finish_stats(X, sxc, c, cmask, cmask, cnt, d, m2, eps, MEAN, RSTD, SHIFT, DMEAN)


@_kernel
def bn_apply_kernel(
    X, sxn, sxc, sxs,            # input view (N', C, S')
    Y, syn, syc, sys,            # out: y, same view
    R, srn, src, srs,            # residual (read iff HAS_RES)
    W, B,                        # gamma, beta (C,) (read iff HAS_W / HAS_B)
    PCOUNT, PMEAN, PM2, n_split,  # STATS == 2: partials of pass 1, merged here
    RM, RV,                      # STATS == 0: running mean / var (C,)
    MEAN, RSTD, SHIFT, DMEAN,    # (C,) float32: read (STATS == 1) or written (STATS == 2)
    C, S, eps,
    n_sblocks, n_tiles, tiles_per_prog,
    STATS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
    VEC: tl.constexpr, C_INNER: tl.constexpr, INT64: tl.constexpr,
):
    """The output pass: ``y = act(gamma * ((x - k) - d) * rstd + beta [+ r])``.

    ``STATS`` says where ``(k, d, rstd)`` come from: 0 inference, ``k = running_mean``, ``d = 0``,
    ``rstd = 1/sqrt(running_var + eps)`` (no folding into ``x * scale + shift``, which cancels
    when ``|running_mean| >> std``); 1 training, from :func:`bn_stats_finalize_kernel`'s
    outputs; 2 training with few partials (``n_split <= BLOCK_J``), merged by every program
    (one 2-D load) and written by the programs with ``program_id(1) == 0``.
    """
    j = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ar = tl.arange(0, BLOCK_S)
    cmask = c < C
    if STATS == 0:
        k = tl.load(RM + c, mask=cmask, other=0.0).to(tl.float32)
        d = tl.zeros([BLOCK_C], tl.float32)
        rstd = tl.rsqrt(tl.load(RV + c, mask=cmask, other=1.0).to(tl.float32) + eps)
    elif STATS == 1:
        k, d, rstd = _saved_stats(SHIFT, DMEAN, RSTD, c, cmask)
    else:
        cnt, d, m2 = _merge_rows(PCOUNT, PMEAN, PM2, c, cmask, C, n_split, tl.arange(0, BLOCK_J), BLOCK_J)
        k, rstd = _finish_stats(X, sxc, c, cmask, c < tl.where(j == 0, C, 0), cnt, d, m2, eps, MEAN, RSTD, SHIFT, DMEAN)
    gamma, beta = _affine_params(W, B, c, cmask, HAS_W, HAS_B)
    scale = gamma * rstd
    t_begin = j * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    for t in range(t_begin, t_end):
        n, s, mask, _n_t = _tile(t, n_sblocks, c, s_ar, C, S, BLOCK_S, VEC, C_INNER, INT64)
        x = tl.load(X + _offsets(n, c, s, sxn, sxc, sxs, VEC, C_INNER, INT64), mask=mask, other=0.0).to(tl.float32)
        z = ((x - k[:, None]) - d[:, None]) * scale[:, None] + beta[:, None]
        if HAS_RES:
            r = tl.load(R + _offsets(n, c, s, srn, src, srs, VEC, C_INNER, INT64), mask=mask, other=0.0)
            z = z + r.to(tl.float32)
        y = _act(z, ACT)
        tl.store(Y + _offsets(n, c, s, syn, syc, sys, VEC, C_INNER, INT64), y.to(Y.dtype.element_ty), mask=mask)


@_kernel
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
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr, C_INNER: tl.constexpr, INT64: tl.constexpr,
):
    """Backward pass 1: ``g`` through the fused activation, per-program ``sum(g)``, ``sum(g * xhat)``."""
    j = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ar = tl.arange(0, BLOCK_S)
    cmask = c < C
    k, d, rstd = _saved_stats(SHIFT, DMEAN, RSTD, c, cmask)
    gamma, beta = _affine_params(W, B, c, cmask, HAS_W, HAS_B)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    t_begin = j * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    for t in range(t_begin, t_end):
        n, s, mask, _n_t = _tile(t, n_sblocks, c, s_ar, C, S, BLOCK_S, VEC, C_INNER, INT64)
        x = tl.load(X + _offsets(n, c, s, sxn, sxc, sxs, VEC, C_INNER, INT64), mask=mask, other=0.0).to(tl.float32)
        xhat = ((x - k[:, None]) - d[:, None]) * rstd[:, None]
        g = tl.load(DY + _offsets(n, c, s, sdn, sdc, sds, VEC, C_INNER, INT64), mask=mask, other=0.0).to(tl.float32)
        if ACT != 0:
            z = gamma[:, None] * xhat + beta[:, None]
            if HAS_RES:
                r = tl.load(R + _offsets(n, c, s, srn, src, srs, VEC, C_INNER, INT64), mask=mask, other=0.0)
                z = z + r.to(tl.float32)
            g = _act_grad(g, z, ACT)
        if WRITE_G:
            tl.store(G + _offsets(n, c, s, sgn, sgc, sgs, VEC, C_INNER, INT64), g.to(G.dtype.element_ty), mask=mask)
        g = tl.where(mask, g, 0.0)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(tl.where(mask, g * xhat, 0.0), axis=1)
    tl.store(PSUM_G + j * C + c, sum_g, mask=cmask)
    tl.store(PSUM_GX + j * C + c, sum_gx, mask=cmask)


@_kernel
def bn_bwd_finalize_kernel(
    PSUM_G, PSUM_GX, n_split,    # partials of backward pass 1
    DW, DB,                      # out (C,) float32: dgamma = sum(g * xhat), dbeta = sum(g)
    C,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Sum the ``n_split`` backward partials of every channel once (grid ``ceil(C / BLOCK_C)``)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sum_g, sum_gx = _sum_rows(PSUM_G, PSUM_GX, c, cmask, C, n_split, tl.arange(0, BLOCK_J), BLOCK_J)
    tl.store(DW + c, sum_gx, mask=cmask)
    tl.store(DB + c, sum_g, mask=cmask)


@_kernel
def bn_bwd_dx_kernel(
    DY, sdn, sdc, sds,           # g source: dL/dy (ACT recomputed), or g written by pass 1 (ACT = 0)
    X, sxn, sxc, sxs,            # saved input
    DX, sxgn, sxgc, sxgs,        # out: dL/dx
    W, B, SHIFT, DMEAN, RSTD,    # (C,)
    PSUM_G, PSUM_GX, n_split,    # INLINE: partials of pass 1, summed here
    DW, DB,                      # (C,) float32 dgamma = sum(g * xhat), dbeta = sum(g): read, or written (INLINE)
    C, S, m,                     # m: values per channel (float)
    n_sblocks, n_tiles, tiles_per_prog,
    TRAINING: tl.constexpr, INLINE: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
    VEC: tl.constexpr, C_INNER: tl.constexpr, INT64: tl.constexpr,
):
    """Backward pass 2: ``dx = gamma * rstd * (g - sum(g)/m - xhat * sum(g*xhat)/m)`` (training),
    ``dx = gamma * rstd * g`` (inference: the statistics are constants). The sums come from
    :func:`bn_bwd_finalize_kernel`, or (``INLINE``, few partials) are summed by every program and
    written by the programs with ``program_id(1) == 0``."""
    j = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ar = tl.arange(0, BLOCK_S)
    cmask = c < C
    if INLINE:
        sum_g, sum_gx = _sum_rows(PSUM_G, PSUM_GX, c, cmask, C, n_split, tl.arange(0, BLOCK_J), BLOCK_J)
        wmask = c < tl.where(j == 0, C, 0)  # the programs with program_id(1) == 0 write them
        tl.store(DW + c, sum_gx, mask=wmask)
        tl.store(DB + c, sum_g, mask=wmask)
    else:
        sum_gx = tl.load(DW + c, mask=cmask, other=0.0)
        sum_g = tl.load(DB + c, mask=cmask, other=0.0)
    k, d, rstd = _saved_stats(SHIFT, DMEAN, RSTD, c, cmask)
    gamma, beta = _affine_params(W, B, c, cmask, HAS_W, HAS_B)
    c1 = sum_g / m                   # mean of g
    c2 = sum_gx / m                  # mean of g * xhat
    scale = gamma * rstd
    t_begin = j * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    for t in range(t_begin, t_end):
        n, s, mask, _n_t = _tile(t, n_sblocks, c, s_ar, C, S, BLOCK_S, VEC, C_INNER, INT64)
        x = tl.load(X + _offsets(n, c, s, sxn, sxc, sxs, VEC, C_INNER, INT64), mask=mask, other=0.0).to(tl.float32)
        xhat = ((x - k[:, None]) - d[:, None]) * rstd[:, None]
        g = tl.load(DY + _offsets(n, c, s, sdn, sdc, sds, VEC, C_INNER, INT64), mask=mask, other=0.0).to(tl.float32)
        if ACT != 0:
            g = _act_grad(g, gamma[:, None] * xhat + beta[:, None], ACT)
        if TRAINING:
            dx = scale[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        else:
            dx = scale[:, None] * g
        tl.store(DX + _offsets(n, c, s, sxgn, sxgc, sxgs, VEC, C_INNER, INT64), dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def bn_running_update_kernel(
    RM, RV, NBT,                 # in/out: running mean / var (C,), num_batches_tracked (int64 scalar)
    MEAN, RSTD,                  # (C,) float32 batch mean and rstd = 1/sqrt(var + eps)
    C, eps, momentum, unbias,    # unbias = m / (m - 1)
    HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: ``num_batches_tracked += 1`` and, per channel,
    ``running <- running + w * (batch - running)`` for the mean and the unbiased variance
    ``max(rstd^-2 - eps, 0) * unbias``, with ``w = momentum`` or ``1 / num_batches_tracked``
    (``CUMULATIVE``). One program, so the counter is read and written in order."""
    c0 = tl.arange(0, BLOCK)
    if HAS_NBT:
        nbt = tl.load(NBT) + 1
        tl.store(NBT, nbt)
    if CUMULATIVE:
        w = 1.0 / nbt.to(tl.float32)
    else:
        w = momentum
    for start in range(0, C, BLOCK):
        c = start + c0
        cmask = c < C
        mean = tl.load(MEAN + c, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + c, mask=cmask, other=1.0)
        var = tl.maximum(1.0 / (rstd * rstd) - eps, 0.0) * unbias
        rm = tl.load(RM + c, mask=cmask, other=0.0)
        rv = tl.load(RV + c, mask=cmask, other=0.0)
        new_rm = rm.to(tl.float32) + w * (mean - rm.to(tl.float32))
        new_rv = rv.to(tl.float32) + w * (var - rv.to(tl.float32))
        tl.store(RM + c, new_rm.to(RM.dtype.element_ty), mask=cmask)
        tl.store(RV + c, new_rv.to(RV.dtype.element_ty), mask=cmask)
