"""`batchnorm reproduce`: every experiment with --fast writes its files and a report that opens with the claims;
resume run by run; reproducibility across seeds and worker counts; errors."""

from __future__ import annotations

import base64
import csv
import json
import os
import re

import pytest

from batchnorm._io import atomic_write
from batchnorm.cli import main
from batchnorm.experiments import runner
from batchnorm.experiments.runner import EXPERIMENTS

FIGURES = {
    "fig1": ["fig1_accuracy.png", "fig1_sigmoid_input.png"],
    "learning-rate": ["learning_rate.png"],
    "init-scale": ["init_scale_curves.png", "init_scale_outputs.png"],
    "bias": ["bias.png"],
    "depth": ["depth.png"],
    "convnet": ["convnet.png"],
    "regularization": ["regularization.png"],
    "small-batch": ["small_batch.png"],
    "train-eval": ["train_eval.png"],
}
VERDICTS = {"reproduced", "partly", "not reproduced"}


@pytest.fixture(scope="module")
def all_fast(tmp_path_factory):
    out = tmp_path_factory.mktemp("all")
    assert main(["reproduce", "all", "--fast", "--quiet", "--out", str(out)]) == 0
    return out


def _strip(metrics):
    return {k: v for k, v in metrics.items() if k not in ("elapsed_s", "machine")}


def test_every_experiment_writes_metrics_csv_figures_report(all_fast):
    assert set(FIGURES) == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        d = all_fast / name
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["fingerprint"]["experiment"] == name and metrics["fingerprint"]["fast"] is True
        assert metrics["fingerprint"]["seeds"] == [0, 1]
        for table, spec in metrics["tables"].items():
            with open(d / f"{table}.csv") as f:
                rows = list(csv.reader(f))
            assert rows[0] == spec["columns"] and len(rows) == len(spec["rows"]) + 1 > 1
        for png in FIGURES[name]:
            assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name}/{png}"
        md = (d / "report.md").read_text()
        assert md.count("|---|") >= 2 and all(f"]({png})" in md for png in FIGURES[name])
        page = (d / "report.html").read_text()
        imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
        assert len(imgs) == len(FIGURES[name]) and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
        assert "<img" in page and "src='fig" not in page  # self-contained: no file references
    combined = (all_fast / "report.md").read_text()
    assert all(f"]({name}/" in combined for name in EXPERIMENTS)
    assert len(re.findall("data:image/png;base64", (all_fast / "report.html").read_text())) == sum(
        map(len, FIGURES.values()))
    assert not list(all_fast.rglob("*.tmp")), "temporary files left behind"


def test_report_opens_with_headline_verdicts_and_contents(all_fast):
    md = (all_fast / "report.md").read_text()
    head, contents, first = md.index("## Headline"), md.index("## Contents"), md.index("## fig1")
    assert head < contents < first
    table = md[head:contents]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| experiment")]
    assert {r.split(" | ")[0][2:] for r in rows} == set(EXPERIMENTS)  # every experiment has a claim row
    assert all(r.rstrip(" |").rsplit(" | ", 1)[1] in VERDICTS for r in rows)
    assert "**Verdict rule.**" in table and "±" in table
    for name in EXPERIMENTS:
        assert f"](#{name})" in md[contents:first]
    page = (all_fast / "report.html").read_text()
    h, c, s = page.index("id='headline'"), page.index("id='contents'"), page.index("id='fig1'")
    assert h < c < s and page.count("<td class='") == len(rows)
    assert all(f"href='#{name}'" in page for name in EXPERIMENTS)


def test_every_section_quotes_the_papers_and_states_its_protocol(all_fast):
    for name in EXPERIMENTS:
        md = (all_fast / name / "report.md").read_text()
        assert "**The papers' numbers.**" in md and "**Protocol.**" in md and "seeds" in md, name


def test_experiments_do_not_change_file_permissions(all_fast):
    """Modes come from batchnorm._io.atomic_write alone (the user's umask once that is fixed there)."""
    atomic_write(all_fast / "probe.bin", b"x")
    expected = (all_fast / "probe.bin").stat().st_mode & 0o777
    for path in all_fast.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == expected, path
    (all_fast / "probe.bin").unlink()


def test_resume_reuses_complete_experiments_and_finished_runs(all_fast):
    before = {n: (all_fast / n / "metrics.json").read_bytes() for n in EXPERIMENTS}
    # an interrupted run: depth's metrics.json truncated mid-write and two of its runs lost,
    # convnet's metrics.json never written
    (all_fast / "depth" / "metrics.json").write_bytes(before["depth"][:100])
    runs = sorted((all_fast / "depth" / "runs").glob("*.json"))
    lost = {p.name for p in runs[:2]}
    for p in runs[:2]:
        p.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in runs[2:]}
    (all_fast / "convnet" / "metrics.json").unlink()
    assert main(["reproduce", "all", "--fast", "--quiet", "--out", str(all_fast)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (all_fast / "depth" / "runs").glob("*.json")}
    assert set(after) == set(kept) | lost  # exactly the lost runs were recomputed
    assert all(after[k] == t for k, t in kept.items())
    for n in EXPERIMENTS:
        now = json.loads((all_fast / n / "metrics.json").read_text())
        if n in ("depth", "convnet"):  # recomputed from the same seeds: the same numbers
            assert _strip(now) == _strip(json.loads(before[n]))
        else:
            assert (all_fast / n / "metrics.json").read_bytes() == before[n]
    # other seeds are not "complete" for these settings
    data = _fast_data()
    assert runner.load_complete(all_fast / "fig1", "fig1", runner.Context(data=data, seeds=[1, 2], fast=True)) is None
    assert runner.load_complete(all_fast / "fig1", "fig1", runner.Context(data=data, seeds=[0, 1], fast=True))


def _fast_data():
    from batchnorm.experiments.data import load_digits

    return load_digits().subset(300, 100, 200)


def test_same_seeds_same_numbers_whatever_the_workers_other_seeds_differ(tmp_path):
    outs = []
    for i, (seed, workers) in enumerate((("0", "1"), ("0", "2"), ("3", "2"))):
        out = tmp_path / str(i)
        assert main(["reproduce", "depth", "--fast", "--quiet", "--seed", seed, "--workers", workers,
                     "--out", str(out)]) == 0
        outs.append(_strip(json.loads((out / "metrics.json").read_text())))
    assert outs[0] == outs[1]
    assert outs[0]["arms"] != outs[2]["arms"]


def test_bad_arguments_and_data_are_clear_errors_that_write_nothing(tmp_path, capsys):
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
    assert main(["reproduce", "fig1", "--download", "--out", str(out)]) == 2
    assert "--download needs --data-dir" in capsys.readouterr().err
    assert main(["reproduce", "fig1", "--seeds", "1", "--out", str(out)]) == 2
    assert "--seeds must be at least 2" in capsys.readouterr().err
    assert main(["reproduce", "fig1", "--workers", "0", "--out", str(out)]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert not out.exists()


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
    assert m["settings"]["threshold"] == 0.97


def test_unknown_experiment_is_rejected():
    with pytest.raises(SystemExit):
        main(["reproduce", "nope"])
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        runner.run_experiment("nope", "x", runner.Context(data=None))


def test_default_workers_is_the_cpus_available():
    assert runner.default_workers() == len(os.sched_getaffinity(0))
