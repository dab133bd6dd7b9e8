"""GroupNorm, LayerNorm, InstanceNorm1d/2d/3d against the float64 reference and torch.nn."""

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import reference as R
from batchnorm.functional.group_norm import group_norm, instance_norm, layer_norm
from batchnorm.nn.groupnorm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from tolerances import REL_TOL, REL_TOL_VS_TORCH, assert_rel_close

from ._util import assert_unchanged, data, np64, snapshot

F32 = REL_TOL[torch.float32]
VS_TORCH = REL_TOL_VS_TORCH[torch.float32]


def _ref_backward(x, dy, gamma, stat_shape, stat_axes, param_bcast):
    """Reference gradients of ``y = gamma * normalize(x) + beta``: ``x`` is reshaped to ``stat_shape``
    and normalized over ``stat_axes``; ``gamma`` broadcasts with ``param_bcast``."""
    xhat, rstd, _ = R.normalize(np64(x).reshape(stat_shape), stat_axes, 1e-5)
    xhat = xhat.reshape(np64(x).shape)
    g = np64(dy) * np64(gamma).reshape(param_bcast)
    dx = R.normalize_backward(g.reshape(stat_shape), xhat.reshape(stat_shape), rstd, stat_axes)
    keep = tuple(i for i, s in enumerate(param_bcast) if s == 1)
    dgamma = (np64(dy) * xhat).sum(axis=keep)
    dbeta = np64(dy).sum(axis=keep)
    scale = float(np.linalg.norm(g.reshape(stat_shape) * rstd))
    return dx.reshape(np64(x).shape), dgamma, dbeta, scale


