"""Run many independent training runs (configurations x seeds) in parallel processes, each cached on disk.

A *run function* is a module-level ``fn(spec: dict, seed: int, data: Dataset) -> dict``
whose result depends only on its arguments: it seeds its own initialisation, uses one
CPU thread and its own data-order generator, so the same ``(spec, seed, data)`` gives
the same numbers on the same machine whichever process runs it and in whatever order.

:func:`execute` runs a list of ``(spec, seed)`` pairs with ``workers`` processes (forked,
so they share the already-loaded data set), writes each finished result to
``cache_dir/<key>.json`` (atomically; ``key`` hashes the function, spec, seed, data and
:data:`RUNS_VERSION`) and reuses results already there. An interrupted experiment
therefore resumes run by run.

Example::

    >>> results = execute(train_run, [({"lr": 0.1}, s) for s in range(5)], data, "out/runs", workers=2)
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from .._io import atomic_write
from .data import Dataset
from .train import progress

__all__ = ["RUNS_VERSION", "default_workers", "execute", "run_key"]

#: bump when a run function's protocol changes, so cached runs are not reused
RUNS_VERSION = 2

_WORKER: dict = {}


def default_workers() -> int:
    """Worker processes: the CPUs this process may use (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def run_key(fn: Callable, spec: dict, seed: int, data_fingerprint: str) -> str:
    """A stable hash naming one run's cache file."""
    blob = json.dumps({"fn": f"{fn.__module__}.{fn.__qualname__}", "spec": spec, "seed": seed,
                       "data": data_fingerprint, "version": RUNS_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _warm_up() -> None:
    """Pay one-time lazy initialisation (the first ``optimizer.step()`` imports ``torch._dynamo``, ~2 s) once,
    in this process, so forked workers inherit it instead of each paying it again."""
    if not _WORKER.get("warm"):
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        torch.optim.SGD([p], lr=0.1, momentum=0.9).step()
        _WORKER["warm"] = True


def _init_worker(data: Dataset) -> None:
    torch.set_num_threads(1)
    _WORKER["data"] = data


def _call(fn: Callable, spec: dict, seed: int) -> dict:
    return fn(spec, seed, _WORKER["data"])


def _normalise(result: dict) -> dict:
    """The result as it reads back from JSON (so fresh and cached results are identical)."""
    return json.loads(json.dumps(result, allow_nan=True))


def _load(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def execute(fn: Callable, runs: Sequence[tuple[dict, int]], data: Dataset, cache_dir=None, *,
            workers: int = 1, quiet: bool = True, desc: str = "runs", cache_write=None) -> list[dict]:
    """Results of ``fn(spec, seed, data)`` for every ``(spec, seed)`` in ``runs``, in order.

    Cached results in ``cache_dir`` are reused; the others run on ``workers`` forked
    processes (``workers <= 1``: in this process) and are saved as they finish to
    ``cache_write`` (default ``cache_dir``; ``cache_dir=None, cache_write=d`` recomputes
    everything and refreshes ``d``), with a progress bar over runs unless ``quiet``.
    Identical ``(spec, seed)`` pairs run once. A failing run raises its exception here.
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    store = Path(cache_write) if cache_write is not None else cache
    fp = data.fingerprint()
    keys = [run_key(fn, spec, seed, fp) for spec, seed in runs]
    results: list = [None] * len(runs)
    todo: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        got = _load(cache / f"{key}.json") if cache is not None else None
        if got is not None:
            results[i] = got
        else:
            todo.setdefault(key, []).append(i)

    def done(key: str, result: dict) -> None:
        result = _normalise(result)
        if store is not None:
            atomic_write(store / f"{key}.json", json.dumps(result, allow_nan=True).encode())
        for i in todo[key]:
            results[i] = result

    if todo:
        with progress(len(todo), desc, quiet) as bar:
            if workers <= 1 or len(todo) == 1:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                _WORKER["data"] = data
                try:
                    for key, idx in todo.items():
                        spec, seed = runs[idx[0]]
                        done(key, fn(spec, seed, data))
                        bar.update(1)
                finally:
                    torch.set_num_threads(threads)
            else:
                _warm_up()
                ctx = mp.get_context("fork")
                with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                         initializer=_init_worker, initargs=(data,)) as pool:
                    futures = {pool.submit(_call, fn, *runs[idx[0]]): key for key, idx in todo.items()}
                    pending = set(futures)
                    try:
                        while pending:
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for fut in finished:
                                done(futures[fut], fut.result())
                                bar.update(1)
                    except BaseException:  # a failed run or Ctrl-C: do not start the queued ones
                        for fut in pending:
                            fut.cancel()
                        raise
    return results
