"""The oracle itself: batchnorm.reference against finite differences and closed forms."""

import numpy as np
import pytest

from batchnorm import reference as R
from tolerances import FD_TOL, REL_TOL, assert_rel_close

import torch

F64 = REL_TOL[torch.float64]


def _central_diff(f, x, h=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


# shapes: (N, C) plain; (N, C, L) with odd sizes; (N, C, H, W) with N=2 (smallest batch) and C=1
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 7), (2, 1, 3, 3)])
def test_batch_norm_backward_matches_finite_differences(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * 2 + 0.5
    gamma = rng.normal(size=shape[1])
    beta = rng.normal(size=shape[1])
    dy = rng.normal(size=shape)

    def loss_x(xv):
        return float((R.batch_norm_train(xv, gamma, beta)[0] * dy).sum())

    y, cache = R.batch_norm_train(x, gamma, beta)
    dx, dgamma, dbeta = R.batch_norm_backward(dy, cache)
    assert_rel_close(dx, _central_diff(loss_x, x), FD_TOL, "dx")
    dg = _central_diff(lambda g: float((R.batch_norm_train(x, g, beta)[0] * dy).sum()), gamma)
    db = _central_diff(lambda b: float((R.batch_norm_train(x, gamma, b)[0] * dy).sum()), beta)
    assert_rel_close(dgamma, dg, FD_TOL, "dgamma")
    assert_rel_close(dbeta, db, FD_TOL, "dbeta")


def test_normalized_output_has_zero_mean_unit_variance():
    x = np.random.default_rng(1).normal(3.0, 5.0, size=(16, 4, 3, 3))
    y, _ = R.batch_norm_train(x, eps=0.0)
    axes = R.batch_norm_axes(x.ndim)
    assert np.abs(y.mean(axis=axes)).max() < 1e-12
    assert np.abs(y.var(axis=axes) - 1).max() < 1e-12


def test_two_pass_moments_survive_a_huge_offset():
    # E[x^2]-E[x]^2 in float64 loses everything at offset 1e9 with std 1; two-pass does not
    rng = np.random.default_rng(2)
    z = rng.normal(size=(1000, 1))
    st = R.moments(z + 1e9, (0,))
    exact = R.moments(z, (0,))
    assert abs(st.var.item() / exact.var.item() - 1) < 1e-6
    naive = ((z + 1e9) ** 2).mean() - (z + 1e9).mean() ** 2
    assert abs(naive / exact.var.item() - 1) > 1e-2  # the formula we avoid really is bad here


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
def test_running_mean_closed_form_for_constant_batches(momentum):
    # the same batch k times: running_mean = (1 - (1-m)^k) * mu, running_var = 1 + (1 - (1-m)^k) * (s2u - 1)
    rng = np.random.default_rng(3)
    xb = rng.normal(2.0, 3.0, size=(6, 3, 4))
    st = R.moments(xb, R.batch_norm_axes(3))
    k = 7
    rm, rv = R.running_stats_after([xb] * k, momentum)
    a = 1 - (1 - momentum) ** k
    assert_rel_close(rm, a * st.mean.ravel(), F64, "running_mean")
    assert_rel_close(rv, 1 + a * (st.var_unbiased.ravel() - 1), F64, "running_var")


def test_cumulative_average_when_momentum_is_none():
    rng = np.random.default_rng(4)
    batches = [rng.normal(i, 1 + i, size=(5, 2, 3)) for i in range(4)]
    rm, rv = R.running_stats_after(batches, None)
    means = [R.moments(b, (0, 2)).mean.ravel() for b in batches]
    vars_u = [R.moments(b, (0, 2)).var_unbiased.ravel() for b in batches]
    assert_rel_close(rm, np.mean(means, axis=0), F64, "running_mean")
    assert_rel_close(rv, np.mean(vars_u, axis=0), F64, "running_var")


def test_eval_with_batch_statistics_equals_train():
    x = np.random.default_rng(5).normal(size=(8, 3, 5))
    g, b = np.array([1.0, 2.0, -1.0]), np.array([0.0, 1.0, 3.0])
    y, cache = R.batch_norm_train(x, g, b)
    y_eval = R.batch_norm_eval(x, cache.moments.mean.ravel(), cache.moments.var.ravel(), g, b)
    assert_rel_close(y_eval, y, F64, "eval with batch statistics")


def test_chan_merge_equals_moments_of_the_union():
    rng = np.random.default_rng(6)
    parts = [rng.normal(7, 2, size=(n, 3)) for n in (5, 0, 1, 12)]  # includes an empty and a single-row part
    counts = [p.shape[0] for p in parts]
    means = [p.mean(0) if len(p) else np.zeros(3) for p in parts]
    m2s = [((p - p.mean(0)) ** 2).sum(0) if len(p) else np.zeros(3) for p in parts]
    n, mean, m2 = R.chan_merge(counts, means, m2s)
    whole = np.concatenate(parts)
    assert n == whole.shape[0]
    assert_rel_close(mean, whole.mean(0), F64, "mean")
    assert_rel_close(m2 / n, whole.var(0), F64, "variance")


def test_batch_renorm_is_batch_norm_with_unit_corrections_and_its_gradient():
    rng = np.random.default_rng(7)
    x = rng.normal(1, 2, size=(6, 3, 2))
    g, b = rng.normal(size=3), rng.normal(size=3)
    y_bn, _ = R.batch_norm_train(x, g, b)
    y_rn, *_ = R.batch_renorm_train(x, np.full(3, 5.0), np.full(3, 9.0), g, b, r_max=1.0, d_max=0.0)
    assert_rel_close(y_rn, y_bn, F64, "renorm(r_max=1, d_max=0)")
    # with r, d active, the closed-form backward (r, d constant) matches finite differences
    rm, rv = np.full(3, 0.5), np.full(3, 3.0)
    dy = rng.normal(size=x.shape)
    y, cache, r, d = R.batch_renorm_train(x, rm, rv, g, b)
    dx, dgamma, _ = R.batch_renorm_backward(dy, cache, r, d)

    def loss(xv):  # hold r, d fixed at their values for x
        yv, c, _, _ = R.batch_renorm_train(xv, rm, rv, g, b)
        return float(((g.reshape(1, -1, 1) * (r * c.xhat + d) + b.reshape(1, -1, 1)) * dy).sum())

    assert_rel_close(dx, _central_diff(loss, x), FD_TOL, "renorm dx")
    assert_rel_close(dgamma, (dy * (r * cache.xhat + d)).sum(axis=(0, 2)), F64, "renorm dgamma")


def test_group_norm_equivalences():
    x = np.random.default_rng(8).normal(2, 3, size=(3, 6, 4, 5))
    assert_rel_close(R.group_norm(x, 1), R.layer_norm(x, x.shape[1:]), F64, "GroupNorm(1) == LayerNorm(C,H,W)")
    assert_rel_close(R.group_norm(x, 6), R.instance_norm(x), F64, "GroupNorm(C) == InstanceNorm")
    with pytest.raises(ValueError, match="must divide"):
        R.group_norm(x, 4)


def test_running_update_rejects_a_single_value():
    st = R.moments(np.ones((1, 3)), (0,))
    with pytest.raises(ValueError, match="at least 2"):
        R.running_update(np.zeros(3), np.ones(3), st, 0.1, 1)
