"""Finding the checkpoint a run resumes from: complete steps, `latest`, and `checkpoint.resume`.

One set of rules for the runners (`Checkpointer.resolve`) and `plait-ckpt` (`find_step`):
`checkpoint.resume` may name a step directory or a directory of steps (its newest complete step),
and a job that Slurm requeued continues from its own newest step whatever `resume` names, since
resuming the named step again would repeat (and overwrite) the work done since.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from trainer.checkpoint.manifest import LATEST, MANIFEST, STEP_PREFIX, CheckpointError, read_manifest, step_number
from trainer.launch.preemption import requeued


def list_steps(directory: Path) -> list[Path]:
    """Complete checkpoints (with a manifest) in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(STEP_PREFIX) and (p / MANIFEST).exists())


def latest_step(directory: Path) -> Optional[Path]:
    """The step `latest` names if it is complete, else the newest complete one, else None."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.exists():
        candidate = directory / pointer.read_text().strip()
        if (candidate / MANIFEST).exists():
            return candidate
    found = list_steps(directory)
    return found[-1] if found else None


def find_step(path: str | Path) -> Path:
    """A step directory from a step path, or the newest complete step of a directory of steps."""
    p = Path(path)
    if (p / MANIFEST).exists() or not p.is_dir() or not any(c.name.startswith(STEP_PREFIX) for c in p.iterdir()):
        return p  # a step, complete or not (loading it names what is missing)
    found = latest_step(p)
    if found is None:
        raise CheckpointError(f"{p}: a directory of checkpoints, none of them complete (no {MANIFEST} in any "
                              f"{STEP_PREFIX}*: interrupted saves?)")
    return found


def effective_resume(resume: str) -> str:
    """`resume` as this process should apply it: `none` becomes `auto` in a requeued Slurm job."""
    return "auto" if resume == "none" and requeued() else resume


def step_of(path: Path) -> int:
    try:
        return int(read_manifest(path)["counters"]["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return step_number(path.name) or -1


def resolve(directory: Path, resume: str, announce: bool = True) -> Optional[Path]:
    """`none` → None; `latest` → newest (error if none); `auto` → newest or None; else the named
    step (or a directory's newest). A requeued Slurm job takes its own newest step instead of a
    named one when that is newer."""
    resume = effective_resume(resume)
    if resume == "none":
        return None
    if resume in ("latest", "auto"):
        found = latest_step(directory)
        if found is None and resume == "latest":
            raise CheckpointError(
                f"checkpoint.resume=latest but {directory} holds no complete checkpoint; "
                "use checkpoint.resume=auto to start fresh when there is none"
            )
        return found
    named = find_step(resume)
    if requeued():
        own = latest_step(directory)
        if own is not None and own.resolve() != named.resolve() and step_of(own) > step_of(named):
            if announce:
                print(f"plait: note: requeued job: resuming from its own newest checkpoint {own}, not "
                      f"checkpoint.resume={resume}", file=sys.stderr, flush=True)
            return own
    return named
