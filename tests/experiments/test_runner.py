"""`batchnorm reproduce`: every experiment with --fast writes its files; resume; reproducibility; errors."""

from __future__ import annotations

import base64
import csv
import json
import re

import pytest

from batchnorm.cli import main
from batchnorm.experiments import runner
from batchnorm.experiments.runner import EXPERIMENTS

FIGURES = {
    "fig1": ["fig1_accuracy.png", "fig1_sigmoid_input.png"],
    "learning-rate": ["learning_rate.png"],
    "init-scale": ["init_scale_curves.png", "init_scale_outputs.png"],
    "depth": ["depth.png"],
    "small-batch": ["small_batch.png"],
    "convnet": ["convnet.png"],
    "train-eval": ["train_eval.png"],
}


@pytest.fixture(scope="module")
def all_fast(tmp_path_factory):
    out = tmp_path_factory.mktemp("all")
    assert main(["reproduce", "all", "--fast", "--quiet", "--out", str(out)]) == 0
    return out


def _strip(metrics):
    return {k: v for k, v in metrics.items() if k != "elapsed_s"}


def test_every_experiment_writes_metrics_csv_figures_report(all_fast):
    assert set(FIGURES) == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        d = all_fast / name
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["fingerprint"]["experiment"] == name and metrics["fingerprint"]["fast"] is True
        for table, spec in metrics["tables"].items():
            with open(d / f"{table}.csv") as f:
                rows = list(csv.reader(f))
            assert rows[0] == spec["columns"] and len(rows) == len(spec["rows"]) + 1 > 1
        for png in FIGURES[name]:
            assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name}/{png}"
        md = (d / "report.md").read_text()
        assert md.count("|---|") >= 1 and all(f"]({png})" in md for png in FIGURES[name])
        page = (d / "report.html").read_text()
        imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
        assert len(imgs) == len(FIGURES[name]) and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
        assert "<img" in page and "src='fig" not in page  # self-contained: no file references
    combined = (all_fast / "report.md").read_text()
    assert all(f"]({name}/" in combined for name in EXPERIMENTS)
    assert len(re.findall("data:image/png;base64", (all_fast / "report.html").read_text())) == sum(
        map(len, FIGURES.values()))
    assert not list(all_fast.rglob("*.tmp")), "temporary files left behind"


def test_resume_skips_complete_and_redoes_partial(all_fast, monkeypatch):
    before = {n: (all_fast / n / "metrics.json").read_bytes() for n in EXPERIMENTS}
    # an interrupted run: depth's metrics.json truncated mid-write, convnet's never written
    (all_fast / "depth" / "metrics.json").write_bytes(before["depth"][:100])
    (all_fast / "convnet" / "metrics.json").unlink()
    ran = []
    import importlib

    for name, modname in EXPERIMENTS.items():
        mod = importlib.import_module(modname)
        orig = mod.run

        def spy(ctx, _orig=orig, _name=name):
            ran.append(_name)
            return _orig(ctx)

        monkeypatch.setattr(mod, "run", spy)
    assert main(["reproduce", "all", "--fast", "--quiet", "--out", str(all_fast)]) == 0
    assert ran == ["depth", "convnet"]
    for n in EXPERIMENTS:
        after = json.loads((all_fast / n / "metrics.json").read_text())
        if n not in ran:
            assert (all_fast / n / "metrics.json").read_bytes() == before[n]
        else:  # recomputed with the same seed: the same numbers
            assert _strip(after) == _strip(json.loads(before[n]))
    # another seed is not "complete" for these settings
    assert runner.load_complete(all_fast / "fig1", "fig1",
                                runner.Context(data=_fast_data(), seed=1, fast=True)) is None
    assert runner.load_complete(all_fast / "fig1", "fig1",
                                runner.Context(data=_fast_data(), seed=0, fast=True)) is not None


def _fast_data():
    from batchnorm.experiments.data import load_digits

    return load_digits().subset(300, 200)


def test_same_seed_same_numbers_other_seed_differs(tmp_path):
    outs = []
    for i, seed in enumerate(("0", "0", "3")):
        out = tmp_path / str(i)
        assert main(["reproduce", "convnet", "--fast", "--quiet", "--seed", seed, "--out", str(out)]) == 0
        outs.append(_strip(json.loads((out / "metrics.json").read_text())))
    assert outs[0] == outs[1]
    assert outs[0]["curves"] != outs[2]["curves"]


def test_bad_data_dir_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    import numpy as np

    from batchnorm.experiments.data import write_idx

    data = tmp_path / "mnist"
    data.mkdir()
    write_idx(data / "t10k-images-idx3-ubyte.gz", np.zeros((4, 6, 6), np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    p = data / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-5])
    out = tmp_path / "out"
    assert main(["reproduce", "fig1", "--data-dir", str(data), "--out", str(out), "--quiet"]) == 2
    assert str(p) in capsys.readouterr().err
    assert not out.exists()
    assert main(["reproduce", "fig1", "--download", "--out", str(out)]) == 2
    assert "--download needs --data-dir" in capsys.readouterr().err


def test_runs_on_mnist_idx_files(tmp_path):
    """The MNIST path end to end on tiny 16x16 IDX files (the convnet needs sides divisible by 4)."""
    import numpy as np

    from batchnorm.experiments.data import write_idx

    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    for prefix, n in (("train", 400), ("t10k", 200)):
        write_idx(data / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 16, 16), dtype=np.uint8))
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["reproduce", "convnet", "--fast", "--quiet", "--data-dir", str(data), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["fingerprint"]["data_name"] == "mnist" and "16x16" in m["data_description"]


def test_unknown_experiment_is_rejected():
    with pytest.raises(SystemExit):
        main(["reproduce", "nope"])
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        runner.run_experiment("nope", "x", runner.Context(data=None))
