"""Output files under faults: special files, symlinks, permissions, interrupted writes, stale temporaries.

Both the helper (batchnorm._io.atomic_write, also used by the experiments) and the commands' --output.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from batchnorm._io import OutputError, atomic_write, stale_temp_files

from .conftest import MODEL, one_line_error, run_fails

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _temps(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _special(kind, tmp_path):
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    return path


@pytest.mark.parametrize(
    "kind,says", [("fifo", r"a FIFO \(named pipe\)"), ("directory", "a directory"), ("socket", "a socket")]
)
def test_special_files_are_refused_and_left_alone(kind, says, tmp_path):
    path = _special(kind, tmp_path)
    before = os.lstat(path)
    with pytest.raises(OutputError, match=f"is {says}, not a regular file; refusing to replace it"):
        atomic_write(path, b"data")
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode) and _temps(tmp_path) == []


def test_device_node_is_refused():
    before = os.stat("/dev/null")
    with pytest.raises(OutputError, match="is a character device"):
        atomic_write("/dev/null", b"data")  # as root this used to replace /dev/null by a file
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_ino == before.st_ino


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "/dev/null", "symlink to fifo"])
def test_cli_refuses_special_outputs_with_exit_2(kind, tmp_path, capsys):
    if kind == "/dev/null":
        path = "/dev/null"
    elif kind == "symlink to fifo":
        path = tmp_path / "link"
        os.symlink(_special("fifo", tmp_path), path)
    else:
        path = _special(kind, tmp_path)
    before = os.lstat(path)
    run_fails(capsys, ["fold", MODEL, "--output", str(path)], "not a regular file; refusing to replace it",
              no_output=True)  # fmt: skip
    assert os.lstat(path).st_ino == before.st_ino and os.lstat(path).st_mode == before.st_mode


def test_symlink_is_written_through_and_stays_a_link(tmp_path):
    target = tmp_path / "real" / "out.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    os.symlink(target, link)
    chain = tmp_path / "chain.bin"
    os.symlink(link, chain)
    assert atomic_write(chain, b"new") == target
    assert os.path.islink(link) and os.path.islink(chain) and target.read_bytes() == b"new"
    assert _temps(target.parent) == [] and _temps(tmp_path) == []


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.bin"
    os.symlink(tmp_path / "target.bin", link)
    atomic_write(link, b"x")
    assert os.path.islink(link) and (tmp_path / "target.bin").read_bytes() == b"x"


def test_symlink_loop_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(OutputError, match="symlink loop"):
        atomic_write(a, b"x")
    assert os.path.islink(a) and os.path.islink(b)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask(mask, mode, tmp_path):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "f.bin", b"x")
        plain = tmp_path / "plain.bin"
        with open(plain, "wb"):
            pass  # what open() gives under the same umask
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.bin").st_mode) == mode == stat.S_IMODE(os.stat(plain).st_mode)


def test_replacing_keeps_the_files_permissions(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    atomic_write(path, b"new")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and path.read_bytes() == b"new"


def test_cli_outputs_get_the_umask(tmp_path):
    """Through the command (a fresh process, umask 022): 0644 for --output and --json, not 0600."""
    out, js = tmp_path / "o.pt", tmp_path / "o.json"
    argv = ["fold", MODEL, "--output", str(out), "--json", str(js)]
    code = f"import os; os.umask(0o022); from batchnorm.cli import main; raise SystemExit(main({argv!r}))"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644 and stat.S_IMODE(os.stat(js).st_mode) == 0o644


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def half(f):
        f.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old" and _temps(tmp_path) == []


def test_interrupt_while_writing_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"old" and _temps(tmp_path) == []


def test_temporaries_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    """SIGKILL a process in the middle of a write: its temporary stays; the next write removes it."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    script = textwrap.dedent(f"""
        import time
        from batchnorm._io import atomic_write
        def slow(f):
            f.write(b"partial"); f.flush(); print("writing", flush=True); time.sleep(60)
        atomic_write({str(path)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert path.read_bytes() == b"old"
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".f.bin.{proc.pid}.")
    assert [p.name for p in stale_temp_files(path)] == left
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and _temps(tmp_path) == []


def test_temporaries_of_live_writers_are_kept(tmp_path):
    path = tmp_path / "f.bin"
    live = tmp_path / f".f.bin.{os.getppid()}.abcd1234.tmp"  # the parent process is alive
    live.write_bytes(b"someone else's write in progress")
    other = tmp_path / ".g.bin.999999.abcd1234.tmp"  # another destination's
    other.write_bytes(b"x")
    atomic_write(path, b"new")
    assert live.exists() and other.exists()


def test_missing_folder_without_make_dirs_is_refused(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        atomic_write(tmp_path / "no" / "f.bin", b"x", make_dirs=False)
    assert not (tmp_path / "no").exists()
    atomic_write(tmp_path / "yes" / "f.bin", b"x")  # the experiments' default: create it
    assert (tmp_path / "yes" / "f.bin").read_bytes() == b"x"


@pytest.mark.parametrize(
    "output,says",
    [("missing/out.pt", "does not exist"), ("/proc/batchnorm-fault-test.pt", "no file can be created in folder '/proc'"),
     ("file.pt/out.pt", "is not a directory")],
    ids=["missing folder", "under /proc", "folder is a file"],
)  # fmt: skip
def test_cli_unwritable_outputs(output, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.pt").write_bytes(b"")
    run_fails(capsys, ["fold", MODEL, "--output", output], says, no_output=True)  # refused before any work
    assert not os.path.exists("/proc/batchnorm-fault-test.pt") and _temps(tmp_path) == []


def test_cli_refuses_the_same_output_twice(tmp_path, capsys):
    out = str(tmp_path / "o.json")
    run_fails(capsys, ["fold", MODEL, "--output", out, "--json", out], "name the same file twice")
    assert not os.path.exists(out)


def test_cli_writes_through_a_symlink(tmp_path, capsys):
    target = tmp_path / "target.pt"
    target.write_bytes(b"old")
    os.symlink(target, tmp_path / "link.pt")
    from batchnorm.tools.cli import run

    assert run(["fold", MODEL, "--output", str(tmp_path / "link.pt")]) == 0
    assert os.path.islink(tmp_path / "link.pt") and isinstance(torch.load(target, weights_only=True), dict)
    capsys.readouterr()


def test_one_line_helper_rejects_tracebacks(capsys):
    """The helper the other tests rely on does fail on a traceback (a check that can fail)."""
    import sys as _sys

    print("batchnorm fold: error: x\nTraceback (most recent call last):", file=_sys.stderr)
    with pytest.raises(AssertionError):
        one_line_error(capsys, "fold")
