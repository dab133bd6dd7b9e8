"""BatchRenorm1d/2d/3d and functional batch_renorm against the float64 reference and batch norm."""

import numpy as np
import pytest
import torch

from batchnorm import reference as R
from batchnorm.functional.renorm import RenormSchedule, batch_renorm
from batchnorm.nn.batchnorm import BatchNorm2d
from batchnorm.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from tolerances import REL_TOL, REL_TOL_VS_TORCH, assert_rel_close

from ._util import assert_unchanged, data, dx_scale, np64, snapshot

F32 = REL_TOL[torch.float32]

SHAPES = [
    (BatchRenorm1d, (16, 5)),  # 2D input: reduction over N only
    (BatchRenorm1d, (4, 3, 7)),  # odd/prime sizes, 1d spatial
    (BatchRenorm2d, (6, 4, 5, 3)),  # typical conv activation, non-square
    (BatchRenorm2d, (2, 3, 1, 1)),  # N=2, 1x1 spatial: 2 values per channel, the minimum
    (BatchRenorm3d, (2, 3, 2, 3, 4)),  # 3d volume
]


def _module(cls, c, r_max, d_max, momentum=0.1):
    m = cls(c, momentum=momentum, r_max=r_max, d_max=d_max)
    g = torch.Generator().manual_seed(c)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g))
        # running statistics away from the batch's, so r and d are far from (1, 0) and get clipped
        m.running_mean.copy_(torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.05)
        m.num_batches_tracked.fill_(7)
    return m


@pytest.mark.parametrize("cls,shape", SHAPES)
@pytest.mark.parametrize("r_max,d_max", [(3.0, 5.0), (1.5, 0.5)])  # wide limits; tight limits that clip
def test_train_step_matches_reference(cls, shape, r_max, d_max):
    c = shape[1]
    m = _module(cls, c, r_max, d_max)
    rm0, rv0, w0, b0 = (np64(t) for t in (m.running_mean, m.running_var, m.weight, m.bias))
    x = data(shape, seed=sum(shape)).requires_grad_(True)
    y = m(x)
    dy = data(shape, seed=99)
    y.backward(dy)

    y_ref, cache, r, d = R.batch_renorm_train(np64(x), rm0, rv0, w0, b0, 1e-5, r_max, d_max)
    dx_ref, dg_ref, db_ref = R.batch_renorm_backward(np64(dy), cache, r, d)
    assert_rel_close(y, y_ref, F32, "y")
    assert_rel_close(x.grad, dx_ref, F32, "dx", scale=dx_scale(dy, w0 * r.ravel(), cache.rstd))
    assert_rel_close(m.weight.grad, dg_ref, F32, "dgamma")
    assert_rel_close(m.bias.grad, db_ref, F32, "dbeta")
    rm_ref, rv_ref = R.running_update(rm0, rv0, cache.moments, 0.1, 8)
    assert_rel_close(m.running_mean, rm_ref, F32, "running_mean")
    assert_rel_close(m.running_var, rv_ref, F32, "running_var")
    assert int(m.num_batches_tracked) == 8
    # the limits really bit in this set-up (otherwise the test would not test clipping)
    if r_max == 1.5:
        assert np.any(np.isclose(r, 1.5) | np.isclose(r, 1 / 1.5)) and np.any(np.abs(d) == 0.5)

    m.eval()
    xe = data(shape, seed=5)
    ye = m(xe)
    assert_rel_close(ye, R.batch_norm_eval(np64(xe), rm_ref, rv_ref, w0, b0), F32, "y (eval)")
    assert int(m.num_batches_tracked) == 8


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (3, 5, 2, 7)])  # even; odd N and prime C
def test_r_max_1_d_max_0_is_batch_norm_exactly(shape):
    ren = _module(BatchRenorm2d, shape[1], 1.0, 0.0)
    bn = BatchNorm2d(shape[1])
    bn.load_state_dict(ren.state_dict())
    tn = torch.nn.BatchNorm2d(shape[1])
    tn.load_state_dict(ren.state_dict())
    outs = []
    for mod in (ren, bn, tn):
        x = data(shape, seed=3).requires_grad_(True)
        for step in range(3):  # a few steps: running statistics evolve identically
            y = mod(x * (step + 1))
        y.backward(data(shape, seed=4))
        outs.append((y, x.grad, mod.weight.grad, mod.bias.grad, mod.running_mean, mod.running_var,
                     mod.num_batches_tracked))  # fmt: skip
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b), "BatchRenorm(r_max=1, d_max=0) must be bit-identical to BatchNorm"
    for a, b in zip(outs[0], outs[2]):
        assert_rel_close(a, b, REL_TOL_VS_TORCH[torch.float32], "vs torch.nn.BatchNorm2d")


