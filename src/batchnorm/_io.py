"""File output shared by the commands: every file is written whole or not at all, and only over a regular file.

:func:`atomic_write` guarantees, for ``path``:

- **whole or nothing**: the content goes to a temporary file next to the destination, is flushed
  and ``fsync``-ed, then ``os.replace``-d over it (and the folder is ``fsync``-ed); a reader sees
  the old file or the new one, never a mix. On any error, or an interrupt, the temporary file is
  removed and the destination is left as it was.
- **only regular files are replaced**: an existing destination that is a directory, FIFO,
  character/block device or socket is refused with :class:`OutputError` and left untouched
  (so ``/dev/null`` is never swapped for a file, even as root).
- **symlinks are written through**: a symlink (also a chain, or one whose target does not exist
  yet) stays a symlink and its final target gets the new content, subject to the rule above
  (a link to a FIFO is refused).
- **permissions**: a new file gets ``0o666 & ~umask`` (``0644`` under umask 022), as ``open()``
  would give it; replacing an existing file keeps that file's permission bits.
- **no litter**: temporary files are named ``.<name>.<pid>.<random>.tmp``; a write removes the
  ones for the same destination left by processes that no longer exist (a killed earlier run).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["atomic_write", "OutputError", "resolve_output", "stale_temp_files", "umask"]


class OutputError(OSError):
    """An output path that must not be written (not a regular file, missing folder, symlink loop, ...).

    ``str(err)`` is the message alone; ``err.errno`` says which condition (e.g. ``errno.EEXIST``).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return str(self.args[0])


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolve_output(path) -> Path:
    """Where writing ``path`` lands: ``path`` itself, or the final target of a symlink.

    Raises :class:`OutputError` if that exists and is not a regular file, or the link cannot be
    resolved (a loop). A missing target is fine (it will be created).

    Example::

        >>> resolve_output("results/out.pt")          # PosixPath('results/out.pt')
    """
    p = Path(path)
    target = Path(os.path.realpath(p)) if p.is_symlink() else p
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutputError(errno.ELOOP, f"output {str(path)!r} is a symlink loop") from err
        if err.errno == errno.ENOTDIR:
            msg = f"cannot write {str(path)!r}: a folder on its path is not a directory"
            raise OutputError(errno.ENOTDIR, msg) from err
        raise OutputError(err.errno, f"cannot inspect output {str(path)!r}: {err.strerror}") from err
    if not stat.S_ISREG(st.st_mode):
        via = f" (the target of symlink {str(path)!r})" if target != p else ""
        raise OutputError(
            errno.EEXIST,
            f"output {str(target)!r}{via} is {_kind(st.st_mode)}, not a regular file; refusing to replace it - "
            f"give a file path",
        )
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_temp_files(target: Path) -> list:
    """Temporary files for ``target`` left by processes that no longer exist (POSIX only; else ``[]``)."""
    if os.name != "posix":
        return []
    prefix, out = f".{target.name}.", []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for e in entries:
        if not (e.name.startswith(prefix) and e.name.endswith(".tmp")):
            continue
        parts = e.name[len(prefix) : -len(".tmp")].split(".")
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) != os.getpid() and not _pid_alive(int(parts[0])):
            out.append(Path(e.path))
    return out


def atomic_write(path, data: Union[bytes, Callable[[BinaryIO], object]], *, make_dirs: bool = True) -> Path:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path`` atomically.

    See the module docstring for the guarantees. ``make_dirs`` creates a missing folder (not for a
    symlink's target); without it a missing folder is an :class:`OutputError`. Returns the path
    actually written (the symlink's target for a symlink).

    Raises :class:`OutputError` (an ``OSError``) for an output that must not be replaced, and the
    ``OSError`` of the failing call when the folder is not writable; ``path`` is unchanged then.

    Example::

        >>> atomic_write("out/report.json", b"{}")
        >>> atomic_write("out/model.pt", lambda f: torch.save(model.state_dict(), f))
    """
    target = resolve_output(path)
    parent = target.parent
    if not parent.is_dir():
        if parent.exists():
            raise OutputError(errno.ENOTDIR, f"cannot write {str(path)!r}: {str(parent)!r} is not a directory")
        if not make_dirs or target != Path(path):
            raise OutputError(errno.ENOENT, f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
        parent.mkdir(parents=True, exist_ok=True)
    for old in stale_temp_files(target):
        try:
            old.unlink()
        except OSError:
            pass
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode) & 0o777  # permission bits, no setuid/setgid/sticky
    except FileNotFoundError:
        mode = 0o666 & ~umask()
    tmp = parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if os.name == "posix":
        try:
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    return target
