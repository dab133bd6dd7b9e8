"""``batchnorm reproduce NAME|all``: run the experiments and write metrics, figures and a report.

Examples::

    batchnorm reproduce fig1                      # embedded digits, 5 seeds per arm -> results/fig1/
    batchnorm reproduce all --quiet               # every experiment -> results/all/<name>/ + results/all/report.md
    batchnorm reproduce fig1 --data-dir ~/mnist --download   # real MNIST, fetched and checksummed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_subcommands", "reproduce"]


def add_subcommands(subparsers) -> None:
    """Register ``reproduce`` on an ``argparse`` sub-parser set (called by :mod:`batchnorm.cli`)."""
    from .runner import DEFAULT_SEEDS, EXPERIMENTS, FAST_SEEDS

    p = subparsers.add_parser(
        "reproduce",
        help="reproduce the batch-norm papers' claims (figures + report)",
        description="Train the experiments' small networks with and without batch norm (and its family) over "
        "several seeds, each arm at its own best learning rate chosen on a validation split, and write metrics "
        "(JSON/CSV), PNG figures, report.md and a self-contained report.html that opens with a table of claims, "
        "our numbers with their spread, the papers' numbers and a verdict. Experiments: " + ", ".join(EXPERIMENTS)
        + ". Finished runs are reused (resume); --force recomputes.",
    )
    p.add_argument("name", choices=[*EXPERIMENTS, "all"], help="experiment to run, or all")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/NAME/)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the MNIST IDX files (.gz or plain); default: scikit-learn's embedded digits")
    p.add_argument("--download", action="store_true",
                   help="download MNIST into --data-dir from the usual mirrors and verify the checksums")
    p.add_argument("--fast", action="store_true", help="tiny settings (seconds; for tests, not for conclusions)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-experiment lines")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0); seeds are SEED..SEED+N-1")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds per arm (default {DEFAULT_SEEDS}; {FAST_SEEDS} with --fast); at least 2")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel training processes (default: the CPUs available to this process)")
    p.add_argument("--force", action="store_true", help="recompute even if complete results exist")
    p.set_defaults(func=reproduce)


def _fail(msg: str) -> int:
    print(f"batchnorm reproduce: {msg}", file=sys.stderr)
    return 2


def reproduce(args: argparse.Namespace) -> int:
    """Entry point of ``batchnorm reproduce``; returns the exit status (2 on bad data or arguments)."""
    from .data import IDXError, load_dataset
    from .runner import DEFAULT_SEEDS, EXPERIMENTS, FAST_SEEDS, Context, default_workers, run_experiment, run_many

    n_seeds = args.seeds if args.seeds is not None else (FAST_SEEDS if args.fast else DEFAULT_SEEDS)
    if n_seeds < 2:
        return _fail(f"--seeds must be at least 2 (a spread needs two runs), got {n_seeds}")
    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers must be at least 1, got {args.workers}")
    if args.seed < 0:
        return _fail(f"--seed must be >= 0, got {args.seed}")
    try:
        data = load_dataset("mnist" if args.data_dir else "digits", args.data_dir, args.download, args.quiet)
    except (IDXError, ValueError, RuntimeError, ImportError) as err:
        return _fail(str(err))
    if args.fast:
        data = data.subset(300, 100, 200)
    need = 64  # the largest batch any experiment draws from the training split
    if len(data.train_y) < need:
        return _fail(f"the training split of {data.describe()} has {len(data.train_y)} images; the experiments draw "
                     f"batches of up to {need} - use a larger data set")
    ctx = Context(data=data, seeds=list(range(args.seed, args.seed + n_seeds)), fast=args.fast, quiet=args.quiet,
                  workers=args.workers or default_workers())
    out = args.out if args.out is not None else Path("results") / args.name
    log = (lambda *a, **k: None) if args.quiet else print
    if args.name == "all":
        run_many(list(EXPERIMENTS), out, ctx, force=args.force, log=log)
    else:
        sec = run_experiment(args.name, out, ctx, force=args.force)
        log(f"{args.name}: {'reused complete results (--force recomputes)' if sec.reused else 'done'} "
            f"in {sec.elapsed_s:.1f} s")
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0