def test_schedule_values_and_module_follows_step():
    s = RenormSchedule()
    assert s(0) == (1.0, 0.0) and s(5_000) == (1.0, 0.0)
    assert s(40_000) == (3.0, 5.0) and s(10**6) == (3.0, 5.0)
    assert s.d_max(25_000) == 5.0 and s.r_max(25_000) == pytest.approx(1 + 2 * 20_000 / 35_000)
    assert s.d_max(15_000) == pytest.approx(2.5)  # halfway from 5k to 25k
    with pytest.raises(ValueError, match="warmup"):
        RenormSchedule(warmup=50_000)

    m = _module(BatchRenorm2d, 3, s.r_max, s.d_max)
    m.num_batches_tracked.fill_(0)
    bn = BatchNorm2d(3)
    bn.load_state_dict(m.state_dict())
    x = data((4, 3, 2, 2), seed=1)
    assert torch.equal(m(x), bn(x)), "during warm-up the schedule gives plain batch norm"

    m.num_batches_tracked.fill_(40_000)
    rm0, rv0 = np64(m.running_mean), np64(m.running_var)
    y = m(x)
    y_ref, *_ = R.batch_renorm_train(np64(x), rm0, rv0, np64(m.weight), np64(m.bias), 1e-5, 3.0, 5.0)
    assert_rel_close(y, y_ref, F32, "y at step 40k (r_max=3, d_max=5)")
    assert m.limits() == (3.0, 5.0)


def test_momentum_none_cumulative_average():
    m = BatchRenorm1d(3, momentum=None, r_max=2.0, d_max=1.0)
    xs = [data((6, 3), seed=i, offset=i) for i in range(3)]
    for x in xs:
        m(x)
    rm_ref, rv_ref = R.running_stats_after([np64(x) for x in xs], None)
    assert_rel_close(m.running_mean, rm_ref, F32, "running_mean")
    assert_rel_close(m.running_var, rv_ref, F32, "running_var")


def test_state_dict_both_ways_with_torch_nn():
    ren = _module(BatchRenorm2d, 4, 3.0, 5.0)
    tn = torch.nn.BatchNorm2d(4)
    tn.load_state_dict(ren.state_dict(), strict=True)
    back = BatchRenorm2d(4)
    back.load_state_dict(tn.state_dict(), strict=True)
    for k, v in ren.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert list(ren.state_dict()) == list(tn.state_dict())


@pytest.mark.parametrize("r_max,d_max,match", [(0.5, 1.0, "r_max must be >= 1"), (2.0, -0.1, "d_max must be >= 0"),
                                               (float("inf"), 0.0, "finite")])  # fmt: skip
def test_bad_limits_rejected(r_max, d_max, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm2d(3, r_max=r_max, d_max=d_max)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=match):
        batch_renorm(data((4, 3, 2, 2), 0), rm, rv, training=True, r_max=r_max, d_max=d_max)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_rejected_calls_change_nothing():
    m = _module(BatchRenorm2d, 3, lambda step: 0.5, 1.0)  # a schedule that returns a bad r_max
    snap = snapshot(m)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        m(data((4, 3, 2, 2), 0))
    assert_unchanged(m, snap)
    m.r_max = 2.0
    with pytest.raises(ValueError, match="expected 3"):
        m(data((4, 5, 2, 2), 0))  # wrong channels
    with pytest.raises(ValueError, match="4D input"):
        m(data((4, 3, 2), 0))  # wrong rank
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(data((1, 3, 1, 1), 0))
    assert_unchanged(m, snap)
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        BatchRenorm2d(3, track_running_stats=False)


def test_off_centre_batch_takes_the_general_path_and_stays_exact():
    """|mean| >> std: the statistics are re-centred (the inference kernel's folded form would cancel
    otherwise), and the output and gradients must agree with the reference. d_max=0: d = (mu_B - mu)/sigma
    itself is a float32 cancellation near 1e4 (error ~ ulp(mu)/sigma, see docs/family.md)."""
    from batchnorm.functional.stats import moments

    m = _module(BatchRenorm2d, 3, 3.0, 0.0)
    with torch.no_grad():
        m.running_mean.fill_(1e4)
    x = (data((4, 3, 3, 3), seed=11).double() + 1e4).float().requires_grad_(True)
    assert moments(x).shift is not None  # the re-centred path is the one under test
    rm0, rv0, w0, b0 = (np64(t) for t in (m.running_mean, m.running_var, m.weight, m.bias))
    y = m(x)
    dy = data((4, 3, 3, 3), seed=12)
    y.backward(dy)
    y_ref, cache, r, d = R.batch_renorm_train(np64(x), rm0, rv0, w0, b0, 1e-5, 3.0, 0.0)
    dx_ref, dg_ref, _ = R.batch_renorm_backward(np64(dy), cache, r, d)
    assert_rel_close(y, y_ref, F32, "y")
    assert_rel_close(x.grad, dx_ref, F32, "dx", scale=dx_scale(dy, w0 * r.ravel(), cache.rstd))
    assert_rel_close(m.weight.grad, dg_ref, F32, "dgamma", scale=float(np.linalg.norm(np64(dy))))
