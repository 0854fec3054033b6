"""Where ranks come from: torchrun / accelerate / srun environments, or Plait spawning them itself.

One entry point, `run_rank`, runs in every rank whoever started it: it reads the launcher's
environment, brings up the process group, seeds, and calls the task's `_target_`.
"""

from __future__ import annotations

import os
import random
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from trainer.checkpoint import CheckpointError
from trainer.config import PlaitConfig, validate
from trainer.preemption import EXIT_REQUEUE, Preempted, requeue_slurm_job

EXIT_BAD_INPUT = 2

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
    if os.environ.get("SLURM_PROCID") is not None and os.environ.get("SLURM_STEP_ID") is not None:
        return "srun"
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
        from trainer.slurm_env import apply_slurm_env

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


def apply_accelerate_env(cfg: PlaitConfig) -> None:
    """`accelerate launch` records its choices in ACCELERATE_* variables (its ranks come through the
    torchrun variables): its CPU and bf16 choices replace the config's defaults."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and cfg.device == "auto":
        cfg.device = "cpu"
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "bf16" and cfg.trainer.precision == "fp32":
        cfg.trainer.precision = "bf16"
    elif precision not in ("no", "bf16"):
        print(f"plait: ACCELERATE_MIXED_PRECISION={precision} is not supported; "
              f"training in trainer.precision={cfg.trainer.precision} (allowed: fp32, bf16)", file=sys.stderr)


def resolve_target(path: str):
    """Import `module.function` named by a task config's `_target_`."""
    module, _, name = path.rpartition(".")
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"task._target_={path!r} cannot be imported: {err}") from err


@record
def run_rank(cfg_dict: dict) -> None:
    """Entry point of every rank: validate, init the process group, run the task, tear down.

    Exit status: 0 done, 2 bad input (config or checkpoint), 75 preempted and saved (requeue me).
    """
    cfg = validate(cfg_dict)
    apply_accelerate_env(cfg)
    env = init_distributed(cfg)
    seed_everything(cfg.seed)
    try:
        resolve_target(cfg.task["_target_"])(cfg, env)
    except CheckpointError as err:
        prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
        print(f"plait: error: {prefix}bad checkpoint: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except Preempted as stop:
        requeue = requeue_slurm_job()
        if env.is_main:
            print(f"plait: {stop}; checkpoint saved"
                  f"{', job requeued' if requeue else ''}; exiting {EXIT_REQUEUE}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REQUEUE) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(world_size: int, cfg_dict: dict) -> None:
    """Start `world_size` ranks on this machine with torch's elastic agent (as `torchrun
    --standalone` does); a failing rank stops the others and its traceback is shown."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    gpu = cuda_available()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=f"plait-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        # Fork is ~50x faster to start on CPU (torch is already imported); CUDA needs spawn.
        start_method="spawn" if gpu else "fork",
        local_addr="localhost",
    )
    if not gpu:
        # Ranks on a CPU box share its cores: one thread each unless the user says otherwise.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    try:
        elastic_launch(config, entrypoint=run_rank)(cfg_dict)
    except ChildFailedError as err:
        failure = min(err.failures.items())[1]
        if failure.exitcode in (EXIT_BAD_INPUT, EXIT_REQUEUE):  # already explained by the rank
            raise SystemExit(failure.exitcode) from None
        print(f"\nrank {failure.local_rank} failed (exit code {failure.exitcode}):", file=sys.stderr)
        print(failure.error_file_data.get("message", {}).get("extraInfo", {}).get("py_callstack", "")
              if isinstance(failure.error_file_data, dict) and failure.error_file_data else
              "(no traceback recorded; see the rank's output above)", file=sys.stderr)
        raise SystemExit(1) from None
