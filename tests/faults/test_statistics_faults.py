"""recalibrate / fold / diagnose under bad data and failing inputs: a clear error, and the model's
parameters, buffers and modes bit-identical afterwards (non-finite values never reach the statistics)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import diagnose, fold_batchnorm, recalibrate

from .factories import small


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _assert_unchanged(model, snap):
    state, modes = snap
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert [m.training for m in model.modules()] == modes


def _batches(bad_at=None, value=float("nan"), n=3):
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]
    if bad_at is not None:
        out[bad_at][2, 1, 3, 3] = value
    return out


@pytest.mark.parametrize("value,name", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_recalibrate_refuses_non_finite_data(value, name):
    model = small().train()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"batch 2: the input of batch norm '1' contains NaN or Inf"):
        recalibrate(model, _batches(bad_at=1, value=value), quiet=True)
    _assert_unchanged(model, snap)


def test_recalibrate_refuses_overflowing_statistics():
    model = nn.Sequential(nn.BatchNorm2d(3))
    snap = _snapshot(model)
    x = torch.randn(8, 3, 4, 4) * 1e30  # finite float32, but the squares overflow
    with pytest.raises(ValueError, match="contains NaN or Inf \\(or overflows\\)"):
        recalibrate(model, [x], quiet=True)
    _assert_unchanged(model, snap)


def test_non_finite_data_beyond_num_batches_is_not_read():
    model = small()
    counts = recalibrate(model, _batches(bad_at=2), num_batches=2, quiet=True)
    assert counts["1"] == 2 * 8 * 36 and bool(torch.isfinite(model[1].running_var).all())


def test_a_failing_data_source_changes_nothing():
    model = small()
    snap = _snapshot(model)

    def source():
        yield torch.randn(8, 3, 8, 8)
        raise OSError("the network drive went away")

    with pytest.raises(OSError, match="network drive"):
        recalibrate(model, source(), quiet=True)
    _assert_unchanged(model, snap)


def test_a_failing_forward_changes_nothing():
    model = small()
    snap = _snapshot(model)

    def forward_fn(m, batch):
        m(batch)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        recalibrate(model, _batches(), forward_fn=forward_fn, quiet=True)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "model,batches,says",
    [(small(), [], "yielded no batch"), (nn.Sequential(nn.Conv2d(3, 3, 1)), _batches(), "no batch norm"),
     (nn.Sequential(batchnorm.FrozenBatchNorm2d(3)), _batches(), "no batch norm"),
     (small(), [torch.randn(1, 3, 3, 3)], "saw 1 value(s) per channel")],
    ids=["empty", "no BN", "frozen only", "one value per channel"],
)  # fmt: skip
def test_recalibrate_refusals(model, batches, says):
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        recalibrate(model, batches, quiet=True)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("what", ["nan", "negative", "zero var with eps 0"])
def test_fold_refuses_statistics_that_would_write_non_finite_weights(what):
    model = small()
    with torch.no_grad():
        if what == "nan":
            model[4].running_var[1] = float("nan")
        elif what == "negative":
            model[4].running_var[0] = -1e-3
        else:
            model[4].eps = 0.0
            model[4].running_var[1] = 0.0
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="'4': "):
        fold_batchnorm(model)
    _assert_unchanged(model, snap)


def test_fold_with_a_failing_example_changes_nothing():
    model = small()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="failed on example_input"):
        fold_batchnorm(model, torch.randn(2, 5, 8, 8))
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("x", [torch.full((4, 3, 8, 8), float("nan")), (torch.randn(4, 3, 8, 8) * float("inf"),)])
def test_diagnose_refuses_non_finite_examples(x):
    model = small()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="example input contains NaN or Inf"):
        diagnose(model, x)
    _assert_unchanged(model, snap)
