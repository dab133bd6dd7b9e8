"""recalibrate: exact pooled statistics (vs moments of the concatenation), nothing else touched."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
from torch import nn
from tolerances import REL_TOL, assert_rel_close

from batchnorm import reference as R
from batchnorm.nn.batchnorm import BatchNorm2d
from batchnorm.nn.frozen import FrozenBatchNorm2d
from batchnorm.nn.kinds import batchnorm_modules as bn_modules
from batchnorm.tools.recalibrate import recalibrate

from .models import randomize_bn

F32 = REL_TOL[torch.float32]
recal_mod = importlib.import_module("batchnorm.tools.recalibrate")  # the module, not the function


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(5, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.bn2 = BatchNorm2d(4)  # this library's BN
        self.fc = nn.Linear(4, 6)
        self.bn3 = nn.BatchNorm1d(6, momentum=None)
        self.register_buffer("step", torch.tensor(3))  # a non-BN buffer

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(x)).mean((2, 3))
        return self.bn3(self.fc(x))


def _expected(model, batches):
    """Per BN: mean and unbiased variance (float64) of the concatenation of its inputs in a
    float64 copy in which BNs normalize with batch statistics and everything else is in eval mode."""
    ref = copy.deepcopy(model).double().eval()
    seen = {}
    bns = bn_modules(ref)
    for name, m in bns:
        # the last BN is the model's output layer in these tests: its output feeds nothing, so it can
        # stay in eval mode (torch's training mode would refuse a batch with 1 value per channel)
        m.train(m is not bns[-1][1])
        m.register_forward_pre_hook(lambda mod, a, name=name: seen.setdefault(name, []).append(a[0].detach().numpy()))
    with torch.no_grad():
        for b in batches:
            ref(b.double())
    out = {}
    for name, parts in seen.items():
        z = np.concatenate(parts)
        st = R.moments(z, R.batch_norm_axes(z.ndim))
        # cross-check the oracle against Chan's merge of the per-batch moments
        per = [R.moments(p, R.batch_norm_axes(p.ndim)) for p in parts]
        n, mean, m2 = R.chan_merge([p.count for p in per], [p.mean for p in per], [p.var * p.count for p in per])
        assert n == st.count and np.allclose(mean, st.mean, rtol=1e-12, atol=1e-12)
        assert np.allclose(m2 / (n - 1), st.var_unbiased, rtol=1e-10)
        out[name] = (st.mean.ravel(), st.var_unbiased.ravel(), st.count)
    return out


def _offset_net():
    # the first BN sees the raw input (exact in float64 too); this library's BN re-centres
    return nn.Sequential(BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))


# (model, batch sizes, input offset, why)
CASES = [
    (Net, (2, 7, 3, 5), 0.0, "unequal batch sizes: averaging per-batch variances would be wrong"),
    (_offset_net, (4, 4), 1e4, "input mean 1e4, std 2: float32 statistics must be re-centred"),
    (Net, (1, 3, 1), 2.0, "batches of one sample: 1 value per channel at the Linear-BN, pooled count 5"),
]


@pytest.mark.parametrize("make,sizes,offset,why", CASES, ids=[c[3] for c in CASES])
def test_recalibrate_equals_moments_of_concatenation(make, sizes, offset, why):
    torch.manual_seed(0)
    model = randomize_bn(make(), 4)
    batches = [torch.randn(n, 3, 6, 6) * 2 + offset + 0.3 * i for i, n in enumerate(sizes)]
    expected = _expected(model, batches)
    nbt = {n: int(m.num_batches_tracked) for n, m in bn_modules(model)}
    counts = recalibrate(model, batches, quiet=True)
    for name, (mean, var, count) in expected.items():
        bn = model.get_submodule(name)
        assert counts[name] == count
        assert_rel_close(bn.running_mean, mean, F32, f"{name} running_mean")
        assert_rel_close(bn.running_var, var, F32, f"{name} running_var")
        assert int(bn.num_batches_tracked) == nbt[name] + len(sizes)


def test_exact_pooling_differs_from_cumulative_momentum_none():
    """The mistake recalibrate avoids: momentum=None averages per-batch variances."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))
    batches = [torch.randn(n, 3, 5, 5) + 3 * i for i, n in enumerate((2, 9, 4))]
    naive = copy.deepcopy(model).train()
    with torch.no_grad():
        for b in batches:
            naive(b)
    recalibrate(model, batches, quiet=True)
    with torch.no_grad():
        z = torch.cat([model[0](b) for b in batches]).double().numpy()
    var = R.moments(z, (0, 2, 3)).var_unbiased.ravel()
    assert_rel_close(model[1].running_var, var, F32, "recalibrated")
    with pytest.raises(AssertionError):
        assert_rel_close(naive[1].running_var, var, 100 * F32, "momentum=None")


