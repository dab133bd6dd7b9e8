"""Timing helpers shared by the CPU benchmarks: interleaved side-by-side medians.

Candidates are timed in alternation (a, b, a, b, ...) so a slow phase of the
machine hits both equally; the ratio of medians is what the scripts report.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict

import torch


def time_side_by_side(fns: Dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> Dict[str, float]:
    """Median seconds per call of each function, measured interleaved, the order reversed every repeat.

    Alternating the order matters on this machine: with glibc's default allocator, whichever
    function runs first after the other freed its large buffers can land on fresh ``mmap``
    pages and pay their faults (measured: the (4096, 1024) forward+backward case gave ratios
    from 0.44 to 3.5 with ours timed first, 1.00-1.04 with torch first or alternating)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    items = list(fns.items())
    for rep in range(repeats):
        for name, fn in (items if rep % 2 == 0 else items[::-1]):
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def machine_line() -> str:
    """One line naming the machine and versions, printed at the top of every table."""
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
