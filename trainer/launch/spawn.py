"""Plait spawning its own ranks on one machine, as `torchrun --standalone` does, and saying which
rank failed and why when one does (trainer/launch/failures.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from trainer.errors import EXIT_BAD_INPUT
from trainer.launch.distributed import cuda_available
from trainer.launch.failures import ExitWatch, announce, report, root_cause
from trainer.launch.preemption import EXIT_REQUEUE
from trainer.launch.rank import run_rank

EXIT_RANK_FAILED = 1  # as torchrun's: a rank failed; the report above says which and how
# The agent logs each failure it observes with a traceback of its own; `report` replaces that.
ELASTIC_FAILURE_LOG = "torch.distributed.elastic.multiprocessing.api"


def rank_entry(cfg_dict: dict, watch_dir: str) -> None:
    """What each spawned rank runs: tell the launcher who it is, then be a rank."""
    announce(watch_dir, int(os.environ["LOCAL_RANK"]))
    run_rank(cfg_dict)


@contextlib.contextmanager
def _quiet(logger_name: str):
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def spawn_local(world_size: int, cfg_dict: dict) -> None:
    """Start `world_size` ranks on this machine with torch's elastic agent (as `torchrun
    --standalone` does). A failing rank stops the others; the rank that failed on its own is
    named with how it ended (exit code, or the signal and what it suggests) and its traceback.

    Exit status: 0 done; the rank's own 2 (bad input) or 75 (preempted, requeue), which it has
    already explained; else EXIT_RANK_FAILED.
    """
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
    with ExitWatch() as watch:
        try:
            with _quiet(ELASTIC_FAILURE_LOG):
                elastic_launch(config, entrypoint=rank_entry)(cfg_dict, watch.dir)
            return
        except ChildFailedError as err:
            elastic_failures = err.failures
    exits = watch.failures(elastic_failures)
    root = root_cause(exits)
    if root.exitcode in (EXIT_BAD_INPUT, EXIT_REQUEUE):  # already explained by the rank
        raise SystemExit(root.exitcode)
    print(report(exits), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_RANK_FAILED)
