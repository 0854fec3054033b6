"""On-disk data cache: where it lives, stable short keys, and atomic writes that ranks can race on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from trainer.atomic import atomic_path  # noqa: F401  (the cache's writers use it from here)


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
