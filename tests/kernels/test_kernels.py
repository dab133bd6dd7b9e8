"""The Triton kernels (``backend="triton"``) against the float64 NumPy reference.

On a machine without a GPU these run through Triton's interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py), so shapes are small; the
GPU-only tests at the bottom use larger ones. Every buffer the launchers allocate is
filled with NaN first (fixture ``poison``), so an element a kernel fails to write
shows up as a NaN in the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import REL_TOL, assert_rel_close

from batchnorm import reference as R
from batchnorm.functional import batch_norm
from batchnorm.kernels import is_available, launch, ops

pytest.importorskip("triton")

F32 = REL_TOL[torch.float32]
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
EPS = 1e-5


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Launcher outputs and partial-statistics buffers start as NaN."""
    monkeypatch.setattr(
        launch, "_empty_like", lambda t, memory_format: torch.full_like(t, float("nan"), memory_format=memory_format)
    )
    monkeypatch.setattr(
        launch, "_empty", lambda shape, device: torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    )


def test_backend_is_available_here():
    # the suite must exercise the kernels, not silently fall back: CUDA or the interpreter
    assert is_available(torch.zeros(2, 2, device=DEV))


# --- NumPy float64 oracle for the fused epilogue (the reference has no activation) ---------


def _act(z, act):
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "silu":
        return z / (1.0 + np.exp(-z))
    return z


def _act_grad(dy, z, act):
    if act == "relu":
        return dy * (z > 0)
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return dy * s * (1.0 + z * (1.0 - s))
    return dy


def _np(t):
    return t.detach().to("cpu", torch.float64).numpy().copy()


def reference_train(x, w, b, r, dy, act):
    """``(y, dx, dgamma, dbeta, dres, cache)`` in float64 from batchnorm.reference."""
    bn, cache = R.batch_norm_train(_np(x), _np(w), _np(b), EPS)
    z = bn + (_np(r) if r is not None else 0.0)
    g = _act_grad(_np(dy), z, act)
    dx, dgamma, dbeta = R.batch_norm_backward(g, cache)
    return _act(z, act), dx, dgamma, dbeta, g, cache


def dx_scale(g, w, rstd, ndim):
    """Norm of the terms dx cancels from (see tolerances.rel_err)."""
    return float(np.linalg.norm(g * (_np(w) * rstd.ravel()).reshape(R.param_shape(ndim))))


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":  # last two dims swapped in memory: no (N, C, S) view exists, the launcher copies
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other element of the last dim: a view with spatial stride 2
        return torch.repeat_interleave(t, 2, dim=-1)[..., ::2]
    return t.contiguous()


def _params(c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g) + 0.5).to(DEV, dtype)
    b = torch.randn(c, generator=g).to(DEV, dtype)
    rm = torch.randn(c, generator=g).to(DEV) * 0.1
    rv = (torch.rand(c, generator=g) + 0.5).to(DEV)
    return w, b, rm, rv


def run_train(x, w, b, r, act, momentum=0.1, rm=None, rv=None, nbt=None):
    """One training step through functional.batch_norm(backend='triton'); returns y and the grads."""
    x = x.detach().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    r = r.detach().requires_grad_(True) if r is not None else None
    y = batch_norm(x, rm, rv, w, b, True, momentum, EPS, num_batches_tracked=nbt, residual=r, activation=act,
                   backend="triton")
    return x, w, b, r, y


def check_train(x, r, act, dtype_tol=F32, momentum=0.1, dy=None):
    c = x.shape[1]
    w, b, rm, rv = _params(c, torch.float32 if x.dtype == torch.float32 else x.dtype)
    rm0, rv0 = _np(rm), _np(rv)
    nbt = torch.tensor(3, device=DEV)
    xg, wg, bg, rg, y = run_train(x, w, b, r, act, momentum, rm, rv, nbt)
    if dy is None:
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEV, x.dtype)
    y.backward(dy)
    y_ref, dx_ref, dg_ref, db_ref, g_ref, cache = reference_train(x, w, b, r, dy, act)

    assert y.dtype == x.dtype and y.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), "output must keep channels_last"
    assert_rel_close(y, y_ref, dtype_tol, "y")
    assert_rel_close(xg.grad, dx_ref, dtype_tol, "dx", scale=dx_scale(g_ref, w, cache.rstd, x.dim()))
    assert_rel_close(wg.grad, dg_ref, dtype_tol, "dgamma")
    assert_rel_close(bg.grad, db_ref, dtype_tol, "dbeta")
    if r is not None:
        assert_rel_close(rg.grad, g_ref, dtype_tol, "d residual")
    # running statistics: float32 from float32 statistics, even for half inputs
    rm_ref, rv_ref = R.running_update(rm0, rv0, cache.moments, momentum, 4)
    assert_rel_close(rm, rm_ref, F32, "running_mean")
    assert_rel_close(rv, rv_ref, F32, "running_var")
    assert int(nbt) == 4
    return y


