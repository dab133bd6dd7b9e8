"""The one normalization pipeline, across every entry point: validation at forward time, overflow,
exactness at large offsets for every norm, empty batches, double backward and error classes."""

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import functional as BF
from batchnorm import reference as R
from batchnorm.errors import InputError, NonFiniteError
from batchnorm.functional.normalize import normalize
from batchnorm.functional.stats import moments
from family._util import assert_unchanged, data, np64, snapshot
from tolerances import LARGE_OFFSET_TOL, REL_TOL, assert_rel_close, rel_err

F32 = REL_TOL[torch.float32]


def _buffers(c=3):
    return torch.randn(c), torch.rand(c) + 0.5, torch.tensor(4)


#: every functional entry point, called in training with running statistics and the given eps
ENTRY_POINTS = {
    "batch_norm": lambda x, rm, rv, nbt, eps: BF.batch_norm(x, rm, rv, training=True, eps=eps, num_batches_tracked=nbt),
    "batch_norm eval": lambda x, rm, rv, nbt, eps: BF.batch_norm(x, rm, rv, training=False, eps=eps),
    "ghost": lambda x, rm, rv, nbt, eps: BF.ghost_batch_norm(x, rm, rv, training=True, eps=eps, virtual_batch_size=2,
                                                             num_batches_tracked=nbt),
    "renorm": lambda x, rm, rv, nbt, eps: BF.batch_renorm(x, rm, rv, training=True, eps=eps, num_batches_tracked=nbt),
    "instance": lambda x, rm, rv, nbt, eps: BF.instance_norm(x, rm, rv, eps=eps, num_batches_tracked=nbt),
    "sync (one process)": lambda x, rm, rv, nbt, eps: batchnorm.distributed.sync_batch_norm(
        x, rm, rv, eps=eps, num_batches_tracked=nbt),
    "group": lambda x, rm, rv, nbt, eps: BF.group_norm(x, 3, eps=eps),
    "layer": lambda x, rm, rv, nbt, eps: BF.layer_norm(x, x.shape[1:], eps=eps),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf"), "1e-5", True])
def test_bad_eps_rejected_on_every_path_and_nothing_changes(name, eps):
    rm, rv, nbt = _buffers()
    before = [t.clone() for t in (rm, rv, nbt)]
    with pytest.raises((InputError, TypeError), match="eps"):
        ENTRY_POINTS[name](data((4, 3, 5), 0), rm, rv, nbt, eps)
    for t, t0 in zip((rm, rv, nbt), before):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_eps_zero_accepted_as_in_torch_nn(name):
    rm, rv, nbt = _buffers()
    y = ENTRY_POINTS[name](data((4, 3, 5), 0), rm, rv, nbt, 0)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("cls,shape", [(batchnorm.BatchNorm2d, (4, 3, 2, 2)), (batchnorm.GhostBatchNorm1d, (4, 3)),
                                       (batchnorm.BatchRenorm1d, (4, 3)), (batchnorm.InstanceNorm1d, (4, 3, 5)),
                                       (batchnorm.SyncBatchNorm, (4, 3, 2))])  # fmt: skip
def test_eps_changed_after_construction_is_checked_at_forward(cls, shape):
    kw = {"virtual_batch_size": 2} if cls is batchnorm.GhostBatchNorm1d else {}
    if cls is batchnorm.InstanceNorm1d:
        kw = {"track_running_stats": True}
    m = cls(3, **kw)
    m(data(shape, 1))
    m.eps = -1.0
    snap = snapshot(m)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        m(data(shape, 2))
    assert_unchanged(m, snap)


# --- check_finite catches overflow, not only NaN/Inf input -------------------------------------------

OVERFLOW = {
    "float32 near 1e20": (lambda: data((8, 3), 0) * 1e20, torch.float32),
    "bfloat16 near 1e30": (lambda: (data((8, 3), 0) * 1e30).bfloat16(), torch.float32),
    "float16 buffers overflow": (lambda: (data((8, 3), 0) * 3000).half(), torch.float16),  # 0.1 * var > 65504
}


@pytest.mark.parametrize("case", sorted(OVERFLOW))
@pytest.mark.parametrize("cls", [batchnorm.BatchNorm1d, batchnorm.BatchRenorm1d, batchnorm.GhostBatchNorm1d])
def test_check_finite_catches_overflowing_statistics(case, cls):
    make_x, buffer_dtype = OVERFLOW[case]
    x = make_x()
    assert torch.isfinite(x).all()
    kw = {"virtual_batch_size": 4} if cls is batchnorm.GhostBatchNorm1d else {}
    m = cls(3, check_finite=True, **kw).to(buffer_dtype)
    snap = snapshot(m)
    with pytest.raises(FloatingPointError, match="not finite"):
        m(x)
    assert_unchanged(m, snap)
    unchecked = cls(3, **kw).to(buffer_dtype)
    unchecked(x)  # the failure the check prevents
    assert not torch.isfinite(unchecked.running_var).all()


def test_errors_are_catchable_as_torch_nn_raises_them():
    bn = batchnorm.BatchNorm2d(3)
    for bad, builtin in ((torch.randn(2, 3, 4), ValueError), (torch.randn(2, 5, 4, 4), RuntimeError),
                         (torch.ones(2, 3, 2, 2, dtype=torch.int64), RuntimeError),
                         (torch.randn(2, 3, 2, 2, dtype=torch.float64), RuntimeError)):  # fmt: skip
        with pytest.raises(builtin):
            bn(bad)
    with pytest.raises(NonFiniteError):
        batchnorm.BatchNorm1d(3, check_finite=True)(torch.full((4, 3), float("nan")))


# --- exact at large offsets: every norm ----------------------------------------------------------------


def _offset_input(shape, offset=1e6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + offset).float()


NORMS = {
    "GroupNorm": (lambda: batchnorm.GroupNorm(2, 6), torch.nn.GroupNorm(2, 6), lambda x: R.group_norm(x, 2)),
    "LayerNorm": (lambda: batchnorm.LayerNorm([6, 4, 4]), torch.nn.LayerNorm([6, 4, 4]),
                  lambda x: R.layer_norm(x, (6, 4, 4))),
    "LayerNorm last dim": (lambda: batchnorm.LayerNorm(4), torch.nn.LayerNorm(4), lambda x: R.layer_norm(x, (4,))),
    "InstanceNorm2d": (lambda: batchnorm.InstanceNorm2d(6), torch.nn.InstanceNorm2d(6), R.instance_norm),
    "BatchNorm2d": (lambda: batchnorm.BatchNorm2d(6), torch.nn.BatchNorm2d(6), lambda x: R.batch_norm_train(x)[0]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_exact_at_mean_1e6(name):
    make, theirs, reference = NORMS[name]
    x = _offset_input((5, 6, 4, 4)).requires_grad_(True)
    y_ref = reference(np64(x))
    y = make()(x)
    assert_rel_close(y, y_ref, F32, f"{name} at mean 1e6")  # the issue asks for 1e-3; float32 rounding is reached
    assert rel_err(theirs(x), y_ref) > LARGE_OFFSET_TOL  # torch.nn at the same input: worse than 1e-3
    # gradients: the shift is a constant, so they are those of the unshifted input
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = {"GroupNorm": lambda t: torch.nn.functional.group_norm(t, 2),
           "LayerNorm": lambda t: torch.nn.functional.layer_norm(t, (6, 4, 4)),
           "LayerNorm last dim": lambda t: torch.nn.functional.layer_norm(t, (4,)),
           "InstanceNorm2d": torch.nn.functional.instance_norm,
           "BatchNorm2d": lambda t: torch.nn.functional.batch_norm(t, None, None, training=True)}[name](x64)  # fmt: skip
    (gx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_rel_close(gx, gx64, 1e-4, f"{name} dx at mean 1e6")


# --- empty batches: torch.nn's output, zero gradients, nothing changes -----------------------------------

EMPTY = [
    (batchnorm.BatchNorm2d, (0, 5, 2, 2)),
    (batchnorm.BatchNorm2d, (3, 5, 0, 2)),
    (batchnorm.BatchNorm1d, (0, 5)),
    (batchnorm.BatchNorm3d, (0, 5, 2, 2, 2)),
    (batchnorm.SyncBatchNorm, (0, 5, 2)),
    (batchnorm.GhostBatchNorm2d, (0, 5, 2, 2)),
    (batchnorm.BatchRenorm2d, (0, 5, 2, 2)),
]


@pytest.mark.parametrize("cls,shape", EMPTY, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_torch_nn(cls, shape, training):
    m = cls(5).train(training)
    snap = snapshot(m)
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()  # torch.nn returns zero gradients (this crashed the process with SIGFPE)
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.equal(m.weight.grad, torch.zeros(5)) and torch.equal(m.bias.grad, torch.zeros(5))
    assert_unchanged(m, snap)


# --- double backward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["batch_norm", "ghost", "renorm", "shifted"])
def test_double_backward(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    # renorm's r and d are constants by definition (stop-gradient); with running statistics far from the
    # batch's both sit at their clip limits, so the definition and finite differences agree
    rm, rv = torch.full((3,), -100.0, dtype=torch.float64), torch.full((3,), 1e-4, dtype=torch.float64)

    def f(x, w, b):
        if name == "batch_norm":
            return BF.batch_norm(x, None, None, w, b, training=True)
        if name == "ghost":
            return BF.ghost_batch_norm(x, None, None, w, b, training=True, virtual_batch_size=2)
        if name == "renorm":
            return BF.batch_renorm(x, rm.clone(), rv.clone(), w, b, training=True, r_max=1.5, d_max=0.5)
        st = moments(x)  # the given-statistics Function with a shift
        st = st._replace(shift=torch.full((3,), 0.25, dtype=torch.float64), mean=st.mean - 0.25)
        return normalize(x, st, w, b, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_through_an_all_reduce_is_a_clear_error():
    x = torch.randn(4, 3, requires_grad=True)
    y = normalize(x, moments(x), None, None, 1e-5, hook=lambda local: (local, 4))
    (gx,) = torch.autograd.grad(y.square().sum(), x)  # first order works
    assert gx.shape == x.shape
    y = normalize(x, moments(x), None, None, 1e-5, hook=lambda local: (local, 4))
    with pytest.raises(RuntimeError, match="double backward through SyncBatchNorm"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_sync_backward_formula_matches_batch_norm():
    """The reduce -> hook -> elementwise backward (with a hook that is the identity, one 'rank')
    equals the native training backward."""
    x = data((6, 3, 5), 3).requires_grad_(True)
    w = torch.rand(3, requires_grad=True)
    dy = data((6, 3, 5), 4)
    y = normalize(x, moments(x), w, None, 1e-5, hook=lambda local: (local, 30))
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    x2 = x.detach().requires_grad_(True)
    w2 = w.detach().requires_grad_(True)
    gx2, gw2 = torch.autograd.grad(BF.batch_norm(x2, None, None, w2, None, training=True), (x2, w2), dy)
    assert_rel_close(gx, gx2, F32, "dx", scale=float(dy.norm()))
    assert_rel_close(gw, gw2, F32, "dweight")
    assert np.isfinite(np64(gx)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["batch_norm", "ghost", "renorm"])
def test_half_inputs_through_every_source(name, dtype):
    """Half-precision input, float32 parameters and statistics: output and gradient against the float64
    reference of the rounded input, at the dtype's tolerance."""
    x = data((6, 3, 5), 7, offset=2.0).to(dtype).requires_grad_(True)
    w = (torch.rand(3) + 0.5).requires_grad_(True)
    rm, rv = torch.zeros(3), torch.ones(3)
    if name == "batch_norm":
        y = BF.batch_norm(x, rm, rv, w, None, training=True)
        y_ref = R.batch_norm_train(np64(x), np64(w))[0]
    elif name == "ghost":
        y = BF.ghost_batch_norm(x, rm, rv, w, None, training=True, virtual_batch_size=2)
        y_ref = np.concatenate([R.batch_norm_train(p, np64(w))[0] for p in np.split(np64(x), 3)])
    else:  # r and d at their limits (running statistics far away), so the reference is closed-form
        rm.fill_(-100.0), rv.fill_(1e-4)
        y = BF.batch_renorm(x, rm, rv, w, None, training=True, r_max=1.5, d_max=0.5)
        y_ref, *_ = R.batch_renorm_train(np64(x), np.full(3, -100.0), np.full(3, 1e-4), np64(w), None, 1e-5, 1.5, 0.5)
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, REL_TOL[dtype], f"{name} {dtype}")
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    rm0 = -100.0 if name == "renorm" else 0.0
    assert_rel_close(rm, rm0 + 0.1 * (np64(x).mean((0, 2)) - rm0), REL_TOL[dtype], "running_mean (momentum 0.1)")


def test_instance_norm_check_finite():
    m = batchnorm.InstanceNorm2d(3, track_running_stats=True, check_finite=True)
    m(data((2, 3, 4, 4), 0))
    snap = snapshot(m)
    x = data((2, 3, 4, 4), 1)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        m(x)
    assert_unchanged(m, snap)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        m.eval()(x)
