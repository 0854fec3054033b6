"""The manifest (`plait.json`) of a checkpoint step: what it holds, who saved it, every file's checksum.

Two layouts of a step directory, both read by every tool:

    step_000001200/                       one process group saved every component (format 1)
      .metadata, __0_0.distcp, ...          DCP shards of all components
      plait.json                            {"components": ["model", ...], "files": {...}, ...}

    step_000001200/                       several roles, each its own group (format 2)
      actor/  .metadata, __0_0.distcp ...   DCP shards of the actor's components, by actor group rank
      critic/ .metadata, __0_0.distcp ...
      plait.json                            {"roles": {"actor": {...}, ...},
                                             "components": {"actor/model": {...}, ...}, "files": {...}}

File names in `files` are relative to the step directory, so `verify` reads both alike.
"""

from __future__ import annotations

import functools
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp

from trainer.checkpoint.reader import file_checksum

FORMAT_VERSION = 1  # one group, files at the step root
ROLES_FORMAT_VERSION = 2  # components saved by several roles, one subdirectory each
SUPPORTED_VERSIONS = (FORMAT_VERSION, ROLES_FORMAT_VERSION)
MANIFEST = "plait.json"
LATEST = "latest"
STEP_PREFIX = "step_"
# What the manifest itself says; a Checkpointer's `meta` may add keys but never replace these.
RESERVED_KEYS = frozenset({"format_version", "created", "counters", "components", "files", "roles",
                           "save_seconds", "versions", "argv"})
ROLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file or keys at fault."""


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:09d}"


def step_number(name: str) -> Optional[int]:
    """The step of a `step_000001200`-style name (also inside `.tmp-step_…`), None for others."""
    found = re.search(rf"{STEP_PREFIX}(\d+)", name)
    return int(found.group(1)) if found else None


def check_meta(meta: dict) -> None:
    clash = sorted(RESERVED_KEYS & set(meta))
    if clash:
        raise CheckpointError(
            f"checkpoint meta key(s) {', '.join(clash)} are written by the checkpointer itself and cannot be "
            f"set through meta (reserved: {', '.join(sorted(RESERVED_KEYS))}); pass counters to "
            "save(step, components, counters=...) instead"
        )


def check_role(role: str) -> str:
    if not isinstance(role, str) or not ROLE_NAME.fullmatch(role) or role.startswith(STEP_PREFIX):
        raise CheckpointError(
            f"checkpoint role {role!r}: a role names a subdirectory of the step; use letters, digits, '_' and "
            f"'-', starting with a letter or digit (not {STEP_PREFIX!r})"
        )
    return role


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
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{manifest_path}: format_version {version!r} is not supported; this Plait reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
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


def roles_of(manifest: dict) -> list[str]:
    """The roles whose components a step holds; [] for a one-group step (format 1)."""
    return sorted(manifest.get("roles", {}))


def role_root(path: Path, manifest: dict, role: Optional[str]) -> tuple[Path, list[str], dict[str, str]]:
    """Where a role's DCP files are, its component names, and their checksums by file name there.

    A one-group step serves any role (an RLHF actor may start from a pretraining checkpoint); a
    multi-role step needs the role named unless it holds only one."""
    path = Path(path)
    roles = roles_of(manifest)
    if not roles:
        return path, list(manifest["components"]), {n: i["checksum"] for n, i in manifest["files"].items()}
    if role is None:
        if len(roles) != 1:
            raise CheckpointError(f"{path}: holds the components of roles {', '.join(roles)}; say which role to "
                                  "load (Checkpointer(..., role=...) or load(..., role=...))")
        role = roles[0]
    if role not in roles:
        raise CheckpointError(f"{path}: has no role {role!r}; it holds roles {', '.join(roles)}")
    prefix = f"{role}/"
    checksums = {n[len(prefix):]: i["checksum"] for n, i in manifest["files"].items() if n.startswith(prefix)}
    return path / role, list(manifest["roles"][role]["components"]), checksums


def tensor_shapes(path: Path, reader: Optional[dcp.FileSystemReader] = None) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor stored in a DCP directory (a step, or one role's), by flattened key."""
    meta = (reader or dcp.FileSystemReader(str(path))).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}


def stored_keys(path: Path, reader: Optional[dcp.FileSystemReader] = None) -> set[str]:
    """Every flattened key a DCP directory stores, tensors and other objects alike."""
    return set((reader or dcp.FileSystemReader(str(path))).read_metadata().state_dict_metadata)


# ---- writing ----------------------------------------------------------------------------------

def role_part(role: Optional[str], attempt: str, components: list[str], files: dict, world_size: int,
              counters: dict, seconds: float, meta: dict) -> dict:
    """What one group saved into a step: its share of the manifest (a whole one-group manifest, or one
    role's completion record in a multi-role step)."""
    return {"role": role, "attempt": attempt, "components": components, "files": files,
            "world_size": world_size, "counters": counters, "save_seconds": round(seconds, 3), "meta": meta}


def _base(version: int, step: int, counters: dict, files: dict) -> dict:
    return {"format_version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counters": {"step": step, **counters}, "files": files}


def build_manifest(step: int, parts: dict[Optional[str], dict]) -> dict:
    """The manifest of a step from each group's part: format 1 for one role-less group, else format 2
    with every role and component listed, and the meta all roles agree on at the top."""
    if None in parts:
        part = parts[None]
        return {**_base(FORMAT_VERSION, step, part["counters"], part["files"]),
                "components": part["components"], "save_seconds": part["save_seconds"],
                "versions": package_versions(), "argv": sys.argv, **part["meta"]}
    ordered = [parts[r] for r in sorted(parts)]
    counters = {k: v for p in ordered for k, v in p["counters"].items()}
    files = {name: info for p in ordered for name, info in p["files"].items()}
    components = {
        f"{p['role']}/{name}": {"role": p["role"], "files": sorted(p["files"]), "world_size": p["world_size"],
                                "layout": p["meta"].get("layout")}
        for p in ordered for name in p["components"]
    }
    roles = {p["role"]: {"components": p["components"], "world_size": p["world_size"],
                         "save_seconds": p["save_seconds"], "meta": p["meta"]} for p in ordered}
    first = ordered[0]["meta"]
    common = {k: v for k, v in first.items() if all(k in p["meta"] and p["meta"][k] == v for p in ordered)}
    return {**_base(ROLES_FORMAT_VERSION, step, counters, files), "roles": roles, "components": components,
            "versions": package_versions(), "argv": sys.argv, **common}
