"""batchnorm.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d and the reference."""

import io

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import reference as R
from tolerances import REL_TOL, REL_TOL_VS_TORCH, assert_rel_close

PAIRS = {
    1: (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d),
}
# (kind, input shape): 1d on (N, C) and (N, C, L); 2d with odd spatial; 3d small
CASES = [(1, (8, 5)), (1, (4, 5, 7)), (2, (3, 5, 7, 3)), (3, (2, 5, 3, 4, 3))]
CONFIGS = [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(eps=1e-3, momentum=0.3),
    dict(bias=False),
]


def _pair(kind, **kw):
    ours_cls, theirs_cls = PAIRS[kind]
    ours, theirs = ours_cls(5, **kw), theirs_cls(5, **kw)
    if ours.affine:
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 2.0, 5))
                if m.bias is not None:
                    m.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    return ours, theirs


def _assert_same_state(ours, theirs, tol):
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert_rel_close(a, b, tol, name)
    if theirs.num_batches_tracked is not None:
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("kind,shape", CASES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_torch_nn_over_train_and_eval(kind, shape, config):
    tol = REL_TOL_VS_TORCH[torch.float32]
    ours, theirs = _pair(kind, **config)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(shape, generator=gen) * (step + 1) + step
        for m in (ours, theirs):
            m.train(step != 2)  # a train, train, eval, train sequence
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), theirs(xb)
        assert_rel_close(ya, yb, tol, f"output step {step}")
        dy = torch.randn(shape, generator=gen)
        ya.backward(dy)
        yb.backward(dy)
        assert_rel_close(xa.grad, xb.grad, tol, f"dx step {step}", scale=float(dy.norm()))
        if ours.affine:
            assert_rel_close(ours.weight.grad, theirs.weight.grad, tol, "dgamma")
            if ours.bias is not None:
                assert_rel_close(ours.bias.grad, theirs.bias.grad, tol, "dbeta")
            ours.zero_grad(), theirs.zero_grad()
        _assert_same_state(ours, theirs, tol)


def test_module_against_reference_running_stats():
    bn = batchnorm.BatchNorm2d(3, momentum=None)
    batches = [np.random.default_rng(i).normal(i, 1 + i, size=(4, 3, 5, 2)) for i in range(3)]
    for b in batches:
        bn(torch.tensor(b, dtype=torch.float32))
    rm, rv = R.running_stats_after(batches, None)
    assert_rel_close(bn.running_mean, rm, REL_TOL[torch.float32], "running_mean")
    assert_rel_close(bn.running_var, rv, REL_TOL[torch.float32], "running_var")
    assert int(bn.num_batches_tracked) == 3


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_state_dict_loads_both_ways(kind):
    ours_cls, theirs_cls = PAIRS[kind]
    src = theirs_cls(5, momentum=0.2)
    shape = {1: (6, 5), 2: (3, 5, 4, 4), 3: (2, 5, 2, 3, 3)}[kind]
    with torch.no_grad():
        src.weight.uniform_(), src.bias.uniform_()
    src(torch.randn(shape))
    # torch.nn -> ours, through a serialized file as users do it
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    ours = ours_cls(5, momentum=0.2)
    ours.load_state_dict(torch.load(buf, weights_only=True))
    assert list(ours.state_dict()) == list(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    # ours -> torch.nn, after training ours
    ours(torch.randn(shape))
    back = theirs_cls(5, momentum=0.2)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ours.eval(), back.eval()
    x = torch.randn(shape)
    assert_rel_close(ours(x), back(x), REL_TOL_VS_TORCH[torch.float32], "eval after round trip")


@pytest.mark.parametrize("strict", [True, False])
def test_checkpoint_without_num_batches_tracked_like_torch_nn(strict):
    """A pre-1.0 checkpoint (version 1, no counter) and a partial load: the counter is what torch.nn keeps."""
    for version in (1, 2):
        sd = torch.nn.BatchNorm2d(4).state_dict()
        del sd["num_batches_tracked"]
        sd._metadata = {"": {"version": version}}
        ours, theirs = batchnorm.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
        for m in (ours, theirs):
            m.num_batches_tracked.fill_(9)
        if version == 2 and strict:
            for m in (ours, theirs):
                with pytest.raises(RuntimeError, match="num_batches_tracked"):
                    m.load_state_dict(sd, strict=True)
            continue
        ours.load_state_dict(sd, strict=strict)
        theirs.load_state_dict(sd, strict=strict)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 9


def test_repr_reset_and_factory_kwargs():
    ours, theirs = batchnorm.BatchNorm2d(7, eps=1e-3, momentum=None), torch.nn.BatchNorm2d(7, eps=1e-3, momentum=None)
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs)
    ours(torch.randn(4, 7, 3, 3) + 2)
    with torch.no_grad():
        ours.weight.fill_(3)
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(7)) and torch.equal(ours.running_var, torch.ones(7))
    assert int(ours.num_batches_tracked) == 0 and float(ours.weight[0]) == 3.0
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(7)) and torch.equal(ours.bias, torch.zeros(7))
    bn = batchnorm.BatchNorm1d(3, dtype=torch.float64, device="cpu")
    assert bn.weight.dtype == bn.running_var.dtype == torch.float64 and bn.num_batches_tracked.dtype == torch.long
    assert "check_finite=True" in repr(batchnorm.BatchNorm1d(3, check_finite=True))