# (shape, why it is here); with the CPU interpreter's 256-value tiles and 4 programs
TRAIN_SHAPES = [
    ((5, 3, 7, 9), "odd sizes; N*S = 315 is not a multiple of the tile; several tiles per program"),
    ((4, 1, 13), "C = 1 (batch and spatial rows merge); 3-D input"),
    ((7, 5), "2-D (N, C) input: channels inner, rows merged"),
    ((2, 3, 3, 4, 5), "5-D input, N = 2"),
    ((3, 2, 40, 41), "split reduction: 4920 values per channel, 21 tiles per channel over 2 programs, Chan merge"),
]


@pytest.mark.parametrize("shape", [s for s, _ in TRAIN_SHAPES], ids=[str(s) for s, _ in TRAIN_SHAPES])
@pytest.mark.parametrize("act,res", [("relu", True), ("silu", False), (None, False)])
def test_train_contiguous(shape, act, res):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEV)
    r = torch.randn(shape, generator=g).to(DEV) if res else None
    check_train(x, r, act)


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((5, 3, 7, 9), "channels_last"),  # channels inner, rows merged
        ((2, 3, 3, 4, 5), "channels_last"),  # channels_last_3d
        ((5, 3, 7, 9), "strided"),  # no view: copied to contiguous
        ((3, 2, 5, 6), "sliced"),  # view with spatial stride 2
    ],
)
@pytest.mark.parametrize("act,res", [("relu", True), ("silu", True), (None, True), ("relu", False)])
def test_train_layouts(shape, layout, act, res):
    g = torch.Generator().manual_seed(3)
    x = _layout((torch.randn(shape, generator=g) - 1.0).to(DEV), layout)
    # residual in the other layout than x: the plan must not merge rows for one and not the other
    r = torch.randn(shape, generator=g).to(DEV).contiguous() if res else None
    check_train(x, r, act)


def test_split_plan_is_exercised():
    # the split shape above really splits and merges partials, and channels_last is channels-inner
    cpu4 = launch.Device("cpu", "cpu", programs=4)
    x3 = launch.view3(torch.empty(3, 2, 40, 41, device=DEV))
    p = launch.make_plan(x3, tile=256, device=cpu4)
    n_split, tiles_per_prog = p.split(4)
    assert n_split > 1 and tiles_per_prog > 1 and not p.merged
    xcl = launch.view3(torch.empty(5, 8, 7, 9, device=DEV).contiguous(memory_format=torch.channels_last))
    p = launch.make_plan(xcl, tile=256, device=cpu4)
    assert p.merged and p.channels_inner and p.block_c == 8 and p.n == 1 and p.s == 5 * 63


