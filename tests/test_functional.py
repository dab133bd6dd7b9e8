"""batchnorm.functional.batch_norm (aten backend) against the float64 reference."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchnorm import functional as BF
from batchnorm import reference as R
from batchnorm.functional import stats as S
from tolerances import LARGE_OFFSET_TOL, REL_TOL, assert_rel_close, rel_err

F32 = REL_TOL[torch.float32]


def _np(t):
    return t.detach().double().numpy().copy()


def check_train_step(x, weight, bias, rm, rv, nbt, momentum, eps=1e-5, dtype_tol=F32, **kw):
    """One training step through functional.batch_norm, checked against the reference in full:
    y, dx, dgamma, dbeta and the running statistics."""
    rm_before, rv_before = _np(rm), _np(rv)
    steps_before = int(nbt)
    xr = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    y = BF.batch_norm(xr, rm, rv, w, b, True, momentum, eps, num_batches_tracked=nbt, backend="aten", **kw)
    dy = torch.randn_like(y)
    y.backward(dy)

    y_ref, cache = R.batch_norm_train(_np(x), _np(weight), _np(bias), eps)
    dx_ref, dg_ref, db_ref = R.batch_norm_backward(_np(dy), cache)
    assert_rel_close(y, y_ref, dtype_tol, "y")
    # dx is a cancellation of terms of size |gamma * rstd * dy|: errors are relative to those
    dx_scale = float(np.linalg.norm(_np(dy) * (_np(weight) * cache.rstd.ravel()).reshape(R.param_shape(x.dim()))))
    assert_rel_close(xr.grad, dx_ref, dtype_tol, "dx", scale=dx_scale)
    # dgamma = sum(dy * xhat), dbeta = sum(dy): reductions whose rounding is relative to
    # their terms (|xhat| ~ 1), not to a result that may nearly cancel
    assert_rel_close(w.grad, dg_ref, dtype_tol, "dgamma", scale=float(dy.double().norm()))
    assert_rel_close(b.grad, db_ref, dtype_tol, "dbeta", scale=float(dy.double().norm()))
    rm_ref, rv_ref = R.running_update(rm_before, rv_before, cache.moments, momentum, steps_before + 1)
    assert_rel_close(rm, rm_ref, dtype_tol, "running_mean")
    assert_rel_close(rv, rv_ref, dtype_tol, "running_var")
    assert int(nbt) == steps_before + 1
    return y


def check_eval_step(x, weight, bias, rm, rv, eps=1e-5, dtype_tol=F32):
    y = BF.batch_norm(x, rm, rv, weight, bias, False, 0.1, eps, backend="aten")
    y_ref = R.batch_norm_eval(_np(x), _np(rm), _np(rv), _np(weight), _np(bias), eps)
    assert_rel_close(y, y_ref, dtype_tol, "y (eval)")
    return y


def _state(c, dtype=torch.float32):
    g = torch.Generator().manual_seed(c)
    return (
        torch.randn(c, generator=g, dtype=dtype) * 0.5 + 1,
        torch.randn(c, generator=g, dtype=dtype),
        torch.zeros(c, dtype=dtype),
        torch.ones(c, dtype=dtype),
        torch.tensor(0),
    )


# why each shape: 2D input; N=2 (smallest legal batch); C=1; odd & prime sizes; 4D; 5D;
# a huge spatial extent with few channels (one reduction of 2*131071 values per channel)
SHAPES = [(7, 5), (2, 3, 11), (3, 1, 13), (5, 3, 7, 3), (2, 4, 3, 5, 7), (2, 3, 131071)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_eval_sequence_against_reference(shape, momentum):
    torch.manual_seed(0)
    weight, bias, rm, rv, nbt = _state(shape[1])
    for step in range(3):
        x = torch.randn(shape) * (1 + step) + step
        check_train_step(x, weight, bias, rm, rv, nbt, momentum)
        check_eval_step(torch.randn(shape), weight, bias, rm, rv)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 9),
    c=st.integers(1, 6),
    spatial=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    channels_last=st.booleans(),
    momentum=st.sampled_from([0.1, 0.01, 1.0, None]),
    scale=st.floats(0.01, 100.0),
    offset=st.floats(-1e3, 1e3),
)
def test_hypothesis_shapes(n, c, spatial, channels_last, momentum, scale, offset):
    torch.manual_seed(n * 31 + c)  # dy is drawn from the global generator
    shape = (n, c, *spatial)
    x = torch.randn(shape) * scale + offset
    if channels_last and len(shape) in (4, 5):
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    weight, bias, rm, rv, nbt = _state(c)
    check_train_step(x, weight, bias, rm, rv, nbt, momentum)
    check_train_step(x * 0.5 - 1, weight, bias, rm, rv, nbt, momentum)
    check_eval_step(x, weight, bias, rm, rv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_against_reference(dtype):
    tol = REL_TOL[dtype]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias, rm, rv, nbt = _state(4, param_dtype)
    x = (torch.randn(6, 4, 5, 3) * 2 + 1).to(dtype)
    y = check_train_step(x, weight, bias, rm, rv, nbt, 0.1, dtype_tol=tol)
    assert y.dtype == dtype
    assert rm.dtype == param_dtype
    check_eval_step(x, weight, bias, rm, rv, dtype_tol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_parameters_keep_float32_statistics(dtype):
    # a model converted with .half(): parameters and buffers in half, statistics still in float32
    weight, bias, rm, rv, nbt = (t.to(dtype) if t.is_floating_point() else t for t in _state(3))
    x = (torch.randn(64, 3, 9) + 3).to(dtype)
    rm_before = _np(rm)
    y = BF.batch_norm(x, rm, rv, weight, bias, True, 0.5, num_batches_tracked=nbt)
    assert S.moments(x).mean.dtype == torch.float32
    st_ref = R.moments(_np(x), (0, 2))
    assert_rel_close(rm, 0.5 * rm_before + 0.5 * st_ref.mean.ravel(), REL_TOL[dtype], "running_mean")
    assert y.dtype == rm.dtype == dtype


@pytest.mark.parametrize("memory_format,ndim", [(torch.channels_last, 4), (torch.channels_last_3d, 5)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1e6])  # 1e6 also exercises the re-centred path
def test_output_keeps_memory_format(memory_format, ndim, training, offset):
    shape = (3, 5, 4, 6) if ndim == 4 else (2, 5, 3, 4, 2)
    x = (torch.randn(shape) + offset).to(memory_format=memory_format)
    weight, bias, rm, rv, _ = _state(5)
    if not training:
        rm += offset
    y = BF.batch_norm(x, rm, rv, weight, bias, training, 0.1)
    assert y.is_contiguous(memory_format=memory_format)
    y.sum().backward() if y.requires_grad else None


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_offsets_train_and_eval(offset):
    """mean 1e4 / 1e6 with std 1: torch.nn's float32 mean is off by ulp(mean)/2; ours is exact."""
    torch.manual_seed(1)
    x = torch.randn(32, 3, 8, 8, dtype=torch.float64) + offset
    x = x.float()  # the float32 values are the input; the reference sees exactly them
    weight, bias, rm, rv, nbt = _state(3)
    # training: y and dx to fp32 accuracy (not merely the 1e-3 the issue demands)
    check_train_step(x, weight, bias, rm, rv, nbt, 1.0)
    # eval with running statistics near the data: the native x*scale+shift form cancels
    y_ref = R.batch_norm_eval(_np(x), _np(rm), _np(rv), _np(weight), _np(bias))
    y = BF.batch_norm(x, rm, rv, weight, bias, False)
    assert rel_err(y, y_ref) < F32
    # the claim we beat: torch.nn in training mode at 1e6 is worse than the 1e-3 bar
    if offset == 1e6:
        y_torch = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)
        y_ref_train, _ = R.batch_norm_train(_np(x), _np(weight), _np(bias))
        assert rel_err(y_torch, y_ref_train) > LARGE_OFFSET_TOL


