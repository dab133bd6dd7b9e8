"""Tier 2: host launchers. Reshape to the per-channel view, allocate, choose blocks, launch.

Every tensor of a call is viewed as ``(N, C, S)`` with ``S = prod(spatial)`` and its
own strides, so contiguous, channels_last and strided inputs are read in place
(only a tensor whose spatial dimensions cannot be flattened by a view is copied;
that copy is correct, never wrong). When every tensor of the call has
``stride_n == S * stride_s`` - channels_last, ``(N, C)``, or ``N == 1`` - the batch
and spatial axes merge into one row axis of length ``N * S`` (view ``(1, C, N*S)``),
which keeps tiles full for small spatial extents.

Block sizes are the only compile-time choices: ``BLOCK_C x BLOCK_S`` tiles of about
:data:`TILE_ELEMENTS` values, wide along whichever axis is unit-stride in the input
(channels for channels_last, spatial otherwise), ``num_warps`` from the tile size.
The tiles of a channel block are split over enough programs to fill the device
(:func:`make_plan`); their partial statistics are merged deterministically.

Functions here take and return plain tensors; autograd lives in :mod:`.ops`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _jit

#: activation name -> compile-time code used by the kernels
ACT_CODES = {"identity": 0, "relu": 1, "silu": 2}

#: target number of values per tile (GPU, CPU interpreter)
TILE_ELEMENTS = {"cuda": 4096, "cpu": 256}
#: channel-block width for channels-inner layouts
MAX_BLOCK_C_INNER = 64
#: programs per SM to aim for on a GPU; total programs on the CPU interpreter
PROGRAMS_PER_SM = 4
CPU_PROGRAMS = 4
#: CUDA limit on grid dimensions y and z (the split runs along grid axis 1)
MAX_GRID_Y = 65535


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_PROGRAMS


def _device_guard(t: Tensor):
    """Triton launches on the *current* CUDA device: make it ``t``'s (inputs on ``cuda:1``
    while ``cuda:0`` is current would otherwise be launched on the wrong GPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _vec(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A ``(C,)`` tensor as the kernels index it (``ptr + c``, unit stride); ``like`` as a
    never-read placeholder when ``t`` is None."""
    return like if t is None else t.contiguous()


def spatial_flattenable(t: Tensor) -> bool:
    """Whether the spatial dimensions of ``t`` merge into one strided axis (a view exists)."""
    dims = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def view3(t: Tensor) -> Tensor:
    """``(N, C, *spatial)`` -> ``(N, C, S)`` view of an input, copying only when no view exists
    (e.g. spatial dimensions transposed in memory). Outputs come from :func:`output_like`,
    which always has a view, so a kernel never writes into a temporary copy."""
    n, c = t.shape[:2]
    s = math.prod(t.shape[2:])
    if not spatial_flattenable(t):
        t = t.contiguous()
    return t.view(n, c, s)


def output_like(t: Tensor) -> Tensor:
    """Uninitialized tensor like ``t``: its memory format when that has an ``(N, C, S)`` view
    (contiguous, channels_last, ...), else contiguous. Used by the fake implementations too."""
    fmt = torch.preserve_format if spatial_flattenable(t) else torch.contiguous_format
    return _empty_like(t, memory_format=fmt)


def _strides(t3: Tensor) -> Tuple[int, int, int]:
    sn, sc, ss = t3.stride()
    if t3.shape[2] == 1:
        ss = sn  # a size-1 spatial axis: any stride; this one lets (N, C) inputs merge rows
    return sn, sc, ss


@dataclass(frozen=True)
class Plan:
    """Launch geometry shared by every kernel of one call."""

    n: int  # N' (1 when rows are merged)
    c: int
    s: int  # S' (N * S when rows are merged)
    merged: bool
    block_c: int
    block_s: int
    n_sblocks: int
    n_tiles: int  # tiles per channel block
    tiles_per_prog: int
    n_split: int  # programs per channel block (grid axis 1)
    num_warps: int

    @property
    def grid(self) -> Tuple[int, int]:
        return (triton_cdiv(self.c, self.block_c), self.n_split)

    def strides(self, t3: Tensor) -> Tuple[int, int, int]:
        """``(s_n, s_c, s_s)`` of a ``(N, C, S)`` view under this plan."""
        sn, sc, ss = _strides(t3)
        return (0, sc, ss) if self.merged else (sn, sc, ss)

    def args(self, t3: Optional[Tensor], like: Tensor):
        """Pointer and strides for a kernel; a placeholder (never read) when ``t3`` is None."""
        if t3 is None:
            return (like, 0, 0, 0)
        return (t3,) + self.strides(t3)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_plan(x3: Tensor, others: Sequence[Optional[Tensor]] = (), *, tile: Optional[int] = None,
              programs: Optional[int] = None) -> Plan:
    """Choose the view, block sizes and split for ``x3`` and the other ``(N, C, S)`` views of a call."""
    n, c, s = x3.shape
    views = [x3] + [t for t in others if t is not None]
    merged = n == 1 or all(_strides(t)[0] == s * _strides(t)[2] for t in views)
    if merged:
        n, s = 1, n * s
    tile = tile or TILE_ELEMENTS["cuda" if x3.is_cuda else "cpu"]
    tile = 1 << (int(tile).bit_length() - 1)  # tl.arange needs power-of-two block sizes
    channels_inner = _strides(x3)[1] == 1 and c > 1
    if channels_inner:
        block_c = min(_next_pow2(c), MAX_BLOCK_C_INNER, tile)
        block_s = min(_next_pow2(s), max(1, tile // block_c))
    else:
        block_s = min(_next_pow2(s), tile)
        block_c = min(_next_pow2(c), max(1, tile // block_s))
    n_sblocks = triton_cdiv(s, block_s)
    n_tiles = n * n_sblocks
    n_cblocks = triton_cdiv(c, block_c)
    programs = programs or _target_programs(x3.device)
    n_split = max(1, min(n_tiles, triton_cdiv(programs, n_cblocks), MAX_GRID_Y))
    tiles_per_prog = triton_cdiv(n_tiles, n_split)
    n_split = triton_cdiv(n_tiles, tiles_per_prog)
    elems = block_c * block_s
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return Plan(n, c, s, merged, block_c, block_s, n_sblocks, n_tiles, tiles_per_prog, n_split, num_warps)


def _tiling(p: Plan):
    return dict(n_sblocks=p.n_sblocks, n_tiles=p.n_tiles, tiles_per_prog=p.tiles_per_prog,
                BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)


# Every buffer a launcher returns or reduces through is allocated by these two, so a test
# can fill them with NaN first and catch any element a kernel leaves unwritten.
def _empty_like(t: Tensor, memory_format=torch.preserve_format) -> Tensor:
    return torch.empty_like(t, memory_format=memory_format)


def _empty(shape, device) -> Tensor:
    return torch.empty(shape, device=device, dtype=torch.float32)


def _stat(x: Tensor, rows: int = 1) -> Tensor:
    return _empty((x.shape[1],) if rows == 1 else (rows, x.shape[1]), x.device)


def train_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                  eps: float, activation: str, **plan_kw):
    """Training forward in two launches. Returns ``(y, mean, rstd, shift, dmean)``.

    ``y = act(gamma * ((x - shift) - dmean) * rstd + beta [+ residual])`` in ``x``'s dtype and
    memory format; ``mean = shift + dmean``, ``rstd = 1/sqrt(var + eps)`` with the biased
    variance, all ``(C,)`` float32. ``shift``/``dmean`` are what the backward re-normalizes with.
    """
    y = output_like(x)
    mean, rstd, shift, dmean = (_stat(x) for _ in range(4))
    x3, y3 = view3(x), view3(y)
    r3 = view3(residual) if residual is not None else None
    p = make_plan(x3, [y3, r3], **plan_kw)
    part = _stat(x, 3 * p.n_split).view(3, p.n_split, p.c)
    with _device_guard(x):
        _jit.bn_stats_partial_kernel[p.grid](
            *p.args(x3, x), part[0], part[1], part[2], p.c, p.s, **_tiling(p))
        _jit.bn_apply_kernel[p.grid](
            *p.args(x3, x), *p.args(y3, x), *p.args(r3, x),
            _vec(weight, x), _vec(bias, x),
            part[0], part[1], part[2], p.n_split,
            x, x,  # running statistics: unused in training
            mean, rstd, shift, dmean,
            p.c, p.s, float(eps),
            TRAINING=True, ACT=ACT_CODES[activation], HAS_RES=r3 is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, **_tiling(p))
    return y, mean, rstd, shift, dmean


def infer_forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], residual: Optional[Tensor], eps: float, activation: str, **plan_kw) -> Tensor:
    """Inference forward in one launch (one read of ``x`` [and residual], one write of ``y``):
    ``y = act(gamma * (x - running_mean) / sqrt(running_var + eps) + beta [+ residual])``."""
    y = output_like(x)
    x3, y3 = view3(x), view3(y)
    r3 = view3(residual) if residual is not None else None
    p = make_plan(x3, [y3, r3], **plan_kw)
    with _device_guard(x):
        _jit.bn_apply_kernel[p.grid](
            *p.args(x3, x), *p.args(y3, x), *p.args(r3, x),
            _vec(weight, x), _vec(bias, x),
            x, x, x, 1,  # partials: unused in inference
            running_mean.contiguous(), running_var.contiguous(),
            x, x, x, x,  # statistics out: unused in inference
            p.c, p.s, float(eps),
            TRAINING=False, ACT=ACT_CODES[activation], HAS_RES=r3 is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, **_tiling(p))
    return y


def backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
             shift: Tensor, dmean: Tensor, rstd: Tensor, activation: str, training: bool, need_dres: bool, **plan_kw):
    """Backward of :func:`train_forward` (``training=True``) or :func:`infer_forward` (statistics
    constant: pass ``shift = running_mean``, ``dmean = 0``, ``rstd = 1/sqrt(running_var + eps)``).

    Returns ``(dx, dgamma, dbeta, dres)``: ``dgamma``/``dbeta`` ``(C,)`` float32; ``dres`` is
    ``g = dy * act'(z)`` in the residual's dtype when ``need_dres`` and the activation is not the
    identity (for the identity, ``d residual = dy`` and an empty tensor is returned). New
    buffers only: ``dy`` is never written.
    """
    act = ACT_CODES[activation]
    write_g = need_dres and act != 0
    dx = output_like(x)
    dres = output_like(residual if residual is not None else x) if write_g else x.new_empty((0,))
    dy3, x3, dx3 = view3(dy), view3(x), view3(dx)
    r3 = view3(residual) if (residual is not None and act != 0) else None
    g3 = view3(dres) if write_g else None
    p = make_plan(x3, [dy3, dx3, r3, g3], **plan_kw)
    sums = _stat(x, 2 * p.n_split).view(2, p.n_split, p.c)
    dgamma, dbeta = _stat(x), _stat(x)
    w, b = _vec(weight, x), _vec(bias, x)
    shift, dmean, rstd = shift.contiguous(), dmean.contiguous(), rstd.contiguous()
    # pass 2 reads g itself where pass 1 wrote it, otherwise recomputes it from dy and x
    src3, act2 = (g3, 0) if write_g else (dy3, act)
    with _device_guard(x):
        _jit.bn_bwd_reduce_kernel[p.grid](
            *p.args(dy3, x), *p.args(x3, x), *p.args(r3, x), *p.args(g3, x),
            w, b, shift, dmean, rstd, sums[0], sums[1], p.c, p.s,
            ACT=act, HAS_RES=r3 is not None, WRITE_G=write_g,
            HAS_W=weight is not None, HAS_B=bias is not None, **_tiling(p))
        _jit.bn_bwd_dx_kernel[p.grid](
            *p.args(src3, x), *p.args(x3, x), *p.args(dx3, x),
            w, b, shift, dmean, rstd, sums[0], sums[1], p.n_split, dgamma, dbeta,
            p.c, p.s, float(x.numel() // max(p.c, 1)),
            TRAINING=training, ACT=act2, HAS_W=weight is not None, HAS_B=bias is not None, **_tiling(p))
    return dx, dgamma, dbeta, dres