def test_plan_one_wave_vector_width_and_offsets():
    # one wave: never more programs than fit (the old grid rounded 528 slots up to 544 programs)
    x3 = launch.view3(torch.empty(128, 64, 56, 56, device="meta"))
    p = launch.make_plan(x3, device=launch.H100)
    for programs in (528, 264, 100, 7):
        n_split, tpp = p.split(programs)
        assert p.n_cblocks * n_split <= max(programs, p.n_cblocks) and n_split * tpp >= p.n_tiles
    # alignment the strides allow, in elements: 14x14 rows of 196 values (784 B: 16-byte aligned
    # for float32, 8-byte for bfloat16), 7x7 rows of 49 (none), channels_last C = 64 (all)
    cases = [((32, 256, 14, 14), torch.float32, None, 4), ((32, 256, 14, 14), torch.bfloat16, None, 4),
             ((32, 512, 7, 7), torch.float32, None, 1), ((32, 64, 7, 7), torch.bfloat16, torch.channels_last, 8),
             ((16, 6, 33), torch.float32, None, 1)]
    for shape, dtype, fmt, vec in cases:
        t = torch.empty(shape, device="meta", dtype=dtype)
        t = t.contiguous(memory_format=fmt) if fmt else t
        assert launch.make_plan(launch.view3(t), device=launch.H100).vec == vec, (shape, dtype, fmt)
    # a residual in another layout than x: no unit stride along the tile's wide axis for it -> scalar
    x = torch.empty(8, 64, 14, 14, device="meta").contiguous(memory_format=torch.channels_last)
    r = torch.empty(8, 64, 14, 14, device="meta")
    assert launch.make_plan(launch.view3(x), [launch.view3(r)], device=launch.H100).vec == 1
    # offsets: int32 unless a tile can reach past 2**31 (2**31 elements here)
    assert not launch.make_plan(launch.view3(torch.empty(128, 2048, 7, 7, device="meta")), device=launch.H100).int64
    big = torch.empty(128, 4, 2048, 2048, device="meta", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    assert launch.make_plan(launch.view3(big), device=launch.H100).int64


def test_resident_programs():
    # 65536 registers per SM, allocated per warp in units of 256: 8 warps x 32 threads x 64 regs -> 4
    assert launch.H100.resident_programs(64, 8) == 4
    assert launch.H100.resident_programs(65, 8) == 3  # 65 * 32 = 2080 -> 2304 per warp
    assert launch.H100.resident_programs(255, 8) == 1
    assert launch.H100.resident_programs(32, 4) == 16  # 2048 threads / 128
    assert launch.H100.resident_programs(16, 1, shared=64 * 1024) == 3


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_finalize_kernels(monkeypatch, layout):
    # many partial rows: merged once by the finalize kernels (several row blocks), not inline
    monkeypatch.setattr(launch, "CPU_PROGRAMS", 24)
    monkeypatch.setattr(launch, "INLINE_ROWS", 1)
    monkeypatch.setattr(launch, "FINALIZE_ROWS", 4)
    seen = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda fn, grid, a, kw: (seen.append(fn.__name__), real(fn, grid, a, kw)))
    g = torch.Generator().manual_seed(12)
    x = _layout((torch.randn(3, 5, 40, 41, generator=g) * 2 + 3).to(DEV), layout)
    r = torch.randn(x.shape, generator=g).to(DEV)
    check_train(x, r, "relu")
    assert "bn_stats_finalize_kernel" in seen and "bn_bwd_finalize_kernel" in seen


def test_gradient_expanded_dy():
    # y.sum().backward() hands the kernel a dy with all strides 0
    x = (torch.randn(4, 3, 5, 6) * 3).to(DEV)
    xg, wg, bg, _, y = run_train(x, *_params(3)[:2], None, "relu")
    y.sum().backward()
    w, b = _params(3)[:2]
    _, dx_ref, dg_ref, db_ref, g_ref, cache = reference_train(x, w, b, None, torch.ones_like(x), "relu")
    assert_rel_close(xg.grad, dx_ref, F32, "dx", scale=dx_scale(g_ref, w, cache.rstd, 4))
    assert_rel_close(wg.grad, dg_ref, F32, "dgamma")
    assert_rel_close(bg.grad, db_ref, F32, "dbeta")


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_offset(offset):
    # |mean| >> std: the per-channel shift keeps float32 statistics and xhat exact
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 3, 5, 7, generator=g) + offset).to(DEV)
    check_train(x, None, "relu", momentum=None)
    # eval with a running mean of the same size: no cancellation either
    w, b, _, _ = _params(3)
    rm = torch.full((3,), offset, device=DEV) + torch.randn(3, generator=g).to(DEV)
    rv = torch.full((3,), 2.0, device=DEV)
    y = batch_norm(x, rm, rv, w, b, False, 0.1, EPS, backend="triton")
    assert_rel_close(y, R.batch_norm_eval(_np(x), _np(rm), _np(rv), _np(w), _np(b), EPS), F32, "y (eval)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_train_half(dtype, layout):
    # half inputs, half parameters; statistics and the running statistics stay float32
    g = torch.Generator().manual_seed(5)
    x = _layout((torch.randn(5, 3, 7, 9, generator=g) + 1).to(DEV, dtype), layout)
    r = torch.randn(x.shape, generator=g).to(DEV, dtype)
    check_train(x, r, "relu", dtype_tol=REL_TOL[dtype])


def test_half_with_float32_params():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 6, 5, generator=g).to(DEV, torch.bfloat16)
    w, b, rm, rv = _params(3)
    _xg, wg, bg, _, y = run_train(x, w, b, None, "silu", rm=rm, rv=rv)
    y.backward(torch.ones_like(y))
    assert wg.grad.dtype == torch.float32 and y.dtype == torch.bfloat16
    y_ref, _dx_ref, dg_ref, db_ref, _, _ = reference_train(x, w, b, None, torch.ones_like(y), "silu")
    tol = REL_TOL[torch.bfloat16]
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(wg.grad, dg_ref, tol, "dgamma")
    assert_rel_close(bg.grad, db_ref, tol, "dbeta")