def test_large_offset_under_compile():
    x = (torch.randn(16, 3, 4, 4, dtype=torch.float64) + 1e6).float()
    f = torch.compile(lambda x: BF.batch_norm(x, None, None, training=True), fullgraph=True, backend="aot_eager")
    y_ref, _ = R.batch_norm_train(_np(x))
    assert_rel_close(f(x), y_ref, F32, "compiled, offset 1e6")


def test_constant_channel():
    x = torch.randn(4, 3, 5)
    x[:, 1] = 7.0  # zero variance: y = beta, running_var moves toward 0
    weight, bias, rm, rv, nbt = _state(3)
    y = check_train_step(x, weight, bias, rm, rv, nbt, 0.1)
    assert torch.equal(y[:, 1], bias[1].expand(4, 5))
    assert rv[1].item() == pytest.approx(0.9, abs=1e-7)


def test_residual_and_activation_epilogue():
    x = torch.randn(4, 3, 5, requires_grad=True)
    res = torch.randn(4, 3, 5, requires_grad=True)
    weight, bias, *_ = _state(3)
    for act, fn in (("relu", lambda v: np.maximum(v, 0)), ("silu", lambda v: v / (1 + np.exp(-v)))):
        y = BF.batch_norm(x, None, None, weight, bias, True, residual=res, activation=act)
        y_ref = fn(R.batch_norm_train(_np(x), _np(weight), _np(bias))[0] + _np(res))
        assert_rel_close(y, y_ref, F32, f"bn+residual+{act}")


