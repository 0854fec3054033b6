"""torch.distributed rendezvous from an srun task's environment.

Inside a task, `apply_slurm_env()` turns SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / the step's
node list into RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, so
`init_process_group(init_method="env://")` works the same under srun as under torchrun.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from typing import Optional

# Below Linux's ephemeral range (32768-60999): a derived port never collides with a client socket.
PORT_BASE, PORT_SPAN = 15000, 17000
# sbatch exports the submitting shell's environment; its rendezvous variables describe that shell,
# not the job, and would override what apply_slurm_env derives. launcher.setup runs after this.
RENDEZVOUS_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)


# --------------------------------------------------------------------------- node lists


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a1,b[3-5,7]' -> ['a1', 'b[3-5,7]']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm node list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_host(item: str, whole: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if match is None:
        if "[" in item or "]" in item:
            raise ValueError(f"cannot parse {item!r} in Slurm node list {whole!r}")
        return [item]
    prefix, ranges, rest = match.groups()
    tails = _expand_host(rest, whole)  # several bracket groups: rack[1-2]-n[1-2]
    hosts = []
    for rng in ranges.split(","):
        lo, dash, hi = rng.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"bad range {rng!r} in Slurm node list {whole!r}")
        if not dash:
            hosts += [prefix + lo + t for t in tails]
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {rng!r} in Slurm node list {whole!r}")
        width = len(lo)  # n[008-010] keeps its zero padding
        hosts += [f"{prefix}{i:0{width}d}{t}" for i in range(int(lo), int(hi) + 1) for t in tails]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded in Slurm's order: 'a1,b[3-5]' -> [a1, b3, b4, b5]."""
    return [h for item in _split_top_level(nodelist.strip()) for h in _expand_host(item, nodelist)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE's format, expanded: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot parse tasks-per-node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` where Slurm's tools are installed, else `expand_nodelist`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


def node_address(name: str) -> str:
    """An address other tasks can connect to for node `name`.

    A resolvable name is used as is, so thousands of ranks do not each query slurmctld; otherwise
    (a test cluster whose NodeName is an alias, like n1/n2 at 127.0.0.1) Slurm's NodeAddr.
    """
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
            match = re.search(r"\bNodeAddr=(\S+)", out)
            if match:
                return match.group(1)
        except (subprocess.SubprocessError, OSError):
            pass
    return name


# --------------------------------------------------------------------------- rendezvous


def in_srun_task(env: Optional[dict] = None) -> bool:
    """True in a task that srun started. The batch script itself also has SLURM_PROCID=0 and
    SLURM_NTASKS, but no step id: there the job's tasks have not started yet."""
    env = os.environ if env is None else env
    return bool(env.get("SLURM_PROCID") and env.get("SLURM_NTASKS")
                and (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")))


def master_port(job_id: str) -> int:
    """Deterministic per job, so every task derives the same port without talking to the others."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def slurm_rendezvous(env: Optional[dict] = None) -> Optional[dict[str, str]]:
    """torch.distributed's env:// variables derived from an srun task's environment, or None
    outside one. Rank 0 runs on the step's first node, so that node is MASTER_ADDR."""
    env = os.environ if env is None else env
    if not in_srun_task(env):
        return None
    node_id = int(env.get("SLURM_NODEID", "0"))
    spec = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
            or env.get("SLURM_NTASKS_PER_NODE"))
    if spec:
        per_node = expand_tasks_per_node(spec)
        local_world = per_node[min(node_id, len(per_node) - 1)]
    else:
        local_world = int(env["SLURM_NTASKS"])
    nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                or env.get("SLURM_NODELIST") or socket.gethostname())
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": env.get("MASTER_ADDR") or node_address(hostnames(nodelist)[0]),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(job_id)),
    }


def apply_slurm_env() -> Optional[dict[str, str]]:
    """Export `slurm_rendezvous()` into os.environ; returns what is now in effect, or None
    outside an srun task. A launcher inside the task (torchrun under srun) has already set RANK:
    then its whole rank layout wins, and only a missing MASTER_ADDR/PORT is filled in."""
    rdzv = slurm_rendezvous()
    if rdzv is None:
        return None
    layout = RENDEZVOUS_VARS[:4]
    keep_layout = "RANK" in os.environ
    for key, value in rdzv.items():
        if key in layout and keep_layout:
            continue
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in rdzv if key in os.environ}