@pytest.mark.parametrize(
    "shape,layout", [((5, 3, 7, 9), "contiguous"), ((5, 3, 7, 9), "channels_last"), ((7, 5), "contiguous")]
)
@pytest.mark.parametrize("act,res", [("relu", True), ("silu", False)])
def test_eval(shape, layout, act, res):
    """Inference: y and the gradients with the running statistics held constant."""
    g = torch.Generator().manual_seed(7)
    x = _layout(torch.randn(shape, generator=g).to(DEV), layout).requires_grad_(True)
    w, b, rm, rv = _params(shape[1])
    w.requires_grad_(True)
    b.requires_grad_(True)
    r = torch.randn(shape, generator=g).to(DEV).requires_grad_(True) if res else None
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, False, 0.1, EPS, residual=r, activation=act, backend="triton")
    dy = torch.randn(shape, generator=g).to(DEV)
    y.backward(dy)

    ps = R.param_shape(len(shape))
    bn = R.batch_norm_eval(_np(x), _np(rm), _np(rv), _np(w), _np(b), EPS)
    z = bn + (_np(r) if res else 0.0)
    gz = _act_grad(_np(dy), z, act)
    rstd = 1.0 / np.sqrt(_np(rv) + EPS)
    xhat = (_np(x) - _np(rm).reshape(ps)) * rstd.reshape(ps)
    axes = R.batch_norm_axes(len(shape))
    assert_rel_close(y, _act(z, act), F32, "y (eval)")
    assert_rel_close(x.grad, gz * (_np(w) * rstd).reshape(ps), F32, "dx (eval)")
    assert_rel_close(w.grad, (gz * xhat).sum(axis=axes), F32, "dgamma (eval)")
    assert_rel_close(b.grad, gz.sum(axis=axes), F32, "dbeta (eval)")
    if res:
        assert_rel_close(r.grad, gz, F32, "d residual (eval)")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_deterministic():
    # no atomics: two runs are bit-identical, forward and backward
    x = torch.randn(3, 2, 40, 41, generator=torch.Generator().manual_seed(8)).to(DEV)
    outs = []
    for _ in range(2):
        xg, wg, bg, _, y = run_train(x, *_params(2)[:2], None, "silu")
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xg.grad, wg.grad, bg.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_float64_falls_back_to_exact_path():
    # the kernels compute in float32; float64 inputs go to the ATen backend and keep float64 accuracy
    x = torch.randn(4, 3, 5, dtype=torch.float64, device=DEV)
    w, b = torch.ones(3, dtype=torch.float64, device=DEV), torch.zeros(3, dtype=torch.float64, device=DEV)
    y = batch_norm(x, None, None, w, b, True, backend="triton")
    assert_rel_close(y, R.batch_norm_train(_np(x), _np(w), _np(b), EPS)[0], REL_TOL[torch.float64], "y")


