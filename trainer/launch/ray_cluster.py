"""A Ray cluster inside one Slurm job, for families whose single controller places its own workers
(HybridFlow's driver): one task per node; task 0 starts the Ray head and runs the driver on it,
every other task starts a Ray worker node and waits for the driver to finish. Each task stops its
own node's Ray at the end (never `ray stop`, which would kill every Ray session on the host)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from trainer.errors import ConfigError
from trainer.launch.forked import free_port
from trainer.launch.nodes import job_port, one_task_per_node, release_services, share_head, wait_for_controller
from trainer.launch.slurm import tail

T = TypeVar("T")
NODES_TIMEOUT_S = 300.0  # how long the driver waits for every node to join


def check_ray_nodes(cfg, launcher_world: Optional[int], backend: str, address: str) -> int:
    """The world size of a Ray-driver family (one process, or one task per node of a Slurm job,
    each a Ray node): `one_task_per_node`, and a Ray cluster of the job's own."""
    nodes = one_task_per_node(cfg, launcher_world, "a Ray node; Ray places the workers")
    if nodes > 1 and backend != "ray":
        raise ConfigError(f"task={cfg.task.name} on {nodes} nodes needs task.backend=ray (a Ray cluster across "
                          f"them), not task.backend={backend}")
    if nodes > 1 and address:
        raise ConfigError(f"task.ray_address={address} names an existing cluster, but the job starts its own on "
                          f"its {nodes} nodes; drop one of them")
    return nodes


def node_resources() -> tuple[int, int]:
    """(CPUs, GPUs) this task may use on its node: Slurm's allotment, else the machine's."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA
        gpus = 0
    return int(cpus) if cpus else (os.cpu_count() or 1), gpus


def ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise ConfigError("a Ray cluster needs the `ray` command beside this interpreter: pip install 'plait[rlhf]'")
    return found


def start_node(head: Optional[str], port: int, log: Path) -> subprocess.Popen:
    """`ray start --block` for this node (the head when `head` is None): stopping this process
    stops the node's Ray and nothing else. Every port it opens is its own, so several "nodes" may
    share one host."""
    cpus, gpus = node_resources()
    cmd = [ray_executable(), "start", "--block", "--disable-usage-stats", f"--num-cpus={cpus}",
           f"--num-gpus={gpus}", f"--dashboard-agent-listen-port={free_port('')}",
           f"--dashboard-agent-grpc-port={free_port('')}", f"--runtime-env-agent-port={free_port('')}",
           f"--metrics-export-port={free_port('')}"]
    cmd += (["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port('')}"]
            if head is None else [f"--address={head}"])
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("ab")
    # Slurm's time-limit warning (SIGUSR2) is for the driver, which saves with these nodes' help
    ignore_usr2 = lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # noqa: E731
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=ignore_usr2)


def stop_node(proc: subprocess.Popen, address: Optional[str] = None) -> None:
    """Stop this node's Ray; for the head (`address`), also forget it as the host's "current
    cluster" (which a later plain `ray.init()` on this host would try to join)."""
    if proc.poll() is None:
        proc.terminate()  # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        if address is not None and current.read_text().strip() == address:
            current.unlink()
    except OSError:
        pass


def _head_up(proc: subprocess.Popen, ip: str, port: int, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray head on {ip}:{port} exited with {proc.returncode}; {log}:\n"
                               + tail(log, 15).rstrip())
        try:
            with socket.create_connection((ip, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not listen on {ip}:{port} within {timeout:.0f}s; {log}:\n"
                       + tail(log, 15).rstrip())


def wait_for_nodes(count: int, timeout: float = NODES_TIMEOUT_S) -> list[dict]:
    """Block until `count` Ray nodes are alive (connected driver); returns them."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count:
            return alive
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(alive)} of {count} Ray nodes joined within {timeout:.0f}s "
                               f"({', '.join(n['NodeManagerAddress'] for n in alive)}); see the other tasks' "
                               "logs and <run_dir>/ray/node-<rank>.log")
        time.sleep(0.5)


def on_ray_cluster(env, run_dir: str, driver: Callable[[str], T]) -> Optional[T]:
    """Run `driver(address)` on task 0 against a Ray cluster of every task's node; None elsewhere.
    The driver connects (`ray.init(address=...)`) and waits for the nodes (`wait_for_nodes`);
    trainer/launch/nodes.py carries the head's address and keeps the other tasks until it is done."""
    from ray._private.services import get_node_ip_address

    port = job_port(int(os.environ.get("MASTER_PORT", "0")))  # the head's GCS port, one per job
    log = Path(run_dir) / "ray" / f"node-{env.rank}.log"
    ip, procs = get_node_ip_address(), []

    def start_head() -> str:
        procs.append(start_node(None, port, log))
        _head_up(procs[0], ip, port, log)
        return f"{ip}:{port}"

    address = None
    try:
        address, store = share_head(env, start_head, ip)
        if env.rank == 0:
            try:
                return driver(address)
            finally:
                release_services(store, env.world_size - 1)
        procs.append(start_node(address, port, log))
        print(f"plait: Ray node {env.rank} on {socket.gethostname()} joined {address}; waiting for the driver",
              flush=True)
        wait_for_controller(store, lambda: _node_alive(procs[0], log))
        return None
    finally:
        for proc in procs:
            stop_node(proc, address if env.rank == 0 else None)


def _node_alive(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"this task's Ray node exited with {proc.returncode} before the driver finished; "
                           f"{log}:\n{tail(log, 15).rstrip()}")


def cluster_line(alive: list[dict]) -> str:
    cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
    gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
    hosts = sorted({n["NodeManagerAddress"] for n in alive})
    return f"Ray cluster: {len(alive)} nodes ({', '.join(hosts)}), {cpus:g} CPUs, {gpus:g} GPUs"
