"""`task.mode=deploy` across the nodes of one Slurm job (`launcher=slurm launcher.nodes=N`, one
task per node; trainer/launch/nodes.py): task 0 starts the SuperLink and runs Plait's server loop
through `flwr run`; every task, task 0 included, starts the SuperNodes of clients k ≡ its rank
(mod N). The SuperLink listens on 20000 + MASTER_PORT mod 9000 (per job), SuperNode k serves its
ClientApps on the port k + 1 after it. The run directory (checkpoints, each client's state) must
be on a file system every node shares, as for any Slurm job that resumes."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

from federated.deploy import Processes, flower_env, prepare, run_app, start_superlink, start_supernodes
from trainer.config import PlaitConfig
from trainer.launch.nodes import job_port, release_services, share_head, wait_for_controller


def clients_of(rank: int, tasks: int, num_clients: int) -> list[int]:
    """The clients whose SuperNodes a task hosts: k ≡ rank (mod tasks)."""
    return list(range(rank, num_clients, tasks))


def on_flower_cluster(cfg: PlaitConfig, env) -> Optional[dict]:
    """The server loop's summary on task 0; None on the others (after the server is done)."""
    c = cfg.task
    port = job_port(int(os.environ.get("MASTER_PORT", "0")))
    host = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())  # task 0, as the others reach it
    root = Path(cfg.run_dir) / "flwr"
    procs = Processes(root / f"node-{env.rank}", flower_env(cfg, root))
    served = clients_of(env.rank, env.world_size, c.num_clients)
    prepared = []

    def start_head() -> str:
        prepared.extend(prepare(cfg, f"{host}:{port}"))
        start_superlink(procs, "0.0.0.0", port, host)
        return f"{host}:{port}"

    try:
        superlink, store = share_head(env, start_head, host)
        start_supernodes(procs, superlink, served, c.num_clients, lambda k: port + 1 + k)
        if env.rank == 0:
            print(f"plait: Flower SuperLink on {superlink}; {env.world_size} nodes host the SuperNodes of "
                  f"{c.num_clients} clients", flush=True)
            app, spec = prepared
            try:
                return run_app(app, spec, procs.env)
            finally:
                release_services(store, env.world_size - 1)
        print(f"plait: node {env.rank} on {socket.gethostname()} hosts the SuperNodes of clients {served}; "
              "waiting for the server", flush=True)
        wait_for_controller(store, lambda: None)  # a lost SuperNode is the server's to drop, not this task's
        return None
    finally:
        procs.stop()
