"""batchnorm.functional.stats: moments (the one precision rule) and merge, against the float64 reference."""

import numpy as np
import pytest
import torch

from batchnorm import reference as R
from batchnorm.functional.stats import merge, moments
from tolerances import REL_TOL, assert_rel_close

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
