"""Making a step visible atomically, when one group saved it or when several roles did.

One group: its files go to `.tmp-step_X/`; its rank 0 writes the manifest there, renames the
directory to `step_X/` and moves `latest`.

Several roles (an RLHF actor group, a critic group, a driver), which share no collective: each
writes its DCP files to `.tmp-step_X/<role>/`, then its group rank 0 writes a completion record
`.tmp-step_X/<role>.part.json` (atomically) and looks for every expected role's record. Whoever
sees all of them claims the step by renaming `.tmp-step_X` to a name of its own: a rename of one
source succeeds once, so exactly one role commits even when two finish together. The claimer
writes the manifest, renames the claimed directory to `step_X/` and moves `latest`. Until then no
`step_X/plait.json` exists, so a crash of any role at any moment leaves the previous step the
newest complete one. Records carry an attempt token: a record left by a crashed earlier attempt
of the run never completes a step of the current one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from trainer.atomic import fsync_dir, write_text_atomic
from trainer.checkpoint.manifest import LATEST, MANIFEST, build_manifest, step_number

PART_SUFFIX = ".part.json"


def tmp_dir_of(final: Path) -> Path:
    return final.with_name(f".tmp-{final.name}")


def part_path(tmp: Path, role: str) -> Path:
    return tmp / f"{role}{PART_SUFFIX}"


def write_part(tmp: Path, role: str, part: dict) -> None:
    write_text_atomic(part_path(tmp, role), json.dumps(part, indent=2, default=str))


def _read_part(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # not written yet (or being claimed right now)


def publish(staged: Path, final: Path, manifest: dict, discard: Callable[[Path], None]) -> None:
    """Manifest into `staged`, `staged` renamed to `final`, then `latest` moved: in that order."""
    write_text_atomic(staged / MANIFEST, json.dumps(manifest, indent=2, default=str))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        discard(final)
    os.replace(staged, final)
    fsync_dir(final.parent)
    write_text_atomic(final.parent / LATEST, final.name + "\n")


def try_commit(final: Path, step: int, roles: tuple[str, ...], attempt: str,
               discard: Callable[[Path], None]) -> bool:
    """Commit `final`'s step if every role in `roles` has recorded its part in this attempt;
    False when some role has not (its own commit will do it) or another role got there first."""
    tmp = tmp_dir_of(final)
    parts = {}
    for role in roles:
        part = _read_part(part_path(tmp, role))
        if part is None or part.get("attempt") != attempt:
            return False
        parts[role] = part
    claim = final.with_name(f".commit-{final.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(tmp, claim)
    except FileNotFoundError:
        return False  # another role claimed it
    for role in roles:
        part_path(claim, role).unlink()
    publish(claim, final, build_manifest(step, parts), discard)
    return True


def sweep(directory: Path, step: int, role: Optional[str], first: bool, latest_step: Optional[int]) -> None:
    """Remove what crashed or abandoned saves left, before saving `step`.

    A role-less checkpointer owns the directory: every `.tmp-*` is its own. A role removes only
    what cannot belong to a save in flight: at its first save its own leftovers of an earlier
    process, and any other temporary step older than both `step` and the newest complete step."""
    if role is None:
        stale = [*directory.glob(".tmp-*"), *directory.glob(".commit-*")]
    else:
        stale = []
        for path in [*directory.glob(".tmp-*"), *directory.glob(".commit-*")]:
            n = step_number(path.name)
            if n is not None and latest_step is not None and n < step and n <= latest_step:
                stale.append(path)
            elif first and path.name.startswith(".tmp-"):
                stale += [path / role, part_path(path, role)]
    if first:
        # A crash leaves .trash-* (later ones are this process's own, being deleted in the
        # background, which a save must not wait for or race) and half-written `latest`s.
        stale += [*directory.glob(".trash-*"), *directory.glob(f".{LATEST}.*.tmp")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
