"""The process group of a rank: which launcher started it, its device, its seed.

`init_distributed` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun, accelerate, Plait's
spawner or srun) and brings up the default group: NCCL on GPUs, gloo on CPU.
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


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if cuda_available() else torch.device("cpu")
    if name.startswith("cuda") and not cuda_available():
        raise RuntimeError(f"device={name} but CUDA is not available on this machine; use device=cpu or auto")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(cfg: PlaitConfig) -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun, accelerate, Plait's spawner or srun) and
    bring up the default process group: NCCL on GPUs, gloo on CPU."""
    if detect_launcher() == "srun":
        apply_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if world > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if device.type == "cpu" and local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                timeout=PG_TIMEOUT,
                device_id=device if device.type == "cuda" else None,
            )
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)
