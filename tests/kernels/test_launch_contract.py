"""What the launchers promise besides numbers: no host reads of tensor data (so a step can be
captured in a CUDA graph), a clear error for double backward, and the one-launch
running-statistics update against the float64 reference. Runs through Triton's interpreter
on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from tolerances import REL_TOL, assert_rel_close

from batchnorm import reference as R
from batchnorm.functional import batch_norm
from batchnorm.kernels import launch, ops

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
F32 = REL_TOL[torch.float32]
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every way of reading a tensor's data on the host raises while the launchers' own code
    runs; the kernel launch itself (the interpreter copies tensors to run them) is let through."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    calls = []

    def forbid():
        for name in HOST_READS:
            def raiser(self, *a, _name=name, **kw):
                raise AssertionError(f"host read of tensor data: Tensor.{_name}")
            monkeypatch.setattr(torch.Tensor, name, raiser)

    def allow():
        for name, fn in saved.items():
            monkeypatch.setattr(torch.Tensor, name, fn)

    real_launch = launch._launch

    def launch_unguarded(fn, grid, args, kwargs):
        calls.append(fn.__name__)
        allow()
        try:
            real_launch(fn, grid, args, kwargs)
        finally:
            forbid()

    monkeypatch.setattr(launch, "_launch", launch_unguarded)
    forbid()
    try:
        yield calls
    finally:
        allow()


def test_guard_catches_a_host_read(monkeypatch):
    # the guard itself can fail: a launcher that called .item() would be caught
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="host read"):
        torch.ones(3).sum().item()
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="host read"):
        bool(torch.ones(1) > 0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_launchers_do_no_host_reads(monkeypatch, momentum):
    g = torch.Generator().manual_seed(20)
    x = (torch.randn(3, 4, 6, 7, generator=g) + 2).to(DEV)
    r = torch.randn(x.shape, generator=g).to(DEV)
    w, b = torch.rand(4, generator=g).to(DEV) + 0.5, torch.randn(4, generator=g).to(DEV)
    rm, rv, nbt = torch.zeros(4, device=DEV), torch.ones(4, device=DEV), torch.tensor(5, device=DEV)
    with no_host_reads(monkeypatch) as calls:
        y, mean, rstd, shift, dmean = launch.train_forward(x, w, b, r, EPS, "relu")
        launch.running_stats_update(rm, rv, nbt, mean, rstd, EPS, x.numel() // 4, momentum)
        launch.backward(torch.ones_like(y), x, w, b, r, shift, dmean, rstd, "relu", True, True)
        launch.infer_forward(x, rm, rv, w, b, r, EPS, "silu")
    assert calls.count("bn_running_update_kernel") == 1 and len(calls) >= 5
    assert int(nbt) == 6


def test_double_backward_raises_a_clear_error():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4, 3, 5, 5, generator=g).to(DEV).requires_grad_(True)
    w = (torch.rand(3, generator=g) + 0.5).to(DEV).requires_grad_(True)
    b = torch.randn(3, generator=g).to(DEV).requires_grad_(True)
    y = batch_norm(x, None, None, w, b, True, 0.1, EPS, activation="silu", backend="triton")
    dy = torch.randn(x.shape, generator=g).to(DEV)
    # create_graph=True itself works (first-order gradients are right) ...
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    bn, cache = R.batch_norm_train(x.detach().double().numpy(), w.detach().double().numpy(),
                                   b.detach().double().numpy(), EPS)
    s = 1.0 / (1.0 + np.exp(-bn))
    ref_dx = R.batch_norm_backward(dy.double().numpy() * s * (1 + bn * (1 - s)), cache)[0]
    assert_rel_close(dx, ref_dx, F32, "dx with create_graph=True")
    # ... differentiating it again names the way out
    with pytest.raises(RuntimeError, match="backend='aten'"):
        dx.sum().backward()


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
def test_running_stats_update(momentum, buf_dtype):
    g = torch.Generator().manual_seed(22)
    x = (torch.randn(6, 5, 4, 3, generator=g) * 3 + 1).to(DEV)
    _, mean, rstd, _, _ = launch.train_forward(x, None, None, None, EPS, "identity")
    rm = (torch.randn(5, generator=g) * 0.1).to(DEV, buf_dtype)
    rv = (torch.rand(5, generator=g) + 0.5).to(DEV, buf_dtype)
    nbt = torch.tensor(3, device=DEV)
    rm0, rv0 = rm.double().cpu().numpy(), rv.double().cpu().numpy()
    ops.bn_running_update(rm, rv, nbt, mean, rstd, EPS, x.numel() // 5, momentum)
    _, cache = R.batch_norm_train(x.double().cpu().numpy(), np.ones(5), np.zeros(5), EPS)
    rm_ref, rv_ref = R.running_update(rm0, rv0, cache.moments, momentum, 4)
    tol = F32 if buf_dtype == torch.float32 else REL_TOL[buf_dtype]
    assert rm.dtype == buf_dtype and rv.dtype == buf_dtype
    assert_rel_close(rm, rm_ref, tol, "running_mean")
    assert_rel_close(rv, rv_ref, tol, "running_var")
    assert int(nbt) == 4


def test_running_stats_update_without_counter_and_rejects():
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(23)).to(DEV)
    _, mean, rstd, _, _ = launch.train_forward(x, None, None, None, EPS, "identity")
    rm, rv = torch.zeros(3, device=DEV), torch.ones(3, device=DEV)
    launch.running_stats_update(rm, rv, None, mean, rstd, EPS, 20, 1.0)  # momentum 1: the batch's own
    _, cache = R.batch_norm_train(x.double().cpu().numpy(), np.ones(3), np.zeros(3), EPS)
    assert_rel_close(rm, cache.moments.mean, F32, "running_mean")
    before = (rm.clone(), rv.clone())
    with pytest.raises(ValueError, match="num_batches_tracked"):
        launch.running_stats_update(rm, rv, None, mean, rstd, EPS, 20, None)
    with pytest.raises(ValueError, match="more than 1 value"):
        launch.running_stats_update(rm, rv, None, mean, rstd, EPS, 1, 0.1)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
