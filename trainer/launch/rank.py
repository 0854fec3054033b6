"""`run_rank`: the entry point of every rank, whoever started it (Plait's spawner, torchrun,
accelerate, srun, submitit): validate, bring up the process group, seed, run the task's `_target_`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from trainer.checkpoint import CheckpointError
from trainer.config import validate
from trainer.errors import EXIT_BAD_INPUT, ConfigError
from trainer.launch.accelerate import accelerate_overrides
from trainer.launch.distributed import DistEnv, init_distributed, launcher_world_size, seed_everything
from trainer.launch.preemption import EXIT_REQUEUE, Preempted, requeue_slurm_job
from trainer.task import resolve_target


def rank_prefix(env: Optional[DistEnv]) -> str:
    """'[rank N] ' when several ranks may print the same error, else ''. Before the group is up
    (validation failed), the launcher's environment says."""
    if env is not None:
        rank, world = env.rank, env.world_size
    else:
        rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
        world = launcher_world_size() or 1
    return f"[rank {rank}] " if world > 1 else ""


def record_exit(message: str) -> None:
    """Write torch elastic's per-rank error record (its plain-message shape) for an exit that is no
    exception: the launcher orders failures by their records, so this rank's must precede the
    errors its leaving causes in its peers."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)


def bad_input(what: str, err: Exception, env: Optional[DistEnv]) -> SystemExit:
    line = f"plait: error: {rank_prefix(env)}{what}: {err}"
    record_exit(line)
    print(line, file=sys.stderr, flush=True)
    return SystemExit(EXIT_BAD_INPUT)


def run_rank(cfg_dict: dict) -> None:
    """Entry point of every rank: validate, init the process group, run the task, tear down.

    Exit status: 0 done, 2 bad input (config or checkpoint; one `plait: error:` line, found while
    validating, choosing the device or inside the task), 75 preempted and saved (requeue me).
    """
    try:
        _run(cfg_dict)
    except Exception:
        # The group goes with the process: torn down now, the peers' collectives would fail before
        # torch elastic's own `record` around this function rewrites this rank's error record, and
        # the launcher, which orders failures by their records, would blame a peer.
        raise
    except BaseException:  # SystemExit 2 or 75 (recorded by record_exit), KeyboardInterrupt
        _destroy_group()
        raise
    _destroy_group()


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@record
def _run(cfg_dict: dict) -> None:
    env = None
    try:
        cfg = validate(accelerate_overrides(cfg_dict))
        env = init_distributed(device=cfg.device)
        seed_everything(cfg.seed)
        resolve_target(cfg.task._target_)(cfg, env)  # validated: the family's typed options
    except ConfigError as err:
        raise bad_input("bad config", err, env) from None
    except CheckpointError as err:
        raise bad_input("bad checkpoint", err, env) from None
    except Preempted as stop:
        requeue = requeue_slurm_job()
        record_exit(f"{stop}; checkpoint saved")
        if env is None or env.is_main:
            print(f"plait: {stop}; checkpoint saved"
                  f"{', job requeued' if requeue else ''}; exiting {EXIT_REQUEUE}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REQUEUE) from None
