"""Every CLI failure is one line on stderr and exit status 2 - factories that fail at import or call,
bad files of every kind, bad numbers - and nothing is written. Exit codes reach the shell."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

from batchnorm.tools.cli import run

from .conftest import MODEL, one_line_error, run_fails, state_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --- the model factory ------------------------------------------------------------------------

IMPORT_FAILURES = [
    ("raise ImportError('needs torchvision')", "importing 'bnfault_{i}' failed: ImportError: needs torchvision"),
    ("import bnfault_no_such_dependency", "importing 'bnfault_{i}' failed: ModuleNotFoundError"),
    ("def broken(:\n    pass", "importing 'bnfault_{i}' failed: SyntaxError"),
    ("raise RuntimeError('CUDA not available')", "importing 'bnfault_{i}' failed: RuntimeError: CUDA not available"),
    ("import sys\nsys.exit(0)", "importing 'bnfault_{i}' called sys.exit(0)"),
    ("raise SystemExit('usage: train.py')", "importing 'bnfault_{i}' called sys.exit('usage: train.py')"),
]


@pytest.mark.parametrize("source,says", IMPORT_FAILURES, ids=["ImportError", "missing dependency", "SyntaxError",
                                                              "RuntimeError", "sys.exit(0)", "SystemExit(msg)"])
def test_factory_module_failing_at_import(source, says, tmp_path, capsys, monkeypatch, isolated_path):
    i = len(os.listdir(tmp_path)) + abs(hash(source)) % 10**6
    (tmp_path / f"bnfault_{i}.py").write_text(source + "\n\ndef make():\n    pass\n")
    monkeypatch.chdir(tmp_path)  # the current directory is importable, as with python -m
    out = tmp_path / "out.pt"
    run_fails(capsys, ["fold", f"bnfault_{i}:make", "--output", str(out)], says.format(i=i))
    assert not out.exists()


CALL_FAILURES = [
    ("tests.faults.factories:exits_zero", "exits_zero() called sys.exit(0) instead of returning a model"),
    ("tests.faults.factories:exits_with_message", "called sys.exit('factory gave up')"),
    ("tests.faults.factories:raises_key_error", "raises_key_error() raised KeyError: 'no such weights'"),
    ("tests.faults.factories:not_a_module", "returned dict, not a torch.nn.Module"),
    ("tests.faults.factories:NOT_CALLABLE", "is not callable"),
    ("tests.faults.factories:missing", "has no attribute 'missing'"),
    ("bnfault_no_such_module:make",
     "no module named 'bnfault_no_such_module' in the current directory or on PYTHONPATH"),
    ("no_colon", "model must be given as package.module:factory"),
    ("a:b:c", "model must be given as package.module:factory"),
]


@pytest.mark.parametrize("spec,says", CALL_FAILURES, ids=[c[0].split(":")[-1] for c in CALL_FAILURES])
@pytest.mark.parametrize("command", ["fold", "doctor", "recalibrate"])
def test_factory_failing_at_call(spec, says, command, tmp_path, capsys):
    out = tmp_path / "out.pt"
    extra = {"fold": ["--output", str(out)], "doctor": ["--input-shape", "2,3,8,8", "--json", str(out)],
             "recalibrate": ["--synthetic", "2,3,8,8", "--output", str(out)]}[command]  # fmt: skip
    run_fails(capsys, [command, spec] + extra, says)
    assert not out.exists()


# --- files that are read --------------------------------------------------------------------


class _Evil:  # a pickled object that weights_only loading must refuse
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad_file(kind, tmp_path):
    path = tmp_path / f"{kind.replace(' ', '_')}.pt"
    good = state_file(tmp_path, "good.pt")
    if kind == "missing":
        return str(path)
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever: must be refused before opening
    elif kind == "broken symlink":
        os.symlink(tmp_path / "nowhere.pt", path)
    elif kind == "truncated":
        path.write_bytes(open(good, "rb").read()[:200])
    elif kind == "garbage":
        path.write_bytes(b"not a torch file at all" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not a state_dict":
        torch.save([1, 2, 3], path)
    elif kind == "a TensorDataset":
        torch.save(TensorDataset(torch.randn(4, 3, 8, 8)), path)
    elif kind == "mismatched":
        torch.save({"0.weight": torch.zeros(1)}, path)
    elif kind == "pickled object":
        torch.save({"x": _Evil()}, path)
    return str(path)


BAD_STATE = [
    ("missing", "does not exist"),
    ("directory", "is a directory, not a file"),
    ("fifo", "is not a regular file"),
    ("broken symlink", "does not exist (a broken symlink)"),
    ("truncated", "not a complete torch.save file - truncated"),
    ("garbage", "not a complete torch.save file"),
    ("empty", "not a complete torch.save file"),
    ("not a state_dict", "is not a state_dict (a dict of parameter names to tensors); it holds a list"),
    ("a TensorDataset", "holds a pickled Python object (torch.utils.data.dataset.TensorDataset)"),
    ("mismatched", "does not match the model; missing: 1.weight"),
    ("pickled object", "holds a pickled Python object (posix.system)"),
]


@pytest.mark.parametrize("kind,says", BAD_STATE, ids=[b[0] for b in BAD_STATE])
@pytest.mark.parametrize("command", ["fold", "recalibrate"])
def test_bad_state_dict_exit_2_and_nothing_written(kind, says, command, tmp_path, capsys):
    bad = _bad_file(kind, tmp_path)
    out = tmp_path / "out.pt"
    out.write_bytes(b"previous contents")
    extra = ["--synthetic", "4,3,8,8", "--quiet"] if command == "recalibrate" else []
    run_fails(capsys, [command, MODEL, "--state-dict", bad, "--output", str(out)] + extra, says)
    assert out.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


BAD_DATA = [
    ("nan", lambda: torch.tensor(float("nan")) * torch.ones(8, 3, 8, 8), "contains NaN/Inf in 1536 of 1536 values"),
    ("inf", lambda: torch.randn(8, 3, 8, 8).index_fill_(0, torch.tensor([3]), float("inf")), "contains NaN/Inf in 192"),
    ("int", lambda: torch.ones(8, 3, 8, 8, dtype=torch.int32), "must hold a floating-point tensor"),
    ("1-D", lambda: torch.randn(8), "of shape (N, C, ...)"),
    ("dict", lambda: {"x": torch.randn(8, 3, 8, 8)}, "it holds a dict with 1 entries"),
    ("empty list", lambda: [], "it holds a list"),
    ("wrong channels", lambda: torch.randn(8, 5, 8, 8), "recalibration failed, nothing written"),
]


@pytest.mark.parametrize("name,make,says", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_recalibration_data(name, make, says, tmp_path, capsys):
    data, out = tmp_path / "d.pt", tmp_path / "o.pt"
    torch.save(make(), data)
    run_fails(capsys, ["recalibrate", MODEL, "--data", str(data), "--output", str(out), "--quiet"], says)
    assert not out.exists()


def test_bad_doctor_inputs(tmp_path, capsys):
    x = tmp_path / "x.pt"
    torch.save(torch.full((2, 3, 8, 8), float("nan")), x)
    run_fails(capsys, ["doctor", MODEL, "--input", str(x)], "contains NaN/Inf")
    torch.save(torch.randn(2, 5, 8, 8), x)
    run_fails(capsys, ["doctor", MODEL, "--input", str(x)], "the model failed on the example input")


# --- numbers ---------------------------------------------------------------------------------

SHAPES = [
    ("100000,3,224,224", "is 15,052,800,000 values (56.1 GiB); at most 268,435,456 (1 GiB)"),
    ("4,-3,8,8", "must be positive integers"),
    ("-1,3,8,8", "must be positive integers"),
    ("4", "must be positive integers"),
    ("four,3", "must be positive integers"),
]


@pytest.mark.parametrize("shape,says", SHAPES, ids=["huge", "negative", "leading negative", "one dim", "not a number"])
@pytest.mark.parametrize("option", ["doctor --input-shape", "recalibrate --synthetic", "fold --input-shape"])
def test_bad_shapes(shape, says, option, tmp_path, capsys):
    command, flag = option.split()
    extra = ["--output", str(tmp_path / "o.pt")] if command == "recalibrate" else []
    run_fails(capsys, [command, MODEL, flag, shape] + extra, says)


def test_num_batches_beyond_the_data_is_reported(tmp_path, capsys):
    data, out = tmp_path / "d.pt", tmp_path / "o.pt"
    torch.save(torch.randn(40, 3, 8, 8), data)
    assert run(["recalibrate", MODEL, "--data", str(data), "--batch-size", "16", "--num-batches", "10",
                "--output", str(out), "--quiet"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    warning = "warning: --num-batches 10 asks for more than the data holds (3 batch(es) of up to 16 samples"
    assert warning in captured.err
    assert "1: 1440 values per channel" in captured.out  # 40 samples x 6 x 6: all of the data


def test_non_positive_counts(tmp_path, capsys):
    run_fails(capsys, ["recalibrate", MODEL, "--synthetic", "2,3,8,8", "--num-batches", "0", "--output",
                       str(tmp_path / "o.pt")], "must be positive")  # fmt: skip


def test_no_command_is_one_line_naming_the_commands(capsys):
    assert run([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("batchnorm: error: choose a command (")
    assert "fold" in err[0] and "doctor" in err[0] and "--help" in err[0]


def test_usage_errors_are_one_line(capsys):
    assert run(["fold"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("batchnorm fold: error: the following arguments are required: model")


def test_unexpected_exceptions_are_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BATCHNORM_TRACEBACK", raising=False)
    run_fails(capsys, ["recalibrate", "tests.faults.factories:weird", "--synthetic", "2,3,8,8", "--output",
                       str(tmp_path / "o.pt"), "--quiet"], "LookupError: weird failure deep inside the model")  # fmt: skip
    assert not (tmp_path / "o.pt").exists()
    monkeypatch.setenv("BATCHNORM_TRACEBACK", "1")
    with pytest.raises(LookupError):
        run(["recalibrate", "tests.faults.factories:weird", "--synthetic", "2,3,8,8", "--output",
             str(tmp_path / "o.pt"), "--quiet"])  # fmt: skip


def test_fold_refuses_nan_and_negative_variance_checkpoints(tmp_path, capsys):
    from .factories import small

    for what, value in (("running_var", -1.0), ("running_mean", float("nan")), ("running_var", float("inf"))):
        sd = small().state_dict()
        sd[f"1.{what}"][0] = value
        path, out = tmp_path / "bad.pt", tmp_path / "folded.pt"
        torch.save(sd, path)
        line = run_fails(capsys, ["fold", MODEL, "--state-dict", str(path), "--output", str(out)],
                         "refusing to fold batch norms with unusable statistics - '1': ")  # fmt: skip
        assert "nothing written" in line and not out.exists()


# --- exit codes reach the shell ---------------------------------------------------------------


def _shell(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_exit_codes_propagate_through_every_entry_point(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "batchnorm")  # the installed command
    assert os.path.exists(script), "pip install -e . installs the batchnorm command next to python"
    bad = ["fold", "tests.faults.factories:raises_key_error"]
    main_reads_argv = "import sys; from batchnorm.cli import main; sys.argv[1:] = " + repr(bad) + "; main()"
    for argv in ([sys.executable, "-m", "batchnorm", *bad], [script, *bad], [sys.executable, "-c", main_reads_argv]):
        proc = _shell(argv, ROOT)
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "raised KeyError" in lines[0], proc.stderr
    assert _shell([sys.executable, "-m", "batchnorm", "--version"], ROOT).returncode == 0
    usage = _shell([sys.executable, "-m", "batchnorm", "fold"], ROOT)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_installed_command_imports_factories_from_the_current_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    """))
    script = os.path.join(os.path.dirname(sys.executable), "batchnorm")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([script, "fold", "mymodels:make"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 of 1 batch norm(s) folded" in proc.stdout


def test_main_exits_on_the_command_line_and_run_returns(capsys, monkeypatch):
    from batchnorm.cli import main

    monkeypatch.setattr(sys, "argv", ["batchnorm", "fold", "tests.faults.factories:raises_key_error"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    one_line_error(capsys, "fold")
    assert main(["fold", "tests.faults.factories:raises_key_error"]) == 2  # programmatic: returned
    one_line_error(capsys, "fold")
    assert run(["fold", MODEL]) == 0


def test_abbreviated_shape_option_with_a_leading_minus_reaches_the_shape_check(tmp_path, capsys):
    run_fails(capsys, ["doctor", MODEL, "--input-sh", "-1,3,8,8"], "must be positive integers")
