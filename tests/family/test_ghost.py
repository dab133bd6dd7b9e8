"""GhostBatchNorm1d/2d/3d and functional ghost_batch_norm against the float64 reference."""

import numpy as np
import pytest
import torch

from batchnorm import reference as R
from batchnorm.functional.ghost import ghost_batch_norm
from batchnorm.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from tolerances import REL_TOL, REL_TOL_VS_TORCH, assert_rel_close

from ._util import assert_unchanged, data, np64, snapshot

F32 = REL_TOL[torch.float32]

CASES = [
    (GhostBatchNorm1d, (12, 5), 4),  # 2D input, N a multiple: 3 chunks of 4
    (GhostBatchNorm1d, (10, 3, 7), 4),  # N not a multiple: chunks 4, 4, 2 (last smaller)
    (GhostBatchNorm2d, (9, 4, 3, 5), 2),  # odd N: chunks 2,2,2,2,1 - last chunk has 1 sample, 15 values
    (GhostBatchNorm2d, (6, 3, 2, 2), 6),  # virtual batch == N: plain batch norm
    (GhostBatchNorm3d, (4, 2, 2, 3, 2), 3),  # 3d, chunks 3, 1
]


def _module(cls, c, vb, momentum=0.1):
    m = cls(c, momentum=momentum, virtual_batch_size=vb)
    g = torch.Generator().manual_seed(c)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g))
        m.running_mean.copy_(torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return m


@pytest.mark.parametrize("cls,shape,vb", CASES)
def test_train_step_matches_reference(cls, shape, vb):
    c = shape[1]
    m = _module(cls, c, vb)
    rm0, rv0, w0, b0 = (np64(t) for t in (m.running_mean, m.running_var, m.weight, m.bias))
    x = data(shape, seed=sum(shape), offset=3.0).requires_grad_(True)
    y = m(x)
    dy = data(shape, seed=7)
    y.backward(dy)

    ys, dxs, dg, db = [], [], 0.0, 0.0
    scale2 = 0.0
    for start in range(0, shape[0], vb):  # the reference: plain batch norm per chunk
        xc, dyc = np64(x)[start : start + vb], np64(dy)[start : start + vb]
        yc, cache = R.batch_norm_train(xc, w0, b0)
        dxc, dgc, dbc = R.batch_norm_backward(dyc, cache)
        ys.append(yc), dxs.append(dxc)
        dg, db = dg + dgc, db + dbc
        scale2 += float(np.sum((dyc * w0.reshape(R.param_shape(len(shape))) * cache.rstd) ** 2))
    assert_rel_close(y, np.concatenate(ys), F32, "y")
    assert_rel_close(x.grad, np.concatenate(dxs), F32, "dx", scale=scale2**0.5)
    assert_rel_close(m.weight.grad, dg, F32, "dgamma")
    assert_rel_close(m.bias.grad, db, F32, "dbeta")
    # one update per forward with the statistics of the whole batch
    rm_ref, rv_ref = R.running_update(rm0, rv0, R.moments(np64(x), R.batch_norm_axes(len(shape))), 0.1, 1)
    assert_rel_close(m.running_mean, rm_ref, F32, "running_mean")
    assert_rel_close(m.running_var, rv_ref, F32, "running_var")
    assert int(m.num_batches_tracked) == 1

    m.eval()  # inference: plain batch norm with the running statistics, no chunking
    xe = data((3,) + shape[1:], seed=1)
    assert_rel_close(m(xe), R.batch_norm_eval(np64(xe), rm_ref, rv_ref, w0, b0), F32, "y (eval)")
    assert int(m.num_batches_tracked) == 1


def test_chunks_differ_from_plain_batch_norm():
    # chunks with different distributions: ghost normalizes each to mean 0 (plain BN would not)
    x = torch.cat([data((4, 2, 3, 3), 0, offset=0.0), data((4, 2, 3, 3), 1, offset=10.0)])
    y = GhostBatchNorm2d(2, virtual_batch_size=4)(x).detach()
    assert float(y[:4].mean((0, 2, 3)).abs().max()) < 1e-5 and float(y[4:].mean((0, 2, 3)).abs().max()) < 1e-5


def test_whole_batch_equals_torch_batch_norm():
    g = _module(GhostBatchNorm2d, 3, 8)
    t = torch.nn.BatchNorm2d(3)
    t.load_state_dict(g.state_dict())
    x = data((8, 3, 4, 4), 2)
    for mod in (g, t):
        mod(x)
    assert_rel_close(g(x), t(x), REL_TOL_VS_TORCH[torch.float32], "y")
    for k in ("running_mean", "running_var"):
        assert_rel_close(getattr(g, k), getattr(t, k), REL_TOL_VS_TORCH[torch.float32], k)
    assert int(g.num_batches_tracked) == int(t.num_batches_tracked) == 2


def test_channels_last_kept_and_momentum_none():
    m = _module(GhostBatchNorm2d, 4, 3, momentum=None)
    xs = [data((6, 4, 3, 3), i, offset=i).contiguous(memory_format=torch.channels_last) for i in range(2)]
    for x in xs:
        y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    rm_ref, rv_ref = R.running_stats_after([np64(x) for x in xs], None)
    assert_rel_close(m.running_mean, rm_ref, F32, "running_mean")
    assert_rel_close(m.running_var, rv_ref, F32, "running_var")


def test_state_dict_both_ways_with_torch_nn():
    g = _module(GhostBatchNorm2d, 4, 2)
    t = torch.nn.BatchNorm2d(4)
    t.load_state_dict(g.state_dict(), strict=True)
    back = GhostBatchNorm2d(4, virtual_batch_size=2)
    back.load_state_dict(t.state_dict(), strict=True)
    for k, v in g.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_bad_input_rejected_and_nothing_changes():
    m = _module(GhostBatchNorm1d, 3, 8)
    snap = snapshot(m)
    with pytest.raises(ValueError, match="virtual_batch_size=8 is larger than the batch"):
        m(data((4, 3), 0))
    m.virtual_batch_size = 2
    with pytest.raises(ValueError, match="last virtual batch of 1 sample"):
        m(data((5, 3), 0))  # (N, C) input: a last chunk of 1 sample has 1 value per channel
    with pytest.raises(ValueError, match="expected 3"):
        m(data((4, 6), 0))
    assert_unchanged(m, snap)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        GhostBatchNorm2d(3, virtual_batch_size=0)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="larger than the batch"):
        ghost_batch_norm(data((2, 3, 2, 2), 0), rm, rv, training=True, virtual_batch_size=3)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    m.eval()  # eval does not chunk: a batch smaller than the virtual batch is fine
    assert m(data((1, 3), 0)).shape == (1, 3)


