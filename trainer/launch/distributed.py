"""The process group of a rank: which launcher started it, its device, its seed.

`init_distributed` takes the rank layout as plain arguments (a Ray worker or a Flower client
passes its own) and otherwise reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT,
as torchrun, accelerate, Plait's spawner and (through `apply_slurm_env`) srun set them; it brings
up the default group: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import DEVICE, DEVICES
from trainer.errors import ConfigError
from trainer.launch.slurm_env import apply_slurm_env, in_srun_task

PG_TIMEOUT = timedelta(minutes=int(os.environ.get("PLAIT_PG_TIMEOUT_MIN", "10")))


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launcher() -> Optional[str]:
    """Which launcher started this process, if any: torchrun (or accelerate), srun, or none."""
    if os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE") is not None:
        return "torchrun"
    if in_srun_task():
        return "srun"
    return None


def launcher_world_size() -> Optional[int]:
    """World size a launcher (torchrun, accelerate, srun) has already fixed, if any. Inside an
    sbatch script but outside an srun task there are no ranks yet: None."""
    launcher = detect_launcher()
    if launcher == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    if launcher == "srun":
        return int(os.environ["SLURM_NTASKS"])
    return None


def cuda_available() -> bool:
    """CUDA check that does not initialise the driver (so the parent can still fork ranks)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device `device=<name>` means for this local rank; ConfigError for anything else."""
    if not DEVICE.fullmatch(name):
        raise ConfigError(f"device={name!r} is not allowed; choose one of: {DEVICES}")
    if name == "cpu" or (name == "auto" and not cuda_available()):
        return torch.device("cpu")
    if not cuda_available():
        raise ConfigError(f"device={name} but CUDA is not available on this machine; "
                          "allowed here: auto, cpu")
    index = local_rank if name in ("auto", "cuda") else int(name.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        why = f"local rank {local_rank} needs" if name in ("auto", "cuda") else "asks for"
        raise ConfigError(f"device={name}: {why} CUDA device {index}, but this machine has {count} "
                          f"(cuda:0..cuda:{count - 1}); allowed: {DEVICES} with N < {count}")
    return torch.device("cuda", index)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(rank: Optional[int] = None, world_size: Optional[int] = None, *,
                     master_addr: Optional[str] = None, master_port: Optional[int] = None,
                     device: str = "auto", local_rank: Optional[int] = None,
                     timeout: timedelta = PG_TIMEOUT) -> DistEnv:
    """Bring up this process's default group and say where it stands.

    Every argument left out comes from the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK; under srun from SLURM_*); no layout at all is one process without a
    group. Given ones are exported into the environment too, so code that asks it (which rank
    writes the run's files, which one requeues a Slurm job) agrees with the group.
    """
    given = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": local_rank,
             "MASTER_ADDR": master_addr, "MASTER_PORT": master_port}
    if rank is None and detect_launcher() == "srun":
        apply_slurm_env()
    env = os.environ
    world = int(world_size if world_size is not None else env.get("WORLD_SIZE", "1"))
    rank = int(rank if rank is not None else env.get("RANK", "0"))
    local_rank = int(local_rank if local_rank is not None else env.get("LOCAL_RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"init_distributed: rank={rank}, world_size={world}; allowed: world_size >= 1 "
                         f"and 0 <= rank < world_size")
    if world > 1 and not ((master_addr or env.get("MASTER_ADDR")) and (master_port or env.get("MASTER_PORT"))):
        raise ValueError(f"init_distributed: world_size={world} needs master_addr and master_port "
                         "(or MASTER_ADDR and MASTER_PORT in the environment): where rank 0 listens")
    env_device = pick_device(device, local_rank)
    # only what the caller gave: a single process started by nobody must not look torchrun-started
    os.environ.update({key: str(value) for key, value in given.items() if value is not None})
    if world > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if env_device.type == "cpu" and local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if env_device.type == "cuda":
            torch.cuda.set_device(env_device)
        if not dist.is_initialized():
            # env:// and not tcp://: under torchrun it joins the agent's store instead of binding its port
            dist.init_process_group(
                backend="nccl" if env_device.type == "cuda" else "gloo", init_method="env://",
                rank=rank, world_size=world, timeout=timeout,
                device_id=env_device if env_device.type == "cuda" else None,
            )
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=env_device)
