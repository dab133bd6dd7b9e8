"""``batchnorm reproduce NAME|all``: run the experiments and write metrics, figures and a report.

Examples::

    batchnorm reproduce fig1                      # embedded digits -> results/fig1/
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
    from .runner import EXPERIMENTS

    p = subparsers.add_parser(
        "reproduce",
        help="reproduce the batch-norm papers' claims (figures + report)",
        description="Train the experiments' small networks with and without batch norm and write metrics "
        "(JSON/CSV), PNG figures, report.md and a self-contained report.html. Experiments: "
        + ", ".join(EXPERIMENTS) + ". Finished experiments are reused (resume); --force recomputes.",
    )
    p.add_argument("name", choices=[*EXPERIMENTS, "all"], help="experiment to run, or all")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/NAME/)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the MNIST IDX files (.gz or plain); default: scikit-learn's embedded digits")
    p.add_argument("--download", action="store_true",
                   help="download MNIST into --data-dir from the usual mirrors and verify the checksums")
    p.add_argument("--fast", action="store_true", help="tiny settings (seconds; for tests, not for conclusions)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-experiment lines")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order (default 0)")
    p.add_argument("--force", action="store_true", help="recompute even if complete results exist")
    p.set_defaults(func=reproduce)


def reproduce(args: argparse.Namespace) -> int:
    """Entry point of ``batchnorm reproduce``; returns the exit status (2 on bad data or arguments)."""
    from .data import IDXError, load_dataset
    from .runner import EXPERIMENTS, Context, run_experiment, run_many

    try:
        data = load_dataset("mnist" if args.data_dir else "digits", args.data_dir, args.download, args.quiet)
    except (IDXError, ValueError, RuntimeError, ImportError) as err:
        print(f"batchnorm reproduce: {err}", file=sys.stderr)
        return 2
    if args.fast:
        data = data.subset(300, 200)
    ctx = Context(data=data, seed=args.seed, fast=args.fast, quiet=args.quiet)
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
