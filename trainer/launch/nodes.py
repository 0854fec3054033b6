"""One Slurm job, one task per node: task 0 is the family's controller, every other task hosts a
service on its node (a Ray worker node for RLHF's driver, Flower SuperNodes for the federated
server) until the controller is done.

The tasks' process group carries one thing, task 0's address (of the head service it started:
the Ray head, the SuperLink), and is then taken down, so the controller runs as the single process
it is (its checkpoints and preemption checks agree with nobody). The service tasks wait on a
TCPStore key instead, so a run of any length never trips a collective's timeout, and they watch
their own service while they wait.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Callable, Optional

from trainer.errors import ConfigError

# Ray's workers take ports 10002-19999 by default and Linux's ephemeral range starts at 32768: a
# job's head service listens between them, on a port derived from MASTER_PORT (like it, per job).
JOB_PORT_BASE, JOB_PORT_SPAN = 20000, 9000
LONG_WAIT = timedelta(days=365)  # service tasks wait on the controller for the whole run


def job_port(master_port: int) -> int:
    """20000 + MASTER_PORT mod 9000: the same in every task, different for concurrent jobs."""
    return JOB_PORT_BASE + master_port % JOB_PORT_SPAN


def one_task_per_node(cfg, launcher_world: Optional[int], service: str) -> int:
    """The world size of a controller family: the nodes of a Slurm job (one task each, hosting
    `service`), or one process anywhere else."""
    nodes = cfg.launcher.nodes if cfg.launcher.name == "slurm" else (launcher_world or 1)
    if cfg.launcher.name == "slurm" and cfg.launcher.tasks_per_node not in (0, 1):
        raise ConfigError(f"task={cfg.task.name} runs one task per node (each one hosting {service}), but "
                          f"launcher.tasks_per_node={cfg.launcher.tasks_per_node}; leave it at 0")
    if launcher_world not in (None, nodes):
        raise ConfigError(f"task={cfg.task.name} runs one task per node, but the launcher started "
                          f"{launcher_world} tasks on {nodes} node(s); start it once per node "
                          "(srun --ntasks-per-node=1, or launcher=slurm launcher.nodes=N)")
    if launcher_world and launcher_world > 1 and _step_nodes() not in (None, launcher_world):
        raise ConfigError(f"task={cfg.task.name} runs one task per node, but this step has {launcher_world} "
                          f"tasks on {_step_nodes()} node(s): use srun --ntasks-per-node=1")
    return nodes


def _step_nodes() -> Optional[int]:
    value = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES")
    return int(value) if value else None


def share_head(env, start_head: Callable[[], str], store_host: str):
    """(the head's address, a TCPStore every task reaches): task 0 runs `start_head()` (its head
    service, up and listening) and hosts the store on `store_host`; the default process group
    carries both to the other tasks and is destroyed."""
    import torch.distributed as dist

    box, store = [None], None
    if env.rank == 0:
        address = start_head()
        store = dist.TCPStore(store_host, 0, is_master=True, timeout=LONG_WAIT, wait_for_workers=False)
        box = [(address, store_host, store.port)]
    dist.broadcast_object_list(box, src=0)
    address, host, port = box[0]
    dist.destroy_process_group()
    if store is None:
        store = dist.TCPStore(host, port, is_master=False, timeout=LONG_WAIT)
    return address, store


def release_services(store, services: int, timeout: float = 120.0) -> None:
    """Tell the service tasks the controller is done; wait until each has read it (the store lives here)."""
    store.set("done", "1")
    deadline = time.monotonic() + timeout
    while store.add("left", 0) < services and time.monotonic() < deadline:
        time.sleep(0.2)


def wait_for_controller(store, check: Callable[[], None], every: float = 1.0) -> None:
    """Block until the controller is done; `check()` raises if this task's own service has died."""
    while not store.check(["done"]):
        check()
        time.sleep(every)
    store.add("left", 1)
