"""Run experiments: compute (or reuse) metrics, plot from the saved files, write the report.

Each experiment is a module with this interface:

* ``TITLE``, ``CLAIM`` - strings for the report;
* ``run(ctx: Context) -> dict`` - train and measure (its training runs go through
  :meth:`Context.execute`, which runs them on ``ctx.workers`` processes and caches each
  one); returns JSON-serialisable metrics with a ``"tables"`` entry
  ``{name: {"columns": [...], "rows": [[...], ...]}}`` that is also written as ``<name>.csv``;
* ``plot(metrics: dict, out_dir: Path) -> list[(png name, caption)]`` - figures drawn
  only from the metrics *as read back from* ``metrics.json``;
* ``section(metrics: dict) -> Section`` - headline claims, table and findings.

Resuming: every finished training run is saved at once under ``<out>/runs/`` and reused
by a later call with the same settings; ``metrics.json`` is written last and atomically,
with a ``fingerprint`` (experiment, seeds, --fast, data hash, a hash of the experiment's
settings, version), and a folder whose
``metrics.json`` parses and has the same fingerprint is complete and is reused rather
than recomputed. So an interrupted ``batchnorm reproduce all`` resumes where it stopped,
down to the run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import Dataset
from .report import Section, read_json, write_csv, write_json, write_report
from .sweep import default_workers, execute

__all__ = ["EXPERIMENTS", "Context", "load_complete", "run_experiment", "run_many"]

#: experiment name -> module (the order of ``reproduce all``)
EXPERIMENTS = {
    "fig1": "batchnorm.experiments.fig1",
    "learning-rate": "batchnorm.experiments.learning_rate",
    "init-scale": "batchnorm.experiments.init_scale",
    "bias": "batchnorm.experiments.bias",
    "depth": "batchnorm.experiments.depth",
    "convnet": "batchnorm.experiments.convnet",
    "regularization": "batchnorm.experiments.regularization",
    "small-batch": "batchnorm.experiments.small_batch",
    "train-eval": "batchnorm.experiments.train_eval",
}

#: bump when an experiment's protocol changes, so old results are not reused
RESULTS_VERSION = 3

#: seeds per arm by default (the protocol's minimum) and with --fast
DEFAULT_SEEDS, FAST_SEEDS = 5, 2


@dataclass
class Context:
    """What every experiment gets: the data, the seeds, ``fast`` (tiny settings for tests), ``quiet``, workers.

    ``cache_dir`` (set by :func:`run_experiment`) holds one JSON file per finished
    training run; ``reuse=False`` (``--force``) recomputes them.
    """

    data: Dataset
    seeds: list = field(default_factory=lambda: list(range(DEFAULT_SEEDS)))
    fast: bool = False
    quiet: bool = False
    workers: int = 1
    cache_dir: Path | None = None
    reuse: bool = True

    def execute(self, fn, runs, desc: str = "runs", workers: int | None = None) -> list[dict]:
        """Results of ``fn(spec, seed, data)`` for ``runs = [(spec, seed), ...]`` (see :func:`.sweep.execute`).

        ``workers`` overrides ``self.workers`` (1 for run functions that start their own processes).
        """
        return execute(fn, runs, self.data, self.cache_dir if self.reuse else None,
                       workers=self.workers if workers is None else workers, quiet=self.quiet, desc=desc,
                       cache_write=self.cache_dir)


def _fingerprint(name: str, ctx: Context) -> dict:
    settings = json.dumps(_module(name).settings(ctx), sort_keys=True, default=str)
    return {"experiment": name, "seeds": list(ctx.seeds), "fast": ctx.fast, "data": ctx.data.fingerprint(),
            "data_name": ctx.data.name, "version": RESULTS_VERSION,
            "settings": hashlib.sha256(settings.encode()).hexdigest()[:16]}


def load_complete(out_dir, name: str, ctx: Context) -> dict | None:
    """The saved metrics if ``out_dir/metrics.json`` is complete for these settings, else ``None``."""
    path = Path(out_dir) / "metrics.json"
    try:
        metrics = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or metrics.get("fingerprint") != _fingerprint(name, ctx):
        return None
    for table in metrics.get("tables", {}):
        if not (Path(out_dir) / f"{table}.csv").is_file():
            return None
    return metrics


def _module(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)} or all")
    return importlib.import_module(EXPERIMENTS[name])


def run_experiment(name: str, out_dir, ctx: Context, *, force: bool = False) -> Section:
    """Run (or reuse) experiment ``name`` into ``out_dir``: metrics, CSVs, figures, report."""
    mod = _module(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = None if force else load_complete(out_dir, name, ctx)
    reused = saved is not None
    if not reused:
        ctx = Context(ctx.data, list(ctx.seeds), ctx.fast, ctx.quiet, ctx.workers, out_dir / "runs", not force)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: one thread is faster, immune to a busy CPU, and deterministic
        try:
            start = time.perf_counter()
            metrics = mod.run(ctx)
            metrics["elapsed_s"] = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
        metrics["fingerprint"] = _fingerprint(name, ctx)
        metrics["machine"] = (f"{platform.machine()} {platform.processor() or ''}".strip()
                              + f", torch {torch.__version__}, 1 thread per run, {ctx.workers} worker process(es)")
        metrics["data_description"] = ctx.data.describe()
        json.dumps(metrics, allow_nan=True)  # fail before writing anything if not serialisable
        for table, spec in metrics.get("tables", {}).items():
            write_csv(out_dir / f"{table}.csv", spec["columns"], spec["rows"])
        write_json(out_dir / "metrics.json", metrics)  # last: its presence marks completion
    metrics = read_json(out_dir / "metrics.json")  # figures and report come from the file
    figures = mod.plot(metrics, out_dir)
    sec = mod.section(metrics)
    sec.figures = figures
    sec.elapsed_s = float(metrics.get("elapsed_s", 0.0))
    sec.reused = reused
    write_report(out_dir, f"batchnorm reproduce {name}", _preamble(metrics), [sec])
    return sec


def _preamble(metrics: dict) -> list[str]:
    fp = metrics["fingerprint"]
    seeds = fp["seeds"]
    seed_txt = f"seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} per arm)" if len(seeds) > 1 else f"seed {seeds[0]}"
    return [f"Data: {metrics['data_description']}. {seed_txt[0].upper() + seed_txt[1:]}"
            f"{'; --fast (tiny settings, not for conclusions)' if fp['fast'] else ''}. "
            f"Measured on {metrics['machine']}. The same seeds on the same machine give the same numbers."]


def run_many(names, out_root, ctx: Context, *, force: bool = False, log=print) -> list[Section]:
    """Run several experiments into ``out_root/<name>/`` and write a combined report in ``out_root``."""
    out_root = Path(out_root)
    sections = []
    for name in names:
        start = time.perf_counter()
        sec = run_experiment(name, out_root / name, ctx, force=force)
        log(f"{name}: {'reused complete results' if sec.reused else 'done'} "
            f"({time.perf_counter() - start:.1f} s) -> {out_root / name / 'report.md'}")
        sections.append(sec.prefixed(name))
    pre = _preamble(read_json(out_root / names[0] / "metrics.json"))
    total = sum(s.elapsed_s for s in sections)
    pre.append(f"Total compute time of the experiments: {total:.0f} s (sum of each experiment's own wall time).")
    write_report(out_root, "batchnorm reproduce all", pre, sections)
    return sections


__all__ += ["DEFAULT_SEEDS", "FAST_SEEDS", "default_workers"]
