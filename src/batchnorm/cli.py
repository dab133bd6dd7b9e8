"""The ``batchnorm`` command line: ``batchnorm demo | reproduce | doctor | fold | recalibrate | bench``.

Each subpackage that has commands exposes ``add_subcommands(subparsers)``; they are
imported lazily so ``batchnorm --help`` stays fast and optional extras (matplotlib,
scikit-learn) are only needed by the commands that use them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: modules that contribute subcommands via ``add_subcommands(subparsers)``
_COMMAND_MODULES = (
    "batchnorm.demo",
    "batchnorm.experiments.cli",
    "batchnorm.tools.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch normalization for PyTorch: reproduce the papers' claims, diagnose and fold models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == name or name.startswith(err.name + ".")):
                continue  # that part of the package is not present in this build
            raise
        module.add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
