"""On-disk data cache: where it lives, stable short keys, and atomic writes that ranks can race on."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def cache_root(cache_dir: str = "") -> Path:
    """`cache_dir` if set, else $PLAIT_CACHE, else ~/.cache/plait."""
    root = cache_dir or os.environ.get("PLAIT_CACHE") or "~/.cache/plait"
    return Path(os.path.expanduser(root))


def short_hash(*parts: object) -> str:
    """16 hex digits of sha256 over `parts` (their str, NUL-separated): a cache key."""
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success fsync it and `os.replace` it into place.

    Readers (other ranks, a concurrent build) see either no file or the whole file, never a part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
