"""The protocol's statistics and choices, against hand-computed values; the sweep engine's determinism and cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from batchnorm.experiments import sweep
from batchnorm.experiments.data import Dataset
from batchnorm.experiments.protocol import fmt_ratio, paired, ratio_stat, reach, select_lr, stat, verdict


def test_stat_mean_std_and_t_interval():
    s = stat([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.mean == 3.0 and s.std == pytest.approx(math.sqrt(2.5), rel=1e-15)
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4 dof)
    assert (s.lo, s.hi) == (pytest.approx(3 - half, rel=1e-12), pytest.approx(3 + half, rel=1e-12))
    assert s.fmt(100, 1, "%") == "300.0 ± 158.1%"
    one = stat([0.5])
    assert one.std == 0.0 and one.lo == -math.inf and one.hi == math.inf  # one seed proves nothing


def test_paired_differences_use_the_same_seed():
    d = paired([0.97, 0.96, 0.98], [0.95, 0.97, 0.96])
    assert d.values == pytest.approx([0.02, -0.01, 0.02])
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0, 2.0], [1.0])


def test_reach_and_ratio_with_censoring():
    assert reach([0, 10, 20, 30], [0.1, 0.5, 0.9, 0.95], 0.9) == 20
    assert reach([0, 10], [0.1, 0.5], 0.9) is None
    r = ratio_stat([400, 600, None], [200, 200, 100], budget=3000)
    assert r["ratios"] == [2.0, 3.0, 30.0] and r["censored"] == 1 and r["ours_missing"] == 0
    assert r["gmean"] == pytest.approx((2 * 3 * 30) ** (1 / 3), rel=1e-12)
    assert fmt_ratio(r).startswith(">= 11.7x ± 15.9") and "never reached it in 1 of 3" in fmt_ratio(r)
    r = ratio_stat([400, 500], [None, 250], budget=3000)
    assert r["ratios"] == [2.0] and r["ours_missing"] == 1


def test_select_lr_by_mean_validation_score_and_flags_the_edge():
    assert select_lr({0.1: [0.8, 0.9], 0.3: [0.9, 0.92], 1.0: [0.5, float("nan")]}) == (0.3, False)
    assert select_lr({0.1: [0.8], 0.3: [0.7]}) == (0.1, True)
    with pytest.raises(ValueError, match="no learning rates"):
        select_lr({})


def test_verdict_rule():
    assert verdict([True, True]) == "reproduced"
    assert verdict([True, False]) == "partly"
    assert verdict([False]) == "not reproduced"
    assert verdict([]) == "not reproduced"


def _toy(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("toy", x[:120], y[:120], x[120:160], y[120:160], x[160:], y[160:])


def _spec(lr):
    return {"model": {"kind": "mlp", "hidden": [8], "norm": "bn", "activation": "relu", "init": "kaiming"},
            "lr": lr, "batch_size": 20, "steps": 15, "evals": [0, 5, 15]}


def test_execute_is_deterministic_across_worker_counts_and_caches(tmp_path):
    from batchnorm.experiments.runs import train_run

    data = _toy()
    runs = [(_spec(lr), seed) for lr in (0.1, 0.5) for seed in (0, 1)] + [(_spec(0.1), 0)]  # one duplicate
    one = sweep.execute(train_run, runs, data, tmp_path / "a", workers=1)
    two = sweep.execute(train_run, runs, data, tmp_path / "b", workers=2)
    assert one == two and one[0] == one[-1]
    assert one[0] != one[1]  # another seed, other numbers
    assert len(list((tmp_path / "a").glob("*.json"))) == 4  # the duplicate ran once
    # cached: a second call reads the files (a changed file is what comes back)
    key = sweep.run_key(train_run, *runs[0], data.fingerprint())
    cached = json.loads((tmp_path / "a" / f"{key}.json").read_text())
    cached["marker"] = 1
    (tmp_path / "a" / f"{key}.json").write_text(json.dumps(cached))
    again = sweep.execute(train_run, runs[:1], data, tmp_path / "a", workers=2)
    assert again[0]["marker"] == 1
    # a truncated cache file is recomputed, and rewritten whole
    (tmp_path / "a" / f"{key}.json").write_text('{"step": [0')
    fresh = sweep.execute(train_run, runs[:1], data, tmp_path / "a", workers=1)
    assert fresh[0] == one[0]
    assert json.loads((tmp_path / "a" / f"{key}.json").read_text()) == one[0]
    assert not list(tmp_path.rglob("*.tmp"))


def test_run_key_depends_on_everything_that_changes_the_numbers():
    from batchnorm.experiments.runs import train_run

    base = sweep.run_key(train_run, _spec(0.1), 0, "abc")
    assert base == sweep.run_key(train_run, _spec(0.1), 0, "abc")
    assert len({base, sweep.run_key(train_run, _spec(0.2), 0, "abc"), sweep.run_key(train_run, _spec(0.1), 1, "abc"),
                sweep.run_key(train_run, _spec(0.1), 0, "abd")}) == 4


def test_execute_reports_a_failing_run():
    from batchnorm.experiments.runs import train_run

    bad = _spec(0.1)
    bad["batch_size"] = 10_000
    with pytest.raises(ValueError, match="batch_size must be in 1..120"):
        sweep.execute(train_run, [(bad, 0), (_spec(0.1), 0)], _toy(), None, workers=2)


def test_tuned_arms_choose_on_validation_and_extend_to_all_seeds(tmp_path):
    from batchnorm.experiments.common import tuned_arms
    from batchnorm.experiments.runner import Context
    from batchnorm.experiments.runs import train_run

    ctx = Context(_toy(), seeds=[0, 1, 2], workers=1, cache_dir=tmp_path, quiet=True)
    spec = {k: v for k, v in _spec(0.0).items() if k != "lr"}
    out = tuned_arms(ctx, {"a": spec}, [0.01, 0.5], tune_seeds=2,
                     extra={"b": ("a", lambda res: res["a"]["lr"] * 2)})
    a = out["a"]
    scores = {lr: np.mean([np.mean(h["val_acc"]) for h in
                           sweep.execute(train_run, [({**spec, "lr": lr}, s) for s in (0, 1)], ctx.data, tmp_path)])
              for lr in (0.01, 0.5)}
    assert a["lr"] == max(scores, key=scores.get) and a["at_edge"]
    assert len(a["runs"]) == 3 and out["b"]["lr"] == 2 * a["lr"] and len(out["b"]["runs"]) == 3
    assert a["grid"]["0.01"]["mean"] == pytest.approx(scores[0.01], rel=1e-12)
