"""SyncBatchNorm across 2 and 3 gloo processes on 127.0.0.1 vs single-process batch norm on the whole batch.

Each rank runs tests/family/sync_worker.py as a separate process (timeouts on the process
group and on every wait, so a dead or missing rank fails the test instead of hanging).
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import reference as R
from batchnorm.functional.batch_norm import batch_norm
from batchnorm.distributed import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm
from batchnorm.nn.batchnorm import BatchNorm2d
from tolerances import REL_TOL, REL_TOL_VS_TORCH, assert_rel_close, rel_err

from . import sync_worker as W
from ._util import np64

F32 = REL_TOL[torch.float32]
WORKER = os.path.join(os.path.dirname(__file__), "sync_worker.py")
#: wall-clock bound for one multi-process run (imports + rendezvous + the process-group timeout)
JOIN_S = 90


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, mode, tmp_path):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), str(tmp_path), mode], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        for r in range(world)
    ]
    deadline = time.monotonic() + JOIN_S
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SyncBatchNorm workers did not finish within {JOIN_S}s (hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [p.stdout.read().decode(errors="replace") for p in procs]
    errs = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(world) if (tmp_path / f"rank{r}.err").exists()}
    return codes, errs, logs


def _expected(name, sizes):
    """Single-process batch norm on the concatenated batch: float64 reference and torch.nn.BatchNorm2d."""
    st = W.initial_state()
    w, b = np64(st["weight"]), np64(st["bias"])
    rm, rv = np64(st["running_mean"]), np64(st["running_var"])
    tn = nn.BatchNorm2d(W.C, momentum=0.2)
    tn.load_state_dict(st)
    steps = []
    for step in range(2):
        x, dy = W.scenario_data(name, sizes, step)
        y_ref, cache = R.batch_norm_train(np64(x), w, b)
        dx_ref, dw_ref, db_ref = R.batch_norm_backward(np64(dy), cache)
        rm, rv = R.running_update(rm, rv, cache.moments, 0.2, step + 1)
        xt = x.clone().requires_grad_(True)
        tn.zero_grad()
        yt = tn(xt)
        yt.backward(dy)
        scale = float(np.linalg.norm(np64(dy) * (w.reshape(1, -1, 1, 1) * cache.rstd)))
        steps.append(dict(y=y_ref, dx=dx_ref, dw=dw_ref, db=db_ref, scale=scale, yt=yt.detach(), dxt=xt.grad,
                          dwt=tn.weight.grad.clone(), dbt=tn.bias.grad.clone()))  # fmt: skip
    tn.eval()
    return steps, rm, rv, tn, tn(W.scenario_data(name, sizes, 0)[0]).detach()


@pytest.mark.parametrize("world", [2, 3])
def test_sync_matches_single_process_on_concatenated_batch(world, tmp_path):
    codes, errs, logs = _launch(world, "run", tmp_path)
    assert codes == [0] * world, f"exit codes {codes}; errors: {errs}; logs: {logs}"
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, sizes, members in W.SCENARIOS[world]:
        ranks = list(members) if members is not None else list(range(world))
        steps, rm, rv, tn, y_eval = _expected(name, sizes)
        for step, e in enumerate(steps):
            y = torch.cat([res[r][name]["y"][step] for r in ranks])
            dx = torch.cat([res[r][name]["dx"][step] for r in ranks])
            dw = sum(res[r][name]["dw"][step] for r in ranks)  # per-rank grads; DDP sums them
            db = sum(res[r][name]["db"][step] for r in ranks)
            what = f"{name} (world {world}, sizes {sizes}) step {step}"
            assert_rel_close(y, e["y"], F32, f"{what}: y")
            assert_rel_close(dx, e["dx"], F32, f"{what}: dx", scale=e["scale"])
            assert_rel_close(dw, e["dw"], F32, f"{what}: dweight")
            assert_rel_close(db, e["db"], F32, f"{what}: dbias")
            if "1e6" in name:  # torch.nn itself is off by ulp(1e6)/std there: the reference decides alone
                assert rel_err(e["yt"], e["y"]) > 1e-3
                continue
            assert_rel_close(y, e["yt"], F32, f"{what}: y vs torch.nn")
            assert_rel_close(dx, e["dxt"], F32, f"{what}: dx vs torch.nn", scale=e["scale"])
            assert_rel_close(dw, e["dwt"], F32, f"{what}: dweight vs torch.nn")
        for r in ranks:  # every rank, the empty one too, holds the global running statistics
            state = res[r][name]["state"]
            assert_rel_close(state["running_mean"], rm, F32, f"{name} rank {r}: running_mean")
            assert_rel_close(state["running_var"], rv, F32, f"{name} rank {r}: running_var")
            if "1e6" not in name:
                assert_rel_close(state["running_var"], tn.running_var, F32, f"{name} rank {r}: running_var vs torch.nn")
            assert int(state["num_batches_tracked"]) == 5
        y_ev = torch.cat([res[r][name]["y_eval"] for r in ranks])
        x_ev = W.scenario_data(name, sizes, 0)[0]
        y_ev_ref = R.batch_norm_eval(np64(x_ev), rm, rv, np64(W.initial_state()["weight"]), np64(W.initial_state()["bias"]))
        assert_rel_close(y_ev, y_ev_ref, F32, f"{name}: eval output vs the reference")
        if "1e6" not in name:
            assert_rel_close(y_ev, y_eval, REL_TOL_VS_TORCH[torch.float32], f"{name}: eval output vs torch.nn")


@pytest.mark.parametrize("mode,match", [
    ("die-before-init", "1/2 clients joined"),  # rank 1 never joins: the rendezvous times out
    ("die-after-init", "across 2 processes failed or timed out"),  # its first exchange (the handshake) fails
])  # fmt: skip
def test_dead_process_gives_clear_error_not_hang(mode, match, tmp_path):
    t0 = time.monotonic()
    codes, errs, logs = _launch(2, mode, tmp_path)
    assert codes[1] == 7
    assert codes[0] == 3, f"rank 0 should fail cleanly, exit code {codes[0]}; log: {logs[0]}"
    assert match in errs[0], errs[0]
    assert time.monotonic() - t0 < JOIN_S


def test_single_process_falls_back_to_batch_norm():
    sb, bn = SyncBatchNorm(3), BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(sb(x), bn(x))
    assert torch.equal(sb.running_var, bn.running_var) and int(sb.num_batches_tracked) == 1
    rm, rv = torch.zeros(3), torch.ones(3)
    assert torch.equal(sync_batch_norm(x, rm, rv), batch_norm(x, None, None, training=True))
    assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var)


def test_convert_sync_batchnorm_keeps_state_and_parameters():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(BatchNorm2d(4, momentum=None)),
                        nn.BatchNorm1d(2, affine=False))  # fmt: skip
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].running_mean.normal_()
        net[1].num_batches_tracked.fill_(4)
    net[1].weight.requires_grad_(False)
    net.eval()
    w = net[1].weight
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 3, 3)
    y0 = net[:3](x)
    out = convert_sync_batchnorm(net)
    assert out is net
    assert [type(m) for m in (net[1], net[2][0], net[3])] == [SyncBatchNorm] * 3
    assert net[1].weight is w and not net[1].weight.requires_grad and not net.training
    assert net[2][0].momentum is None and net[3].affine is False
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(net[:3](x), y0)
    assert type(convert_sync_batchnorm(nn.BatchNorm3d(2))) is SyncBatchNorm


def test_eval_without_running_stats_does_not_synchronize(monkeypatch):
    # torch.nn.SyncBatchNorm syncs in training only: a rank that evaluates alone (validation
    # on rank 0) with track_running_stats=False must use its local batch, not wait for the others
    import batchnorm.distributed.sync_batchnorm as S

    def no_collective(*args, **kwargs):
        raise AssertionError("eval mode must not start a collective")

    monkeypatch.setattr(S, "world_size", lambda process_group=None: 2)
    monkeypatch.setattr(S, "sync_batch_norm", no_collective)
    sb = SyncBatchNorm(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    y_ref, _ = R.batch_norm_train(x.numpy())
    assert_rel_close(sb.double()(x), y_ref, REL_TOL[torch.float64], "y")


def test_check_finite_raises_on_every_rank_before_any_update(monkeypatch):
    # the check runs on the exchanged global statistics, which every rank holds identically,
    # so all ranks raise together (no rank left waiting) and no running statistic moves
    import batchnorm.distributed.sync_batchnorm as S

    def exchange(self, header, mean, var):  # what the exchange returns when the other rank's batch had a NaN
        packed = torch.cat([torch.tensor(header, dtype=torch.float64), mean, var])
        other = packed.clone()
        other[S.HEADER + 1] = float("nan")
        return torch.stack([packed, other])

    monkeypatch.setattr(S, "world_size", lambda process_group=None: 2)
    monkeypatch.setattr(S.AllRanks, "_exchange", exchange)
    monkeypatch.setattr(S.AllRanks, "handshake", lambda self: None)
    sb = SyncBatchNorm(3, check_finite=True)
    before = {k: v.clone() for k, v in sb.state_dict().items()}
    with pytest.raises(FloatingPointError, match="not finite"):
        sb(torch.randn(4, 3, 2, 2))
    for k, v in sb.state_dict().items():
        assert torch.equal(v, before[k]), k
