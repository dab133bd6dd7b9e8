"""File output shared by the commands: every file is written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union


def atomic_write(path, data: Union[bytes, Callable[[BinaryIO], object]]) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path`` atomically.

    The content goes to a temporary file in the same folder (created if missing), is
    flushed to disk, then ``os.replace``-d over ``path``; on any error the temporary file
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
