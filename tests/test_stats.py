"""batchnorm.functional.stats: moments (the one precision rule) and merge, against the float64 reference."""

import numpy as np
import pytest
import torch

from batchnorm import reference as R
from batchnorm import BatchNorm1d, BatchNorm2d
from batchnorm.functional.stats import merge, moments
from tolerances import REL_TOL, assert_rel_close, rel_err

from family._util import data, np64

F32 = REL_TOL[torch.float32]


@pytest.mark.parametrize(
    "shape,dtype,offset,tol",
    [
        ((5, 3), torch.float32, 0.0, F32),  # 2D
        ((4, 3, 5, 2), torch.float32, 1e6, F32),  # mean 1e6, std 1: the re-centred path
        ((3, 2, 4), torch.bfloat16, 2.0, F32),  # half input: float32 statistics of the rounded data
        ((2, 3, 3), torch.float64, -7.0, REL_TOL[torch.float64]),
    ],
)
def test_batch_moments_vs_reference(shape, dtype, offset, tol):
    x = data(shape, seed=1, dtype=dtype, offset=offset)
    st = moments(x)
    mean, var = st.total_mean(), st.var
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    st = R.moments(np64(x), R.batch_norm_axes(len(shape)))  # moments of the data as stored
    assert_rel_close(mean, st.mean, tol, "mean")
    assert_rel_close(var, st.var, tol if offset < 1e3 else 1e-4, "var")  # var from 1e6-sized values: float32 input ulp


def test_batch_moments_empty():
    st = moments(torch.empty(0, 4, 2))
    assert torch.equal(st.mean, torch.zeros(4)) and torch.equal(st.var, torch.zeros(4)) and st.count == 0


def test_merge_moments_vs_chan_merge():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, generator=g, dtype=torch.float64) * (1 + n) + n for n in (4, 0, 1, 7)]
    counts = torch.tensor([float(p.shape[0]) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    n, mean, var = merge(counts, means, m2s / counts.clamp_min(1).unsqueeze(1))
    m2 = var * n
    n_ref, mean_ref, m2_ref = R.chan_merge(counts.tolist(), np64(means), np64(m2s))
    assert int(n) == n_ref == 12
    assert_rel_close(mean, mean_ref, REL_TOL[torch.float64], "mean")
    assert_rel_close(m2, m2_ref, REL_TOL[torch.float64], "M2")
    whole = torch.cat(parts)
    assert_rel_close(m2, ((whole - whole.mean(0)) ** 2).sum(0), REL_TOL[torch.float64], "M2 vs whole")
    n0, mean0, m20 = merge(torch.zeros(2, dtype=torch.float64), torch.ones(2, 3), torch.ones(2, 3))
    assert int(n0) == 0 and np.all(np64(mean0) == 0) and np.all(np64(m20) == 0)  # empty parts contribute nothing


# --- rule 2: blocks for large reductions --------------------------------------------------------


def _exact(x):
    xd = x.double()
    axes = [0] + list(range(2, x.dim()))
    return xd.mean(axes), xd.var(axes, unbiased=False)


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((2**18, 8), None),  # (N, C): the native CPU kernel accumulates in float32 vectors here
        ((2**14, 8, 4, 4), torch.channels_last),  # channels_last, 2^18 values per channel
        ((2**17, 3, 2), "strided"),  # a permuted view: neither contiguous nor channels_last
    ],
)
def test_large_reductions_are_exact(shape, fmt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * 2 + 3
    if fmt is torch.channels_last:
        x = x.to(memory_format=fmt)
    elif fmt == "strided":
        x = torch.randn((shape[0], shape[2], shape[1]), generator=g).permute(0, 2, 1) * 2 + 3
    mean, var = _exact(x)
    st = moments(x)
    assert_rel_close(st.total_mean(), mean, 1e-6, "mean")
    assert_rel_close(st.var, var, 1e-6, "var")
    # the module's training output is normalized with these statistics
    bn = BatchNorm1d(x.shape[1]) if x.dim() < 4 else BatchNorm2d(x.shape[1])
    y = bn(x)
    view = (1, -1) + (1,) * (x.dim() - 2)
    y_ref = (x.double() - mean.view(view)) / (var.view(view) + bn.eps).sqrt()
    assert_rel_close(y, y_ref, F32, "y")
    assert_rel_close(bn.running_var, 0.9 + 0.1 * var * st.count / (st.count - 1), F32, "running_var")
    if fmt is None:  # the witness: PyTorch's own kernel is off by more than float32 accuracy here
        y_torch = torch.nn.functional.batch_norm(x, None, None, training=True)
        assert rel_err(y_torch, y_ref) > F32


def test_more_than_2_to_the_31_values_per_channel():
    """2^31 + 2^12 values per channel (a stride-0 view, so no memory is needed): counts, blocks and the
    merge stay exact where a float32 running sum stops moving (it saturates at 2^24 * mean)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 1, 4096, generator=g, dtype=torch.float64) + 3
    x = base.float().expand(2**19 + 1, 1, 4096)
    assert x.numel() == 2**31 + 2**12
    st = moments(x)
    assert st.count == x.numel()
    b = base.float().double()  # the data as stored
    assert_rel_close(st.total_mean(), b.mean().view(1), 1e-6, "mean")
    assert_rel_close(st.var, b.var(unbiased=False).view(1), 1e-6, "var")


def test_virtual_batches_each_exact_and_pooled():
    x = data((10, 3, 4), seed=4, offset=1e6)  # off-centre: every part is re-centred on its own mean
    st = moments(x, chunk=4)
    assert st.mean.shape == (3, 3) and st.parts == (16, 16, 8) and st.shift is not None
    for k, part in enumerate(x.split(4)):
        mean, var = _exact(part)
        assert_rel_close(st.total_mean(torch.float64)[k], mean, 1e-12, f"part {k} mean")
        assert_rel_close(st.var[k], var, F32, f"part {k} var")
    pooled = st.pooled()
    mean, var = _exact(x)
    assert_rel_close(pooled.var, var, F32, "pooled var")
    assert pooled.count == 40
