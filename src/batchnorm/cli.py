"""The ``batchnorm`` command line: ``batchnorm demo | reproduce | doctor | fold | recalibrate``.

Also ``python -m batchnorm ...`` (:mod:`batchnorm.__main__`). Each subpackage that has commands
exposes ``add_subcommands(subparsers)``; they are imported lazily so ``batchnorm --help`` stays
fast and optional extras (matplotlib, scikit-learn) are only needed by the commands that use them.

Exit status and errors, for every command: 0 on success; 2 on any failure, with exactly one line
``batchnorm COMMAND: error: ...`` on stderr and no traceback - a usage error, a :class:`CLIError`
(bad input the command recognised), a ``SystemExit`` with a message, or an unexpected exception
(shown as ``TypeName: message``; set ``BATCHNORM_TRACEBACK=1`` to get the traceback instead); 130
after Ctrl-C. :func:`main` *exits* with that status (``sys.exit``) when it reads the command line, so it
reaches the shell from the installed command, ``python -m batchnorm`` and
``python -c "from batchnorm.cli import main; main()"`` alike; :func:`run` returns it instead (for tests
and embedding), as does ``main(argv_list)``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn, Optional, Sequence  # noqa: F401

__all__ = ["CLIError", "build_parser", "dispatch", "execute", "main", "run"]

#: modules that contribute subcommands via ``add_subcommands(subparsers)``
_COMMAND_MODULES = (
    "batchnorm.demo",
    "batchnorm.experiments.cli",
    "batchnorm.tools.cli",
)


class CLIError(Exception):
    """A user error a command recognised: printed as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """``argparse`` with one-line usage errors (``PROG: error: MESSAGE (see PROG --help)``, exit 2)."""

    #: subcommand name -> its parser (for the "choose a command" error)
    commands: dict = {}

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        self.commands = action.choices
        return action

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``batchnorm`` parser with every available subcommand."""
    parser = Parser(
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


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return " ".join(lines)[:600] if lines else ""


#: options whose value may start with "-" (a shape such as -1,3,8,8 is then reported as invalid by the
#: command, not taken by argparse for an unknown option)
_DASH_VALUE_OPTIONS = ("--input-shape", "--synthetic")


def _attach_dash_values(argv: Sequence[str]) -> list:
    """``["--input-shape", "-1,3"]`` -> ``["--input-shape=-1,3"]``, so the command validates the value
    (also for an abbreviation argparse would accept, e.g. ``--input-sh``)."""
    out, items = [], list(argv)
    i = 0
    while i < len(items):
        tok = items[i]
        takes_value = tok.startswith("--") and len(tok) > 3 and any(o.startswith(tok) for o in _DASH_VALUE_OPTIONS)
        if takes_value and i + 1 < len(items) and items[i + 1][:1] == "-" and items[i + 1][1:2].isdigit():
            out.append(f"{items[i]}={items[i + 1]}")
            i += 2
            continue
        out.append(items[i])
        i += 1
    return out


def dispatch(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the chosen command; return its exit status (see the module docstring)."""
    argv = _attach_dash_values(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:  # --help/--version (0) or a usage error (2, already printed)
        return err.code if isinstance(err.code, int) else 2
    return execute(parser, args)


def execute(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the command ``args`` selects; every failure becomes one stderr line and status 2."""
    if not getattr(args, "func", None):
        commands = ", ".join(getattr(parser, "commands", None) or {})
        print(f"{parser.prog}: error: choose a command ({commands}); see {parser.prog} --help", file=sys.stderr)
        return 2
    where = f"{parser.prog} {args.command}"
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"{where}: error: {_one_line(err)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            return 0 if err.code is None else err.code
        print(f"{where}: error: {_one_line(err.code)}", file=sys.stderr)
    except Exception as err:
        if os.environ.get("BATCHNORM_TRACEBACK"):
            raise
        print(f"{where}: error: {type(err).__name__}: {_one_line(err)} (set BATCHNORM_TRACEBACK=1 for the traceback)",
              file=sys.stderr)  # fmt: skip
    return 2


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``batchnorm`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status (never exits)."""
    return dispatch(build_parser(), argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the installed ``batchnorm`` command and of ``python -m batchnorm``.

    Without ``argv`` (the command line) it **exits** with the status, so the status reaches the shell
    however it was started. With an ``argv`` list (programmatic use, as before) it returns the status,
    and a usage error raises ``SystemExit(2)`` as ``argparse`` does; :func:`run` never exits.
    """
    parser = build_parser()
    if argv is None:
        sys.exit(dispatch(parser, None))
    return execute(parser, parser.parse_args(_attach_dash_values(argv)))


if __name__ == "__main__":
    main()