@pytest.mark.parametrize("offset", [0.0, 1e4])  # 1e4: an off-centre chunk falls back to the re-centring core
@pytest.mark.parametrize("channels_last", [False, True])
def test_functional_without_affine_against_reference(offset, channels_last):
    """weight=bias=None through the in-place virtual-batch path (and its fallback): y, dx, running stats."""
    shape, vb = (7, 3, 2, 3), 3  # chunks 3, 3, 1
    x = (data(shape, seed=21).double() * 2 + offset).float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    rm, rv, nbt = torch.full((3,), offset), torch.ones(3), torch.tensor(0)
    rm0, rv0 = np64(rm), np64(rv)
    y = ghost_batch_norm(x, rm, rv, training=True, momentum=0.5, virtual_batch_size=vb, num_batches_tracked=nbt)
    dy = data(shape, seed=22)
    y.backward(dy)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    xs, dys = np64(x).copy(), np64(dy)
    for lo in range(0, shape[0], vb):
        y_ref, cache = R.batch_norm_train(xs[lo:lo + vb])
        dx_ref, _, _ = R.batch_norm_backward(dys[lo:lo + vb], cache)
        assert_rel_close(y[lo:lo + vb], y_ref, F32, f"y chunk at {lo}")
        assert_rel_close(x.grad[lo:lo + vb], dx_ref, F32, f"dx chunk at {lo}",
                         scale=float(np.linalg.norm(dys[lo:lo + vb] * cache.rstd)))  # fmt: skip
    rm_ref, rv_ref = R.running_update(rm0, rv0, R.moments(xs, (0, 2, 3)), 0.5, 1)
    assert_rel_close(rm, rm_ref, F32, "running_mean")
    assert_rel_close(rv, rv_ref, F32, "running_var")
    assert int(nbt) == 1


def test_permuted_input_with_batch_dim_inner():
    # a dense view whose N stride is not the largest: empty_like keeps the layout, so the
    # N-slices of the output are strided and the out= fast path must not be used
    base = torch.randn(4, 10, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = base.permute(1, 2, 0, 3).requires_grad_(True)  # (10, 3, 4, 5)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    dy = torch.randn(10, 3, 4, 5, dtype=torch.float64)
    y = ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=4)
    (dx,) = torch.autograd.grad(y, x, dy)
    for lo in range(0, 10, 4):
        yc, cache = R.batch_norm_train(np64(x[lo : lo + 4]), np64(w), np64(b))
        assert_rel_close(y[lo : lo + 4], yc, REL_TOL[torch.float64], "y")
        dxc, _, _ = R.batch_norm_backward(np64(dy[lo : lo + 4]), cache)
        assert_rel_close(dx[lo : lo + 4], dxc, REL_TOL[torch.float64], "dx")
