"""Shared fixtures of the fault-injection tests: a tiny model factory module and one-line-error checks."""

from __future__ import annotations

import sys

import pytest
import torch

from batchnorm.tools.cli import run

MODEL = "tests.faults.factories:small"


@pytest.fixture
def isolated_path(monkeypatch):
    """Restore sys.path and sys.modules' user modules after a test that imports factories from tmp dirs."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("bnfault_"):
            del sys.modules[name]


def one_line_error(capsys, command: str, no_output: bool = False) -> str:
    """The stderr of a failed command: exactly one line, ``batchnorm COMMAND: error: ...``, no traceback
    (and, with ``no_output``, nothing on stdout: refused before any work)."""
    captured = capsys.readouterr()
    err = captured.err
    if no_output:
        assert captured.out == "", captured.out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"batchnorm {command}: error: "), err
    assert "Traceback" not in err, err
    return errors[0]


def run_fails(capsys, argv, match: str, no_output: bool = False) -> str:
    """``run(argv)`` exits 2 with one error line containing ``match``."""
    assert run(argv) == 2
    line = one_line_error(capsys, argv[0], no_output)
    assert match in line, line
    return line


def state_file(tmp_path, name="sd.pt"):
    from .factories import small

    path = tmp_path / name
    torch.save(small().state_dict(), path)
    return str(path)
