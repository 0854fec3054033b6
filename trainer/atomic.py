"""Atomic file writes: a reader (another rank, another role, a crash's survivor) sees either the old
file or the whole new one, never a part.

The recipe is the POSIX one: write a uniquely named temporary file in the same directory, fsync it,
`os.replace` it over the target, fsync the directory so the rename itself survives a power loss.
Unique names let several writers race on one target: the last rename wins, whole.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path | str) -> None:
    """Flush a directory's entries (renames, creations) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str, mode: int = 0o644) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success fsync it and `os.replace` it into place.

    On any exception the temporary file is removed and `path` is left as it was. `mode` is applied
    before the rename (mkstemp's 0600 would hide a shared cache from other users)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Replace `path` with `text` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