def _snapshot(model):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    modes = {k: m.training for k, m in model.named_modules()}
    moms = {k: getattr(m, "momentum", None) for k, m in model.named_modules()}
    return params, bufs, modes, moms


def _bn_key(k):
    return k.startswith("bn") and k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("train_mode", [True, False])
def test_only_bn_buffers_change_and_modes_are_restored(train_mode):
    torch.manual_seed(0)
    model = randomize_bn(Net(), 1).train(train_mode)
    model.drop.train(not train_mode)  # a mixed mode must come back exactly
    p0, b0, modes0, mom0 = _snapshot(model)
    recalibrate(model, [torch.randn(4, 3, 6, 6) for _ in range(3)], quiet=True)
    p1, b1, modes1, mom1 = _snapshot(model)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert all(torch.equal(b0[k], b1[k]) for k in b0 if not _bn_key(k))
    assert not torch.equal(b0["bn1.running_var"], b1["bn1.running_var"])
    assert modes0 == modes1 and mom0 == mom1
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_failure_midway_restores_everything():
    torch.manual_seed(0)
    model = randomize_bn(Net(), 2).train()
    p0, b0, modes0, mom0 = _snapshot(model)
    batches = [torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6), torch.randn(4, 2, 6, 6)]  # 3rd: wrong channels
    with pytest.raises(RuntimeError):
        recalibrate(model, batches, quiet=True)
    p1, b1, modes1, mom1 = _snapshot(model)
    assert all(torch.equal(b0[k], b1[k]) for k in b0) and all(torch.equal(p0[k], p1[k]) for k in p0)
    assert modes0 == modes1 and mom0 == mom1
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_num_batches_limit_tuple_batches_and_frozen_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), randomize_bn(FrozenBatchNorm2d(4)))
    frozen0 = model[3].running_var.clone()
    data = [(torch.randn(3, 3, 5, 5), torch.zeros(3)) for _ in range(5)]  # (input, target) as from a DataLoader
    counts = recalibrate(model, iter(data), num_batches=2, quiet=True)
    assert counts == {"1": 2 * 3 * 3 * 3}
    with torch.no_grad():
        z = torch.cat([model[0](x) for x, _ in data[:2]]).double().numpy()
    assert_rel_close(model[1].running_var, R.moments(z, (0, 2, 3)).var_unbiased, F32, "first two batches only")
    assert torch.equal(model[3].running_var, frozen0)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (dict(batches=[], num_batches=5), ValueError, "no batch"),
        (dict(batches=[torch.randn(2, 3, 5, 5)], num_batches=0), ValueError, "positive int"),
        (dict(batches=5), TypeError, "iterable"),
        (dict(batches=["text"]), TypeError, "cannot feed"),
    ],
    ids=["empty", "num_batches=0", "not iterable", "bad batch type"],
)
def test_rejected_calls_change_nothing(args, exc, match):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    b0 = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        recalibrate(model, quiet=True, **args)
    assert all(torch.equal(b0[k], v) for k, v in model.state_dict().items())


def test_model_without_bn_is_refused():
    with pytest.raises(ValueError, match="no batch norm"):
        recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)])


def test_progress_bar_only_on_a_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, s):
            pass

        def flush(self):
            pass

    monkeypatch.setattr(recal_mod.sys, "stderr", Stream(False))
    assert recal_mod._progress(10, quiet=False) is None
    monkeypatch.setattr(recal_mod.sys, "stderr", Stream(True))
    assert recal_mod._progress(10, quiet=True) is None
    bar = recal_mod._progress(10, quiet=False)
    assert bar is not None and bar.total == 10
    bar.close()


@pytest.mark.parametrize(
    "shape,channels_last",
    [((2**18, 2), False), ((2**16, 3, 1), False), ((64, 4, 64, 64), True), ((256, 4, 16, 16), False)],
    ids=["(N, C) long", "(N, C, 1)", "channels_last", "contiguous NCHW"],
)
def test_moments_are_exact_where_the_native_kernel_is_not(shape, channels_last):
    """torch's statistics kernel sums (N, C), (N, C, 1) and channels_last input in float32 (relative
    error ~1e-4 at 2**18-2**20 values per channel); the moments recalibrate pools (the library's one
    statistics function) must not: float32 rounding of the blocks' sums, ~1e-6 at most."""
    from batchnorm.functional.stats import moments

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    st = moments(x)
    dims = [0] + list(range(2, x.dim()))
    ref = R.moments(x.double().numpy(), tuple(dims))
    assert st.count == x.numel() // x.shape[1] and st.shift is None
    assert_rel_close(st.total_mean(torch.float64), ref.mean, 1e-6, "mean")
    assert_rel_close(st.var, ref.var, 1e-6, "biased var")