def test_rejected_calls_change_nothing():
    x = torch.randn(4, 3, 5, 5, device=DEV)
    w, b, rm, rv = _params(3)
    nbt = torch.tensor(2, device=DEV)
    before = (rm.clone(), rv.clone(), nbt.clone())
    with pytest.raises(TypeError, match="residual.to"):  # wrong residual dtype
        batch_norm(x, rm, rv, w, b, True, num_batches_tracked=nbt, residual=x.double(), backend="triton")
    with pytest.raises(ValueError, match="activation"):
        batch_norm(x, rm, rv, w, b, True, num_batches_tracked=nbt, activation="gelu", backend="triton")
    with pytest.raises(ValueError, match="residual"):  # wrong residual shape
        batch_norm(x, rm, rv, w, b, True, num_batches_tracked=nbt, residual=x[:2], backend="triton")
    with pytest.raises(ValueError, match="more than 1 value"):
        batch_norm(x[:1, :, :1, :1], rm, rv, w, b, True, num_batches_tracked=nbt, backend="triton")
    for a, b_ in zip(before, (rm, rv, nbt)):
        assert torch.equal(a, b_)


def test_custom_ops_opcheck():
    # schema, fake (meta) implementation and autograd registration, as torch.library checks them
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 2, 5, generator=g).to(DEV).requires_grad_(True)
    w = torch.rand(2, generator=g).to(DEV).requires_grad_(True)
    b = torch.randn(2, generator=g).to(DEV).requires_grad_(True)
    r = torch.randn(3, 2, 5, generator=g).to(DEV).requires_grad_(True)
    torch.library.opcheck(ops.bn_act_train, (x, w, b, r, EPS, "silu"))
    rm, rv = torch.zeros(2, device=DEV), torch.ones(2, device=DEV)
    torch.library.opcheck(ops.bn_act_infer, (x, rm, rv, w, b, r, EPS, "relu"))


# --- GPU only: larger shapes, every dtype and layout, against the reference and torch.nn -------

GPU_SHAPES = [
    ((32, 64, 28, 28), "a ResNet stage-2 layer"),
    ((16, 4, 256, 255), "few channels, huge spatial extent: the split reduction across many programs"),
    ((256, 1000), "2-D, many channels"),
    ((4, 16, 8, 16, 17), "5-D"),
]


GPU_CASES = [
    (shape, layout)
    for shape, _ in GPU_SHAPES
    for layout in (["contiguous", "channels_last"] if len(shape) >= 4 else ["contiguous"])
]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape,layout", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act,res", [("relu", True), ("silu", False)])
def test_gpu_large(shape, layout, dtype, act, res):
    g = torch.Generator().manual_seed(10)
    x = _layout((torch.randn(shape, generator=g) * 3 + 2).to(DEV, dtype), layout)
    r = torch.randn(shape, generator=g).to(DEV, dtype) if res else None
    check_train(x, r, act, dtype_tol=REL_TOL[dtype])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vs_torch_nn(dtype):
    # against torch.nn.BatchNorm2d + add + relu, same dtype, several steps then eval
    from batchnorm.nn.fused import BatchNormAct2d

    ours = BatchNormAct2d(64, backend="triton").to(DEV, dtype)
    ref = torch.nn.BatchNorm2d(64).to(DEV, dtype)
    g = torch.Generator().manual_seed(11)
    tol = REL_TOL[dtype]
    for _ in range(3):
        x = torch.randn(32, 64, 14, 14, generator=g).to(DEV, dtype).contiguous(memory_format=torch.channels_last)
        r = torch.randn(x.shape, generator=g).to(DEV, dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa, r), torch.relu(ref(xb) + r)
        dy = torch.randn(x.shape, generator=g).to(DEV, dtype)
        ya.backward(dy)
        yb.backward(dy)
        assert_rel_close(ya, yb, tol, "y vs torch.nn")
        assert_rel_close(xa.grad, xb.grad, tol, "dx vs torch.nn")
        assert_rel_close(ours.weight.grad, ref.weight.grad, tol, "dgamma vs torch.nn")
    assert_rel_close(ours.running_mean, ref.running_mean, tol, "running_mean vs torch.nn")
    assert_rel_close(ours.running_var, ref.running_var, tol, "running_var vs torch.nn")
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval()
    ref.eval()
    assert_rel_close(ours(x, r), torch.relu(ref(x) + r), tol, "eval vs torch.nn")
