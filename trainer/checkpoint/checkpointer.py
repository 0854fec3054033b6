"""Saving and loading checkpoints of a run: DCP shards plus a manifest written last, on any group.

    <dir>/step_000001200/   .metadata, *.distcp (torch.distributed.checkpoint), plait.json
    <dir>/latest            name of the newest complete step directory (moved last)

Saves go to `.tmp-step_*` and are renamed once every rank is done, so a crash at any moment leaves
the previous checkpoint loadable. A Checkpointer works on any process group: DCP names files by
rank within that group, and its barriers and agreement run on (a gloo copy of) that group. Several
roles, each its own group, save their components into one step with `role=` and `roles=` (see
`trainer/checkpoint/commit.py`). Loads reshard (DCP) and refuse bad checkpoints before touching
any state.
"""

from __future__ import annotations

import os
import shutil
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

from trainer.checkpoint import finding
from trainer.checkpoint.commit import part_path, publish, sweep, tmp_dir_of, try_commit, write_part
from trainer.checkpoint.groups import agreement_group, group_rank, group_size
from trainer.checkpoint.manifest import (CheckpointError, build_manifest, check_meta, check_role, read_manifest,
                                         role_part, role_root, step_dirname, stored_keys, tensor_shapes, verify)
from trainer.checkpoint.reader import ShardError, VerifiedReader, file_checksum

# DCP warns on every single-process save/load; that is a supported mode here, not an accident.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

WRITER_THREADS = 2  # files each rank writes, and reads back, in parallel (a second stream helps even on 2 cores)