def test_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return BF.batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    rm, rv = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: BF.batch_norm(x, rm, rv, w, b, training=False), (x, w, b))


# --- bad input: a clear error, and nothing changes ---------------------------------------

BAD_CALLS = {
    "1-D input": (lambda: torch.randn(5), {}, ValueError, "at least 2 dimensions"),
    "channel mismatch": (lambda: torch.randn(4, 5, 3), {}, ValueError, "5 channels"),
    "one value per channel": (lambda: torch.randn(1, 3), {}, ValueError, "more than 1 value per channel"),
    "one value per channel 4d": (lambda: torch.randn(1, 3, 1, 1), {}, ValueError, "larger batch"),
    "integer input": (lambda: torch.ones(4, 3, dtype=torch.int64), {}, TypeError, "floating-point"),
    "bool input": (lambda: torch.ones(4, 3, dtype=torch.bool), {}, TypeError, "floating-point"),
    "weight dtype": (lambda: torch.randn(4, 3), {"weight": torch.ones(3, dtype=torch.float64)}, TypeError, "dtype"),
    "weight device": (lambda: torch.randn(4, 3), {"weight": torch.ones(3, device="meta")}, ValueError, "on meta"),
    "momentum > 1": (lambda: torch.randn(4, 3), {"momentum": 1.5}, ValueError, "decay"),
    "residual shape": (lambda: torch.randn(4, 3), {"residual": torch.randn(4, 1)}, ValueError, "residual"),
    "activation": (lambda: torch.randn(4, 3), {"activation": "tanh"}, ValueError, "activation"),
    "backend": (lambda: torch.randn(4, 3), {"backend": "cuda"}, ValueError, "backend"),
    "nan with check_finite": (lambda: torch.tensor([[1.0, 2, 3], [float("nan"), 1, 1]]), {"check_finite": True},
                              FloatingPointError, "not finite"),
    "inf with check_finite": (lambda: torch.tensor([[1.0, 2, 3], [float("inf"), 1, 1]]), {"check_finite": True},
                              FloatingPointError, "not finite"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(case):
    make_x, kwargs, exc, match = BAD_CALLS[case]
    rm, rv, nbt = torch.randn(3), torch.rand(3) + 0.5, torch.tensor(5)
    before = [t.clone() for t in (rm, rv, nbt)]
    with pytest.raises(exc, match=match):
        BF.batch_norm(make_x(), rm, rv, training=True, num_batches_tracked=nbt, **kwargs)
    for t, t0 in zip((rm, rv, nbt), before):
        assert torch.equal(t, t0), "a rejected call changed the running statistics"


def test_check_finite_in_eval_mode():
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        BF.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, check_finite=True)


def test_momentum_none_needs_a_counter():
    with pytest.raises(ValueError, match="num_batches_tracked"):
        BF.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)


def test_eval_without_running_stats_is_an_error():
    with pytest.raises(ValueError, match="needs running_mean"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_eval_precision_decision_follows_buffer_changes():
    """The off-centre decision for running statistics is cached; every way of changing them invalidates it."""
    torch.manual_seed(2)
    bn_x = torch.randn(16, 3, 4, 4)
    weight, bias, rm, rv, _ = _state(3)
    BF.batch_norm(bn_x, rm, rv, weight, bias, False)  # decides "not off-centre" and caches it
    x = (bn_x.double() + 1e6).float()
    for change in (lambda: rm.fill_(1e6), lambda: rm.copy_(torch.full((3,), 1e6))):
        rm.zero_()
        BF.batch_norm(bn_x, rm, rv, weight, bias, False)
        change()
        y_ref = R.batch_norm_eval(_np(x), _np(rm), _np(rv), _np(weight), _np(bias))
        assert_rel_close(BF.batch_norm(x, rm, rv, weight, bias, False), y_ref, F32, "eval after buffer change")
    # a module whose buffers are replaced by load_state_dict
    from batchnorm import BatchNorm2d

    bn = BatchNorm2d(3).eval()
    bn(bn_x)
    bn.load_state_dict({**bn.state_dict(), "running_mean": torch.full((3,), 1e6)})
    y_ref = R.batch_norm_eval(_np(x), _np(bn.running_mean), _np(bn.running_var), np.ones(3), np.zeros(3))
    assert_rel_close(bn(x), y_ref, F32, "eval after load_state_dict")