def test_channels_last_in_and_out():
    ours, theirs = _pair(2)
    x = torch.randn(4, 5, 6, 6).to(memory_format=torch.channels_last)
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(y, theirs(x), REL_TOL_VS_TORCH[torch.float32], "channels_last output")
    ours.eval(), theirs.eval()
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(y, theirs(x), REL_TOL_VS_TORCH[torch.float32], "channels_last eval")


# --- rejected calls change nothing, not even num_batches_tracked (torch.nn increments it) --

BAD_MODULE_INPUTS = {
    "wrong rank": (batchnorm.BatchNorm2d, lambda: torch.randn(4, 3, 5), ValueError, "expected 4D input"),
    "wrong channels": (batchnorm.BatchNorm2d, lambda: torch.randn(4, 5, 2, 2), ValueError, "expected 3"),
    "one value per channel": (batchnorm.BatchNorm1d, lambda: torch.randn(1, 3), ValueError, "GroupNorm"),
    "integer input": (batchnorm.BatchNorm1d, lambda: torch.ones(4, 3, dtype=torch.int32), TypeError, "x.float()"),
    "float64 input, float32 module": (batchnorm.BatchNorm1d, lambda: torch.randn(4, 3, dtype=torch.float64),
                                      TypeError, "dtype"),
    "not a tensor": (batchnorm.BatchNorm1d, lambda: [[1.0, 2.0, 3.0]], TypeError, "Tensor"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_MODULE_INPUTS))
def test_rejected_module_calls_change_nothing(case):
    cls, make_x, exc, match = BAD_MODULE_INPUTS[case]
    bn = cls(3, check_finite=True)
    bn(torch.randn(4, 3, 2, 2) if cls is batchnorm.BatchNorm2d else torch.randn(4, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(exc, match=match):
        bn(make_x())
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected call"


def test_nan_batch_does_not_poison_running_stats():
    bn = batchnorm.BatchNorm2d(3, check_finite=True)
    bn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = float("nan")
    with pytest.raises(FloatingPointError):
        bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_features"):
        batchnorm.BatchNorm2d(0)
    with pytest.raises(ValueError, match="momentum"):
        batchnorm.BatchNorm2d(3, momentum=-0.1)
    with pytest.raises(ValueError, match="eps"):
        batchnorm.BatchNorm2d(3, eps=-1e-5)
    assert batchnorm.BatchNorm2d(3, eps=0).eps == 0  # torch.nn accepts eps=0 (its InstanceNorm tests use it)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiles_fullgraph_with_inductor(momentum):
    """torch.nn.BatchNorm2d(momentum=None) does not compile with fullgraph=True in torch 2.13; ours does."""
    ours, theirs = batchnorm.BatchNorm2d(4, momentum=momentum), torch.nn.BatchNorm2d(4, momentum=momentum)
    compiled = torch.compile(ours, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(3, 4, 5, 5, generator=gen) + step
        assert_rel_close(compiled(x), theirs(x), REL_TOL_VS_TORCH[torch.float32] * 5, f"compiled step {step}")
    _assert_same_state(ours, theirs, REL_TOL_VS_TORCH[torch.float32] * 5)
    ours.eval(), theirs.eval()
    x = torch.randn(3, 4, 5, 5, generator=gen)
    assert_rel_close(compiled(x), theirs(x), REL_TOL_VS_TORCH[torch.float32] * 5, "compiled eval")


def test_eval_under_inference_mode():
    # buffers created under torch.inference_mode are inference tensors without a version
    # counter: the cached off-centre decision must not read it
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 0.1 + 1000
    with torch.inference_mode():
        bn = batchnorm.BatchNorm2d(3).eval()
        bn.running_mean.fill_(1000.0)
        bn.running_var.fill_(0.01)
        y = bn(x)
    expected = R.batch_norm_eval(x.double().numpy(), np.full(3, 1000.0), np.full(3, 0.01))
    assert_rel_close(y, expected, REL_TOL[torch.float32], "y")
