"""`run_rank`: the entry point of every rank, whoever started it (Plait's spawner, torchrun,
accelerate, srun, submitit): validate, bring up the process group, seed, run the task's `_target_`.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from trainer.checkpoint import CheckpointError
from trainer.config import PlaitConfig, validate
from trainer.errors import EXIT_BAD_INPUT
from trainer.launch.distributed import init_distributed, seed_everything
from trainer.launch.preemption import EXIT_REQUEUE, Preempted, requeue_slurm_job


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