def _affine(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return m


GN_CASES = [
    ((4, 6, 5, 3), 3),  # 2 channels per group, non-square spatial
    ((2, 5, 7), 5),  # G == C: instance norm, odd length
    ((3, 4, 2, 2, 3), 1),  # G == 1: layer norm over (C, D, H, W), 3d
    ((1, 8), 2),  # (N, C) input, N=1 (group norm needs no batch)
]


@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_group_norm_vs_reference_and_torch(shape, groups):
    c = shape[1]
    ours = _affine(GroupNorm(groups, c), c)
    theirs = nn.GroupNorm(groups, c)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = data(shape, seed=c, offset=2.0).requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    dy = data(shape, seed=1)
    y = ours(x)
    y.backward(dy)
    theirs(xt).backward(dy)
    n = shape[0]
    bcast = (1, -1) + (1,) * (len(shape) - 2)
    assert_rel_close(y, R.group_norm(np64(x), groups, np64(ours.weight), np64(ours.bias)), F32, "y")
    dx, dg, db, scale = _ref_backward(x, dy, ours.weight, (n, groups, -1), (2,), bcast)
    assert_rel_close(x.grad, dx, F32, "dx", scale=scale)
    assert_rel_close(ours.weight.grad, dg, F32, "dgamma")
    assert_rel_close(ours.bias.grad, db, F32, "dbeta")
    assert_rel_close(x.grad, xt.grad, VS_TORCH, "dx vs torch.nn", scale=scale)
    assert_rel_close(ours.weight.grad, theirs.weight.grad, VS_TORCH, "dgamma vs torch.nn")


@pytest.mark.parametrize("shape,normalized", [((4, 6), (6,)), ((2, 3, 5), (3, 5)), ((3, 2, 7), (7,))])
def test_layer_norm_vs_reference_and_torch(shape, normalized):  # 2D; two trailing dims; odd size
    ours = _affine(LayerNorm(normalized), 3)
    theirs = nn.LayerNorm(normalized)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = data(shape, seed=4, offset=-1.0).requires_grad_(True)
    dy = data(shape, seed=5)
    y = ours(x)
    y.backward(dy)
    k = len(normalized)
    axes = tuple(range(len(shape) - k, len(shape)))
    assert_rel_close(y, R.layer_norm(np64(x), normalized, np64(ours.weight), np64(ours.bias)), F32, "y")
    dx, dg, db, scale = _ref_backward(x, dy, ours.weight, shape, axes, (1,) * (len(shape) - k) + normalized)
    assert_rel_close(x.grad, dx, F32, "dx", scale=scale)
    assert_rel_close(ours.weight.grad, dg, F32, "dgamma")
    assert_rel_close(ours.bias.grad, db, F32, "dbeta")
    assert_rel_close(theirs(x), y, VS_TORCH, "y vs torch.nn")
    nb = LayerNorm(normalized, bias=False)
    assert list(nb.state_dict()) == list(nn.LayerNorm(normalized, bias=False).state_dict()) == ["weight"]


IN_CASES = [
    (InstanceNorm1d, (3, 4, 7)),  # odd length
    (InstanceNorm2d, (2, 3, 4, 5)),  # non-square
    (InstanceNorm3d, (2, 2, 2, 3, 2)),  # volume
]


@pytest.mark.parametrize("cls,shape", IN_CASES)
def test_instance_norm_with_running_stats_vs_reference_and_torch(cls, shape):
    c = shape[1]
    ours = _affine(cls(c, affine=True, track_running_stats=True), c)
    theirs = getattr(nn, cls.__name__)(c, affine=True, track_running_stats=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = data(shape, seed=2, offset=1.0).requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    dy = data(shape, seed=3)
    y = ours(x)
    y.backward(dy)
    theirs(xt).backward(dy)
    n = shape[0]
    bcast = (1, -1) + (1,) * (len(shape) - 2)
    assert_rel_close(y, R.instance_norm(np64(x), np64(ours.weight), np64(ours.bias)), F32, "y")
    dx, dg, db, scale = _ref_backward(x, dy, ours.weight, (n, c, -1), (2,), bcast)
    assert_rel_close(x.grad, dx, F32, "dx", scale=scale)
    assert_rel_close(ours.weight.grad, dg, F32, "dgamma")
    assert_rel_close(ours.bias.grad, db, F32, "dbeta")
    # running statistics: mean over the batch of each instance's mean and unbiased variance
    st = R.moments(np64(x), tuple(range(2, len(shape))))
    rm_ref = 0.9 * 0 + 0.1 * st.mean.reshape(n, c).mean(0)
    rv_ref = 0.9 * 1 + 0.1 * st.var_unbiased.reshape(n, c).mean(0)
    assert_rel_close(ours.running_mean, rm_ref, F32, "running_mean")
    assert_rel_close(ours.running_var, rv_ref, F32, "running_var")
    assert_rel_close(ours.running_var, theirs.running_var, VS_TORCH, "running_var vs torch.nn")
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 0  # torch.nn never counts here
    ours.eval(), theirs.eval()
    xe = data(shape, seed=9)
    ref_eval = R.batch_norm_eval(np64(xe), rm_ref, rv_ref, np64(ours.weight), np64(ours.bias))
    assert_rel_close(ours(xe), ref_eval, F32, "y (eval, running statistics)")
    assert_rel_close(ours(xe), theirs(xe), VS_TORCH, "y (eval) vs torch.nn")
    assert_rel_close(ours(xe[0]), ref_eval[0], F32, "unbatched input")


def test_instance_norm_default_is_stateless():
    m = InstanceNorm2d(3)
    assert list(m.state_dict()) == list(nn.InstanceNorm2d(3).state_dict()) == []
    x = data((2, 3, 4, 4), 0)
    m.eval()  # without running statistics eval uses instance statistics, like torch.nn
    assert_rel_close(m(x), R.instance_norm(np64(x)), F32, "y")


def test_equivalences():
    x = data((3, 4, 5, 2), seed=6, offset=0.5)
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    # GroupNorm(1, C) == LayerNorm over (C, H, W) with the per-channel affine broadcast
    ln_w, ln_b = gamma.view(4, 1, 1).expand(4, 5, 2), beta.view(4, 1, 1).expand(4, 5, 2)
    assert_rel_close(group_norm(x, 1, gamma, beta), layer_norm(x, (4, 5, 2), ln_w, ln_b), F32, "GN(1) vs LN")
    # GroupNorm(C, C) == InstanceNorm with the same affine
    assert_rel_close(group_norm(x, 4, gamma, beta), instance_norm(x, weight=gamma, bias=beta), F32, "GN(C) vs IN")


def test_bad_input_rejected():
    with pytest.raises(ValueError, match=r"num_groups=3 must divide the number of channels 8; choose one of \[1, 2, 4, 8\]"):
        GroupNorm(3, 8)
    with pytest.raises(ValueError, match="must divide"):
        group_norm(data((2, 6, 2), 0), 4)
    gn = GroupNorm(2, 4)
    with pytest.raises(ValueError, match="input has 6 channels"):
        gn(data((2, 6, 3), 0))
    with pytest.raises(ValueError, match="do not match normalized_shape"):
        LayerNorm(5)(data((2, 4), 0))
    m = InstanceNorm2d(3, track_running_stats=True)
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"match num_features \(3\), but got: 4"):
        m(data((2, 4, 3, 3), 0))
    with pytest.raises(ValueError, match="more than 1 spatial value"):
        m(data((2, 3, 1, 1), 0))
    assert_unchanged(m, snap)