def default_attempt() -> str:
    """What tells this attempt of a multi-role run from a crashed earlier one, when the caller does
    not say: $PLAIT_ATTEMPT, else the Slurm job and its restart count, else nothing."""
    if os.environ.get("PLAIT_ATTEMPT"):
        return os.environ["PLAIT_ATTEMPT"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return ""


class Checkpointer:
    """Save, find and load checkpoints of a run, on the ranks of `group` (default: all).

    `group` carries DCP's collectives (with async saves they run in a background thread, so it
    must be a group nothing else uses); barriers and agreement run on a gloo group over the same
    ranks, from the main thread only. Rank 0 of `group` publishes.

    Multi-role steps: each role's ranks construct `Checkpointer(dir, role="actor", roles=("actor",
    "critic", "driver"), group=actor_group)` and call `save(step, components)`; the step becomes
    visible (and `latest` moves) only once every role in `roles` has saved it. `attempt` must be
    the same for all roles of one run attempt and differ from a crashed attempt's (a driver passes
    e.g. a uuid made at start); see `default_attempt`.
    """

    def __init__(self, directory: str, keep_last: int = 3, meta: Optional[dict] = None,
                 group: Optional[dist.ProcessGroup] = None, async_save: bool = False,
                 role: Optional[str] = None, roles: Optional[tuple[str, ...]] = None,
                 attempt: Optional[str] = None):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.meta = dict(meta or {})
        check_meta(self.meta)
        self.role = None if role is None else check_role(role)
        self.roles = tuple(sorted({*(roles or ()), *([role] if role else [])}))
        for r in self.roles:
            check_role(r)
        if self.roles and self.role is None:
            raise CheckpointError(f"Checkpointer(roles={self.roles}) needs role=: which of them this group saves")
        self.attempt = default_attempt() if attempt is None else attempt
        self.group = group
        self.async_save = async_save
        self.distributed = dist.is_initialized()
        self.rank = group_rank(group)  # within `group`: DCP names files, and rank 0 publishes, by it
        self.world_size = group_size(group)
        self._agree: Any = False  # the agreement group, made at the first collective (False: not yet)
        self._pending: Optional[tuple] = None  # (future, tmp, final, step, keys, counters, start)
        self._stager: Optional[DefaultStager] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._swept = False  # a crash's leftovers removed (at the first save)

    # ---- finding --------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Complete checkpoints (with a manifest), oldest first."""
        return finding.list_steps(self.dir)

    def latest(self) -> Optional[Path]:
        return finding.latest_step(self.dir)

    def resolve(self, resume: str) -> Optional[Path]:
        """`none` → None; `latest` → newest (error if none); `auto` → newest or None; a directory of
        steps → its newest; else a step path. A job Slurm requeued continues from its own newest
        checkpoint whatever `resume` says (see `finding.resolve`)."""
        return finding.resolve(self.dir, resume, announce=self.rank == 0)

    # ---- collectives ----------------------------------------------------------------------
    def _agreement(self) -> Optional[dist.ProcessGroup]:
        """The gloo group for barriers, CPU-tensor reductions and object gathers (made once, at a
        point every rank of the group reaches: a save, a load, a poll)."""
        if self._agree is False:
            self._agree = agreement_group(self.group, self.async_save) if self.distributed else None
        return self._agree

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._agreement())

    # ---- saving ---------------------------------------------------------------------------
    def save(self, step: int, components: dict[str, Stateful], counters: Optional[dict] = None) -> Path:
        """Write a checkpoint of `components` at `step`. With async_save the state is staged to CPU
        memory and written in the background; it is made visible (manifest, rename, `latest`) as
        soon as it is written (one process), or at the first `poll()`, `wait()` or `save()` after
        that, once every rank has written (several ranks). With roles, it becomes visible when the
        last role's save of `step` completes."""
        self.wait()
        self._agreement()
        final = self.dir / step_dirname(step)
        tmp = tmp_dir_of(final)
        target = tmp if self.role is None else tmp / self.role  # where this group's DCP files go
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            latest = self.latest() if self.role is not None else None  # only roles sweep by it
            sweep(self.dir, step, self.role, first=not self._swept,
                  latest_step=None if latest is None else finding.step_of(latest))
            self._swept = True
            if self.role is not None:  # this role's own earlier try at this step, if any
                shutil.rmtree(target, ignore_errors=True)
                part_path(tmp, self.role).unlink(missing_ok=True)
            target.mkdir(parents=True)
        self._barrier()
        start = time.perf_counter()
        # A background write takes one thread: with two, the writers and the training thread
        # contend for the cores and the training steps slow down (bench/checkpoint.py).
        writer = dcp.FileSystemWriter(str(target), thread_count=1 if self.async_save else WRITER_THREADS)
        job = (target, final, step, sorted(components), counters or {}, start)
        if self.async_save:
            written = dcp.async_save(dict(components), storage_writer=writer, process_group=self.group,
                                     async_stager=self._staging())
            self._pending = (self._background().submit(self._after_write, written, job), *job)
        else:
            dcp.save(dict(components), storage_writer=writer, process_group=self.group)
            self._complete(self._own_files(target), *job)
        return final

    def _own_files(self, target: Path) -> dict[str, dict]:
        """Size and checksum of the shard files this rank wrote (DCP names them `__<group rank>_*`):
        every rank hashes its own, in parallel, instead of rank 0 hashing them all."""
        return {f.name: {"size": f.stat().st_size, "checksum": file_checksum(f)}
                for f in sorted(target.glob(f"__{self.rank}_*")) if f.is_file()}

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

    def _complete(self, files: dict, target: Path, final: Path, step: int, keys: list, counters: dict,
                  start: float) -> None:
        if self.distributed:  # also the point where every rank of the group has finished writing
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, files, group=self._agreement())
            files = {name: info for part in gathered for name, info in part.items()}
        if self.rank == 0:
            self._finalize(target, final, step, keys, counters, time.perf_counter() - start, files)
        self._barrier()

    def poll(self) -> Optional[Path]:
        """At a step boundary: complete a finished background save (ranks agree before acting)."""
        if self._pending is None:
            return None
        done = torch.tensor([int(self._pending[0].done())])
        if self.distributed:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._agreement())
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

    def _finalize(self, target: Path, final: Path, step: int, keys: list, counters: dict,
                  seconds: float, hashed: dict) -> None:
        """On rank 0 of the group: this group's part of the step, then publish it (one group) or
        record it and commit if every role has (several roles)."""
        prefix = "" if self.role is None else f"{self.role}/"
        files = {f"{prefix}{f.name}": hashed.get(f.name) or {"size": f.stat().st_size, "checksum": file_checksum(f)}
                 for f in sorted(target.iterdir()) if f.is_file()}
        part = role_part(self.role, self.attempt, keys, files, self.world_size, counters, seconds, self.meta)
        if self.role is None:
            publish(target, final, build_manifest(step, {None: part}), self._discard)
        else:
            write_part(target.parent, self.role, part)
            if not try_commit(final, step, self.roles, self.attempt, self._discard):
                return  # another role, still saving this step, commits it (and prunes)
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
    def load(self, path: Path, components: dict[str, Stateful], check_checksums: bool = True,
             role: Optional[str] = None) -> dict:
        """Load `components` from `path` (a step, or a directory of steps: its newest) under any
        layout; returns the manifest. From a multi-role step, the components of `role` (default:
        this Checkpointer's role). Everything is checked before any state changes: files,
        checksums, component keys, tensor shapes. A component that can do without its saved state
        (`fit_checkpoint` returning None, e.g. an RNG stream of a rank the saving run did not have)
        is left to reseed itself instead."""
        path = finding.find_step(path)
        manifest = read_manifest(path)
        problems = verify(path, checksums=False)  # sizes here; checksums as the reader maps each file
        if problems:
            raise CheckpointError("refusing to load a damaged checkpoint:\n  " + "\n  ".join(problems))
        root, names, checksums = role_root(path, manifest, role or self.role)
        missing = sorted(set(components) - set(names))
        if missing:
            raise CheckpointError(f"{root}: has no component(s) {', '.join(missing)}; it holds {', '.join(names)}")
        reader = VerifiedReader(root, checksums if check_checksums else None, self._agreement(),
                                threads=WRITER_THREADS)
        stored = stored_keys(root, reader)
        shapes = tensor_shapes(root, reader)
        # Each component's state dict is taken once: checked here, filled in place by DCP, then
        # handed back to the component (what dcp.load does for Stateful objects).
        wanted = {}
        for name, comp in components.items():
            template = comp.state_dict()
            fit = getattr(comp, "fit_checkpoint", None)
            if fit is not None:
                template = fit(template, _under(stored, name), manifest)
                if template is None:
                    continue
            wanted[name] = template
        mismatched = [
            f"{key}: checkpoint {shapes[key]} vs run {tuple(t.shape)}"
            for key, t in _flat_tensors(wanted).items()
            if key in shapes and tuple(shapes[key]) != tuple(t.shape)
        ]
        absent = [k for k in _flat_tensors(wanted) if k not in shapes]
        if mismatched or absent:
            lines = mismatched[:20] + [f"{k}: not in the checkpoint" for k in absent[:20]]
            raise CheckpointError(
                f"{root} does not fit this run's state ({len(mismatched)} shape mismatch(es), "
                f"{len(absent)} missing key(s)); is the model config the one it was saved with?\n  "
                + "\n  ".join(lines)
            )
        try:
            dcp.load(wanted, storage_reader=reader, process_group=self.group)
        except CheckpointException as err:
            raise _first_shard_error(err) or err
        except ShardError as err:
            raise CheckpointError(str(err)) from None
        for name, state in wanted.items():
            components[name].load_state_dict(state)
        return manifest


def _under(stored: set[str], name: str) -> set[str]:
    """The stored keys of component `name`, without its prefix."""
    prefix = f"{name}."
    return {k[len(prefix):] for k in stored if k.startswith(prefix)}


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
