"""Tier 2: host launchers. Reshape to the per-channel view, allocate, choose blocks, launch.

Every tensor of a call is viewed as ``(N, C, S)`` with ``S = prod(spatial)`` and its
own strides, so contiguous, channels_last and strided inputs are read in place
(only a tensor whose spatial dimensions cannot be flattened by a view is copied;
that copy is correct, never wrong). When every tensor of the call has
``stride_n == S * stride_s`` - channels_last, ``(N, C)``, or ``N == 1`` - the batch
and spatial axes merge into one row axis of length ``N * S`` (view ``(1, C, N*S)``),
which keeps tiles full for small spatial extents.

Compile-time choices (:class:`Plan`): ``BLOCK_C x BLOCK_S`` tiles of about
:data:`TILE_ELEMENTS` values, wide along whichever axis is unit-stride in the input
(channels for channels_last, spatial otherwise); ``VEC``, the alignment every
streamed tensor's strides allow (so 128-bit accesses can be proven, e.g. for
``H*W = 196``); int32 offsets unless some offset can pass ``2**31``; ``num_warps``.

Grid: each streaming kernel gets as many programs as fit on the device in one wave,
from the occupancy of *its compiled code* (registers, shared memory, warps:
:func:`resident_programs`), at most one program per tile. The partial statistics of the
programs are merged once: by every program of the next pass when there are at most
:data:`INLINE_ROWS` of them (no extra launch), else by a small finalize kernel.

No launcher reads tensor data on the host (no ``.item()``, no ``bool(tensor)``): every
decision comes from shapes, strides, dtypes and the device, so a launch can be captured
in a CUDA graph. Functions here take and return plain tensors; autograd lives in :mod:`.ops`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _jit

#: activation name -> compile-time code used by the kernels
ACT_CODES = {"identity": 0, "relu": 1, "silu": 2}

#: target number of values per tile (GPU, CPU interpreter)
TILE_ELEMENTS = {"cuda": 4096, "cpu": 256}
#: at most this many global accesses per thread and tensor in one tile: with narrow (unaligned)
#: accesses the tile shrinks, or every access needs its own 64-bit address in registers
ACCESSES_PER_THREAD = 4
#: channel-block width for channels-inner layouts
MAX_BLOCK_C_INNER = 64
#: at most this many partial rows are merged by every program of the next pass (one 2-D
#: load of ``INLINE_ROWS x BLOCK_C``); more go through the finalize kernel first
INLINE_ROWS = 16
#: finalize kernels: channels per program, partial rows per load
FINALIZE_BLOCK_C = 64
FINALIZE_ROWS = 32
#: total programs on the CPU interpreter (there is no occupancy there)
CPU_PROGRAMS = 4
#: CUDA limit on grid dimensions y and z (the split runs along grid axis 1)
MAX_GRID_Y = 65535
#: largest offset that int32 arithmetic may form
INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Device:
    """What a launch plan needs to know about a device (CUDA occupancy limits per SM).

    ``programs`` (CPU interpreter only) is the fixed number of programs to use.

    Example::

        >>> H100.resident_programs(n_regs=64, num_warps=8, shared=0)
        4
    """

    name: str
    kind: str  # "cuda" or "cpu"
    sm_count: int = 1
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_programs_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    programs: int = CPU_PROGRAMS

    def resident_programs(self, n_regs: int, num_warps: int, shared: int = 0) -> int:
        """Programs of a kernel resident at once on one SM: the minimum over registers
        (allocated per warp in units of 256), threads, shared memory and the program limit."""
        warp_regs = -(-max(int(n_regs), 1) * 32 // 256) * 256
        by_regs = self.regs_per_sm // (warp_regs * num_warps)
        by_threads = self.max_threads_per_sm // (32 * num_warps)
        by_shared = self.shared_per_sm // shared if shared > 0 else self.max_programs_per_sm
        return max(0, min(by_regs, by_threads, by_shared, self.max_programs_per_sm))


#: the machine the compiled-code check targets (benchmarks/compiled.py): H100 SXM, sm_90
H100 = Device("H100 SXM (sm_90)", "cuda", sm_count=132)


@functools.lru_cache(maxsize=None)
def _cuda_device(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    return Device(
        name=props.name,
        kind="cuda",
        sm_count=props.multi_processor_count,
        regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
        max_threads_per_sm=getattr(props, "max_threads_per_multi_processor", 2048),
        shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
    )


def device_model(t: Tensor) -> Device:
    """The :class:`Device` that ``t`` lives on (the CPU interpreter: a fixed program count).

    Example::

        >>> device_model(torch.zeros(1)).programs   # CPU: CPU_PROGRAMS
        4
    """
    if t.is_cuda:
        return _cuda_device(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return Device("cpu (Triton interpreter)", "cpu", programs=CPU_PROGRAMS)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    """Launch geometry shared by the streaming kernels of one call (the split is per kernel)."""

    n: int  # N' (1 when rows are merged)
    c: int
    s: int  # S' (N * S when rows are merged)
    merged: bool
    channels_inner: bool  # the tile is wide along C (unit channel stride), else along S
    block_c: int
    block_s: int
    n_sblocks: int
    n_tiles: int  # tiles per channel block
    num_warps: int
    vec: int  # every streamed stride across the unit-stride axis is a multiple of vec elements
    int64: bool  # some offset can pass 2**31: form offsets in int64

    @property
    def n_cblocks(self) -> int:
        return triton_cdiv(self.c, self.block_c)

    def split(self, programs: int) -> Tuple[int, int]:
        """``(n_split, tiles_per_prog)``: at most ``programs`` programs in all (one wave),
        at least one per channel block, every program with at least one tile."""
        n_split = max(1, min(self.n_tiles, programs // self.n_cblocks, MAX_GRID_Y))
        tiles_per_prog = triton_cdiv(self.n_tiles, n_split)
        return triton_cdiv(self.n_tiles, tiles_per_prog), tiles_per_prog

    def strides(self, t3: Tensor) -> Tuple[int, int, int]:
        """``(s_n, s_c, s_s)`` of a ``(N, C, S)`` view under this plan."""
        sn, sc, ss = _strides(t3)
        return (0, sc, ss) if self.merged else (sn, sc, ss)

    def args(self, t3: Optional[Tensor], like: Tensor):
        """Pointer and strides for a kernel; a placeholder (never read) when ``t3`` is None."""
        if t3 is None:
            return (like, 0, 0, 0)
        return (t3,) + self.strides(t3)

    def meta(self) -> Dict[str, int]:
        """The compile-time arguments every streaming kernel takes."""
        return dict(BLOCK_C=self.block_c, BLOCK_S=self.block_s, VEC=self.vec, C_INNER=self.channels_inner,
                    INT64=self.int64, num_warps=self.num_warps)


def _vector_width(views: Sequence[Tensor], merged: bool, channels_inner: bool, c: int, s: int) -> int:
    """Largest power of two ``<= 16 bytes / element`` dividing every stride across the
    unit-stride axis and the extent along it, for every view (1 when a view is not
    unit-stride along the tile's wide axis)."""
    vec = 16 // views[0].element_size()
    for t in views:
        sn, sc, ss = _strides(t)
        outer = [] if merged else [sn]
        unit, across = (sc, [ss] + outer) if channels_inner else (ss, [sc] + outer)
        if unit != 1:
            return 1
        for v in across + [c if channels_inner else s]:
            while vec > 1 and v % vec:
                vec //= 2
    return vec


def make_plan(x3: Tensor, others: Sequence[Optional[Tensor]] = (), *, device: Optional[Device] = None,
              tile: Optional[int] = None) -> Plan:
    """Choose the view, block sizes, vector width and offset width for ``x3`` and the other
    ``(N, C, S)`` views of a call."""
    n, c, s = x3.shape
    views = [x3] + [t for t in others if t is not None]
    merged = n == 1 or all(_strides(t)[0] == s * _strides(t)[2] for t in views)
    if merged:
        n, s = 1, n * s
    device = device or device_model(x3)
    channels_inner = _strides(x3)[1] == 1 and c > 1
    vec = _vector_width(views, merged, channels_inner, c, s)
    tile = tile or min(TILE_ELEMENTS["cuda" if device.kind == "cuda" else "cpu"], ACCESSES_PER_THREAD * 32 * 8 * vec)
    tile = 1 << (int(tile).bit_length() - 1)  # tl.arange needs power-of-two block sizes
    if channels_inner:
        block_c = min(_next_pow2(c), MAX_BLOCK_C_INNER, tile)
        block_s = min(_next_pow2(s), max(1, tile // block_c))
    else:
        block_s = min(_next_pow2(s), tile)
        block_c = min(_next_pow2(c), max(1, tile // block_s))
    n_sblocks = triton_cdiv(s, block_s)
    elems = block_c * block_s
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    # largest offset a tile can form (its masked lanes included), in elements
    reach = max((n - 1) * abs(0 if merged else _strides(t)[0]) + (c - 1 + block_c) * abs(_strides(t)[1])
                + (s - 1 + block_s) * abs(_strides(t)[2]) for t in views)
    int64 = reach > INT32_LIMIT or s + block_s > INT32_LIMIT
    return Plan(n, c, s, merged, channels_inner, block_c, block_s, n_sblocks, n * n_sblocks, num_warps, vec, int64)


# --- occupancy: programs per launch from the compiled kernel ----------------------------------

_RESIDENT: Dict[tuple, int] = {}


def _compiled_resources(fn, args, kwargs) -> Tuple[int, int]:
    """``(registers per thread, shared bytes)`` of the kernel ``fn`` compiled for these
    arguments on the current CUDA device (compiles it; Triton caches it for the launch)."""
    kernel = fn.warmup(*args, grid=(1,), **kwargs)
    if hasattr(kernel, "_init_handles"):
        kernel._init_handles()
    return int(kernel.n_regs), int(getattr(kernel.metadata, "shared", 0))


def _programs(fn, device: Device, kwargs, make_args: Callable[[], tuple]) -> int:
    """Programs that fit on ``device`` in one wave for this kernel variant (cached per variant;
    ``make_args`` builds representative arguments for the one compile a new variant needs)."""
    if device.kind != "cuda":
        return device.programs
    args = make_args()
    key = (fn.__name__ if hasattr(fn, "__name__") else str(fn), device.name,
           tuple(str(a.dtype) for a in args if isinstance(a, Tensor)), tuple(sorted(kwargs.items())))
    resident = _RESIDENT.get(key)
    if resident is None:
        n_regs, shared = _compiled_resources(fn, args, kwargs)
        resident = _RESIDENT[key] = max(1, device.resident_programs(n_regs, kwargs.get("num_warps", 4), shared))
    return resident * device.sm_count


def _launch(fn, grid, args, kwargs) -> None:
    """Every kernel launch goes through here (the compiled-code check records them)."""
    fn[grid](*args, **kwargs)


def _interpreter_compat() -> None:
    """Triton's interpreter before 3.8 turns a kernel scalar into a Python int with
    ``int(array_of_one)``, which NumPy >= 2.4 rejects, so ``range(start, end)`` over runtime
    bounds fails. Patch that one conversion (as Triton 3.8 does); only under TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET") != "1" or getattr(_interpreter_compat, "done", False):
        return
    _interpreter_compat.done = True
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # NumPy still converts one-element arrays
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def index(self):
        return int(np.asarray(self.handle.data).reshape(-1)[0])

    def patched(tensor, *scope):
        original(tensor, *scope)
        if scope and hasattr(scope[0], "set_attr"):
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patched


# Every buffer a launcher returns or reduces through is allocated by these two, so a test
# can fill them with NaN first and catch any element a kernel leaves unwritten.
def _empty_like(t: Tensor, memory_format=torch.preserve_format) -> Tensor:
    return torch.empty_like(t, memory_format=memory_format)


def _empty(shape, device) -> Tensor:
    return torch.empty(shape, device=device, dtype=torch.float32)


def _stat(x: Tensor, rows: int = 1) -> Tensor:
    return _empty((x.shape[1],) if rows == 1 else (rows, x.shape[1]), x.device)


def _finalize_grid(c: int):
    block_c = min(_next_pow2(c), FINALIZE_BLOCK_C)
    return (triton_cdiv(c, block_c),), dict(BLOCK_C=block_c, BLOCK_J=FINALIZE_ROWS, num_warps=4)


def train_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                  eps: float, activation: str, **plan_kw):
    """Training forward: statistics pass, [finalize,] output pass. Returns ``(y, mean, rstd, shift, dmean)``.

    ``y = act(gamma * ((x - shift) - dmean) * rstd + beta [+ residual])`` in ``x``'s dtype and
    memory format; ``mean = shift + dmean``, ``rstd = 1/sqrt(var + eps)`` with the biased
    variance, all ``(C,)`` float32. ``shift``/``dmean`` are what the backward re-normalizes with.
    """
    _interpreter_compat()
    y = output_like(x)
    mean, rstd, shift, dmean = (_stat(x) for _ in range(4))
    x3, y3 = view3(x), view3(y)
    r3 = view3(residual) if residual is not None else None
    dev = plan_kw.pop("device", None) or device_model(x)
    p = make_plan(x3, [y3, r3], device=dev, **plan_kw)
    meta = p.meta()
    eps = float(eps)

    def stats_args(n_split, tiles_per_prog, part):
        return (*p.args(x3, x), part[0], part[1], part[2], p.c, p.s, p.n_sblocks, p.n_tiles, tiles_per_prog)

    programs = _programs(_jit.bn_stats_partial_kernel, dev, meta,
                         lambda: stats_args(1, p.n_tiles, _stat(x, 3).view(3, 1, p.c)))
    n_split, tpp = p.split(programs)
    part = _stat(x, 3 * n_split).view(3, n_split, p.c)
    inline = n_split <= INLINE_ROWS
    sxc = p.strides(x3)[1]

    def apply_args(tiles_per_prog):
        return (*p.args(x3, x), *p.args(y3, x), *p.args(r3, x), _vec(weight, x), _vec(bias, x),
                part[0], part[1], part[2], n_split,
                x, x,  # running statistics: unused in training
                mean, rstd, shift, dmean, p.c, p.s, eps, p.n_sblocks, p.n_tiles, tiles_per_prog)

    apply_meta = dict(meta, STATS=2 if inline else 1, ACT=ACT_CODES[activation], HAS_RES=r3 is not None,
                      HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_J=INLINE_ROWS)
    a_split, a_tpp = p.split(_programs(_jit.bn_apply_kernel, dev, apply_meta, lambda: apply_args(p.n_tiles)))
    with _device_guard(x):
        _launch(_jit.bn_stats_partial_kernel, (p.n_cblocks, n_split), stats_args(n_split, tpp, part), meta)
        if not inline:
            grid, fmeta = _finalize_grid(p.c)
            _launch(_jit.bn_stats_finalize_kernel, grid,
                    (x3, sxc, part[0], part[1], part[2], n_split, mean, rstd, shift, dmean, p.c, eps), fmeta)
        _launch(_jit.bn_apply_kernel, (p.n_cblocks, a_split), apply_args(a_tpp), apply_meta)
    return y, mean, rstd, shift, dmean


def infer_forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], residual: Optional[Tensor], eps: float, activation: str, **plan_kw) -> Tensor:
    """Inference forward in one launch (one read of ``x`` [and residual], one write of ``y``):
    ``y = act(gamma * (x - running_mean) / sqrt(running_var + eps) + beta [+ residual])``."""
    _interpreter_compat()
    y = output_like(x)
    x3, y3 = view3(x), view3(y)
    r3 = view3(residual) if residual is not None else None
    dev = plan_kw.pop("device", None) or device_model(x)
    p = make_plan(x3, [y3, r3], device=dev, **plan_kw)
    rm, rv = running_mean.contiguous(), running_var.contiguous()

    def args(tiles_per_prog):
        return (*p.args(x3, x), *p.args(y3, x), *p.args(r3, x), _vec(weight, x), _vec(bias, x),
                x, x, x, 1,  # partials: unused in inference
                rm, rv,
                x, x, x, x,  # statistics: unused in inference
                p.c, p.s, float(eps), p.n_sblocks, p.n_tiles, tiles_per_prog)

    meta = dict(p.meta(), STATS=0, ACT=ACT_CODES[activation], HAS_RES=r3 is not None,
                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_J=INLINE_ROWS)
    n_split, tpp = p.split(_programs(_jit.bn_apply_kernel, dev, meta, lambda: args(p.n_tiles)))
    with _device_guard(x):
        _launch(_jit.bn_apply_kernel, (p.n_cblocks, n_split), args(tpp), meta)
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
    _interpreter_compat()
    act = ACT_CODES[activation]
    write_g = need_dres and act != 0
    dx = output_like(x)
    dres = output_like(residual if residual is not None else x) if write_g else x.new_empty((0,))
    dy3, x3, dx3 = view3(dy), view3(x), view3(dx)
    r3 = view3(residual) if (residual is not None and act != 0) else None
    g3 = view3(dres) if write_g else None
    dev = plan_kw.pop("device", None) or device_model(x)
    p = make_plan(x3, [dy3, dx3, r3, g3], device=dev, **plan_kw)
    meta = p.meta()
    dgamma, dbeta = _stat(x), _stat(x)
    w, b = _vec(weight, x), _vec(bias, x)
    shift, dmean, rstd = shift.contiguous(), dmean.contiguous(), rstd.contiguous()
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None)

    def reduce_args(tiles_per_prog, sums):
        return (*p.args(dy3, x), *p.args(x3, x), *p.args(r3, x), *p.args(g3, x), w, b, shift, dmean, rstd,
                sums[0], sums[1], p.c, p.s, p.n_sblocks, p.n_tiles, tiles_per_prog)

    reduce_meta = dict(meta, ACT=act, HAS_RES=r3 is not None, WRITE_G=write_g, **flags)
    programs = _programs(_jit.bn_bwd_reduce_kernel, dev, reduce_meta,
                         lambda: reduce_args(p.n_tiles, _stat(x, 2).view(2, 1, p.c)))
    n_split, tpp = p.split(programs)
    sums = _stat(x, 2 * n_split).view(2, n_split, p.c)
    inline = n_split <= INLINE_ROWS
    # pass 2 reads g itself where pass 1 wrote it, otherwise recomputes it from dy and x
    src3, act2 = (g3, 0) if write_g else (dy3, act)

    def dx_args(tiles_per_prog):
        return (*p.args(src3, x), *p.args(x3, x), *p.args(dx3, x), w, b, shift, dmean, rstd,
                sums[0], sums[1], n_split, dgamma, dbeta, p.c, p.s, float(x.numel() // max(p.c, 1)),
                p.n_sblocks, p.n_tiles, tiles_per_prog)

    dx_meta = dict(meta, TRAINING=training, INLINE=inline, ACT=act2, BLOCK_J=INLINE_ROWS, **flags)
    d_split, d_tpp = p.split(_programs(_jit.bn_bwd_dx_kernel, dev, dx_meta, lambda: dx_args(p.n_tiles)))
    with _device_guard(x):
        _launch(_jit.bn_bwd_reduce_kernel, (p.n_cblocks, n_split), reduce_args(tpp, sums), reduce_meta)
        if not inline:
            grid, fmeta = _finalize_grid(p.c)
            _launch(_jit.bn_bwd_finalize_kernel, grid, (sums[0], sums[1], n_split, dgamma, dbeta, p.c), fmeta)
        _launch(_jit.bn_bwd_dx_kernel, (p.n_cblocks, d_split), dx_args(d_tpp), dx_meta)
    return dx, dgamma, dbeta, dres


def running_stats_update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                         mean: Tensor, rstd: Tensor, eps: float, count: int, momentum: Optional[float]) -> None:
    r"""The running-statistics update of a training step, in place, in one launch.

    .. math::
        n \mathrel{+}= 1,\quad w = \text{momentum or } 1/n,\quad
        \hat\mu \leftarrow \hat\mu + w(\mu - \hat\mu),\quad
        \hat\sigma^2 \leftarrow \hat\sigma^2 + w\big(\max(\text{rstd}^{-2} - \epsilon, 0)\,\tfrac{m}{m-1}
        - \hat\sigma^2\big)

    PyTorch's convention (``momentum`` weights the new batch; ``None`` is the cumulative
    average, which needs ``num_batches_tracked``), as ``functional._core.update_running_stats``.

    Args:
        running_mean, running_var: ``(C,)`` contiguous float32/float16/bfloat16 buffers, updated
            in place (computed in float32, stored in their dtype).
        num_batches_tracked: int64 scalar tensor incremented in place, or None.
        mean, rstd: ``(C,)`` float32 batch statistics from :func:`train_forward`.
        eps: the ``eps`` that ``rstd`` was computed with.
        count: ``m``, values per channel in the batch (``> 1``).
        momentum: float, or None for the cumulative average.

    Example::

        >>> running_stats_update(rm, rv, nbt, mean, rstd, 1e-5, x.numel() // x.shape[1], 0.1)
    """
    _interpreter_compat()
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    for buf in (running_mean, running_var):
        if not buf.is_contiguous():
            raise ValueError("running_mean/running_var must be contiguous to be updated in place")
    if count <= 1:
        raise ValueError(f"the running variance needs more than 1 value per channel, got {count}")
    c = running_mean.numel()
    nbt = num_batches_tracked if num_batches_tracked is not None else running_mean
    meta = dict(HAS_NBT=num_batches_tracked is not None, CUMULATIVE=momentum is None,
                BLOCK=min(_next_pow2(c), 1024), num_warps=4)
    with _device_guard(running_mean):
        _launch(_jit.bn_running_update_kernel, (1,),
                (running_mean, running_var, nbt, mean.contiguous(), rstd.contiguous(), c, float(eps),
                 float(momentum if momentum is not None else 0.0), float(count) / float(count - 1)), meta)
