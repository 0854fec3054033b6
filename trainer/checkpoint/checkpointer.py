"""The one checkpoint format: a DCP directory plus a `plait.json` manifest written last.

    <dir>/step_000001200/   .metadata, *.distcp (torch.distributed.checkpoint), plait.json
    <dir>/latest            name of the newest complete step directory (moved last)

Saves go to `.tmp-step_*` and are renamed once every rank is done, so a crash at any moment leaves
the previous checkpoint loadable. Loads reshard (DCP) and refuse bad checkpoints before touching
any state.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from trainer.checkpoint.reader import ShardError, VerifiedReader, file_checksum
from trainer.launch.preemption import requeued

# DCP warns on every single-process save/load; that is a supported mode here, not an accident.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

FORMAT_VERSION = 1
WRITER_THREADS = 2  # files each rank writes, and reads back, in parallel (a second stream helps even on 2 cores)
MANIFEST = "plait.json"
LATEST = "latest"
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file or keys at fault."""


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:09d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("plait", "numpy", "transformers", "deepspeed", "flwr", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def read_manifest(path: Path) -> dict:
    """The manifest of a step directory, checked for presence and format version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path}: no {MANIFEST}; not a complete Plait checkpoint (an interrupted save?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({err})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: format_version {version!r} is not supported; this Plait reads version "
            f"{FORMAT_VERSION}"
        )
    return manifest


def verify(path: Path, checksums: bool = True) -> list[str]:
    """Problems found in a checkpoint's files (missing, wrong size, checksum mismatch); [] if sound."""
    path = Path(path)
    manifest = read_manifest(path)
    problems = []
    for name, info in manifest["files"].items():
        f = path / name
        if not f.exists():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != info["size"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, the manifest says {info['size']} (truncated?)")
        elif checksums and file_checksum(f) != info["checksum"]:
            problems.append(f"{f}: checksum mismatch (corrupted)")
    return problems


def tensor_shapes(path: Path, reader: Optional[dcp.FileSystemReader] = None) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor stored in a checkpoint, by flattened key."""
    meta = (reader or dcp.FileSystemReader(str(path))).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}


def stored_keys(path: Path) -> set[str]:
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def effective_resume(resume: str) -> str:
    """`resume` as this process should apply it: `none` becomes `auto` in a requeued Slurm job."""
    return "auto" if resume == "none" and requeued() else resume


class Checkpointer:
    """Save, find and load checkpoints of a run.

    `group` carries DCP's collectives (with async saves they run in a background thread, so it must
    be a group nothing else uses); barriers between ranks use the default group, from the main
    thread only.
    """

    def __init__(self, directory: str, keep_last: int = 3, meta: Optional[dict] = None,
                 group: Optional[dist.ProcessGroup] = None, async_save: bool = False):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.meta = meta or {}
        self.group = group
        self.async_save = async_save
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self._pending: Optional[tuple] = None  # (future, tmp, final, step, keys, counters, start)
        self._stager: Optional[DefaultStager] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._swept = False  # a crash's leftovers removed (at the first save)

    # ---- finding --------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Complete checkpoints (with a manifest), oldest first."""
        if not self.dir.is_dir():
            return []
        steps = [p for p in self.dir.iterdir() if p.name.startswith(STEP_PREFIX) and (p / MANIFEST).exists()]
        return sorted(steps)

    def latest(self) -> Optional[Path]:
        pointer = self.dir / LATEST
        if pointer.exists():
            candidate = self.dir / pointer.read_text().strip()
            if (candidate / MANIFEST).exists():
                return candidate
        found = self.list()
        return found[-1] if found else None

    def resolve(self, resume: str) -> Optional[Path]:
        """`none` → None; `latest` → newest (error if none); `auto` → newest or None; else a path.
        A job Slurm requeued continues from its own checkpoint whatever `resume` says."""
        resume = effective_resume(resume)
        if resume == "none":
            return None
        if resume in ("latest", "auto"):
            found = self.latest()
            if found is None and resume == "latest":
                raise CheckpointError(
                    f"checkpoint.resume=latest but {self.dir} holds no complete checkpoint; "
                    "use checkpoint.resume=auto to start fresh when there is none"
                )
            return found
        return Path(resume)

    # ---- saving ---------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def save(self, step: int, components: dict[str, Stateful], counters: Optional[dict] = None) -> Path:
        """Write a checkpoint of `components` at `step`. With async_save the state is staged to CPU
        memory and written in the background; it is made visible (manifest, rename, `latest`) as
        soon as it is written (one process), or at the first `poll()`, `wait()` or `save()` after
        that, once every rank has written (several ranks)."""
        self.wait()
        final = self.dir / step_dirname(step)
        tmp = self.dir / f".tmp-{final.name}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            # A crash leaves .tmp-* and .trash-*; later .trash-* are this process's own, being
            # deleted by the background thread, which the loop must not wait for (or race).
            stale = [*self.dir.glob(".tmp-*"), *([] if self._swept else self.dir.glob(".trash-*"))]
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
            self._swept = True
            tmp.mkdir()
        self._barrier()
        start = time.perf_counter()
        # A background write takes one thread: with two, the writers and the training thread
        # contend for the cores and the training steps slow down (bench/checkpoint.py).
        writer = dcp.FileSystemWriter(str(tmp), thread_count=1 if self.async_save else WRITER_THREADS)
        job = (tmp, final, step, sorted(components), counters or {}, start)
        if self.async_save:
            written = dcp.async_save(dict(components), storage_writer=writer, process_group=self.group,
                                     async_stager=self._staging())
            self._pending = (self._background().submit(self._after_write, written, job), *job)
        else:
            dcp.save(dict(components), storage_writer=writer, process_group=self.group)
            self._complete(self._own_files(tmp), *job)
        return final

    def _own_files(self, tmp: Path) -> dict[str, dict]:
        """Size and checksum of the shard files this rank wrote (DCP names them `__<rank>_*`):
        every rank hashes its own, in parallel, instead of rank 0 hashing them all."""
        return {f.name: {"size": f.stat().st_size, "checksum": file_checksum(f)}
                for f in sorted(tmp.glob(f"__{self.rank}_*")) if f.is_file()}

    def _after_write(self, written, job: tuple) -> Optional[dict[str, dict]]:
        """In the background, once DCP has written: hash this rank's files. A single process has no
        ranks to agree with, so it also publishes the checkpoint from here; ranks hand their
        hashes to `_complete` at the next step boundary."""
        written.result()
        files = self._own_files(job[0])
        if self.distributed:
            return files
        self._complete(files, *job)
        return None

    def _background(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="plait-ckpt")
        return self._executor

    def _staging(self) -> DefaultStager:
        """The stager of async saves, kept across saves: its host buffers are allocated (and pinned,
        with a GPU) once and refilled by later saves, instead of a fresh copy of the state each
        time. Only one save is in flight at a time, so reusing them is safe."""
        if self._stager is None:
            gpu = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=gpu, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=gpu))
        return self._stager

    def close(self) -> None:
        """Finish a background save and release the async staging buffers and thread."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _complete(self, files: dict, tmp: Path, final: Path, step: int, keys: list, counters: dict,
                  start: float) -> None:
        if self.distributed:  # also the point where every rank has finished writing
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, files)
            files = {name: info for part in gathered for name, info in part.items()}
        if self.rank == 0:
            self._finalize(tmp, final, step, keys, counters, time.perf_counter() - start, files)
        self._barrier()

    def poll(self) -> Optional[Path]:
        """At a step boundary: complete a finished background save (ranks agree before acting)."""
        if self._pending is None:
            return None
        done = torch.tensor([int(self._pending[0].done())])
        if self.distributed:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.wait() if done.item() else None

    def wait(self) -> Optional[Path]:
        """Block until a background save is written, then complete it; returns its path."""
        if self._pending is None:
            return None
        future, *job = self._pending
        self._pending = None
        files = future.result()
        if self.distributed:
            self._complete(files, *job)
        return job[1]

    def _finalize(self, tmp: Path, final: Path, step: int, keys: list, counters: dict,
                  seconds: float, hashed: dict) -> None:
        files = {f.name: hashed.get(f.name) or {"size": f.stat().st_size, "checksum": file_checksum(f)}
                 for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counters": {"step": step, **counters},
            "components": keys,
            "files": files,
            "save_seconds": round(seconds, 3),
            "versions": package_versions(),
            "argv": sys.argv,
            **self.meta,
        }
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            self._discard(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        _write_atomic(self.dir / LATEST, final.name + "\n")
        self._prune()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.list()[: -self.keep_last]:
            self._discard(old)

    def _discard(self, path: Path) -> None:
        """Rename out of sight first, so a crash mid-delete never leaves a half checkpoint that
        still looks complete."""
        trash = path.with_name(f".trash-{path.name}-{time.time_ns()}")
        os.replace(path, trash)
        # Deleting hundreds of MB takes a while: the training loop need not wait for it.
        self._background().submit(shutil.rmtree, trash, ignore_errors=True)

    # ---- loading --------------------------------------------------------------------------
    def load(self, path: Path, components: dict[str, Stateful], check_checksums: bool = True) -> dict:
        """Load `components` from `path` (any layout); returns the manifest. Everything is checked
        before any state changes: files, checksums, component keys, tensor shapes."""
        path = Path(path)
        manifest = read_manifest(path)
        problems = verify(path, checksums=False)  # sizes here; checksums as the reader maps each file
        if problems:
            raise CheckpointError("refusing to load a damaged checkpoint:\n  " + "\n  ".join(problems))
        missing = sorted(set(components) - set(manifest["components"]))
        if missing:
            raise CheckpointError(
                f"{path}: has no component(s) {', '.join(missing)}; it holds {', '.join(manifest['components'])}"
            )
        reader = VerifiedReader(path, _checksums(manifest) if check_checksums else None, self.group,
                                threads=WRITER_THREADS)
        shapes = tensor_shapes(path, reader)
        # Each component's state dict is taken once: checked here, filled in place by DCP, then
        # handed back to the component (what dcp.load does for Stateful objects).
        wanted = {name: comp.state_dict() for name, comp in components.items()}
        mismatched = [
            f"{key}: checkpoint {shapes[key]} vs run {tuple(t.shape)}"
            for key, t in _flat_tensors(wanted).items()
            if key in shapes and tuple(shapes[key]) != tuple(t.shape)
        ]
        absent = [k for k in _flat_tensors(wanted) if k not in shapes]
        if mismatched or absent:
            lines = mismatched[:20] + [f"{k}: not in the checkpoint" for k in absent[:20]]
            raise CheckpointError(
                f"{path} does not fit this run's state ({len(mismatched)} shape mismatch(es), "
                f"{len(absent)} missing key(s)); is the model config the one it was saved with?\n  "
                + "\n  ".join(lines)
            )
        try:
            dcp.load(wanted, storage_reader=reader, process_group=self.group)
        except CheckpointException as err:
            raise _first_shard_error(err) or err
        except ShardError as err:
            raise CheckpointError(str(err)) from None
        for name, comp in components.items():
            comp.load_state_dict(wanted[name])
        return manifest


def _checksums(manifest: dict) -> dict[str, str]:
    return {name: info["checksum"] for name, info in manifest["files"].items()}


def _first_shard_error(err: CheckpointException) -> Optional[CheckpointError]:
    """The verification failure inside DCP's gathered per-rank failures, as a CheckpointError;
    the one that names files first, so that every rank reports what is wrong."""
    found = [exc for exc, _ in err.failures.values() if isinstance(exc, ShardError)]
    found.sort(key=lambda exc: not exc.problems)
    return CheckpointError(str(found[0])) if found else None


def _flat_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten nested dicts of tensors to DCP's dotted keys (lists are left to DCP)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat_tensors(v, f"{prefix}{k}."))
    elif isinstance(tree, torch.Tensor):
        out[prefix[:-1]] = tree
    return out
