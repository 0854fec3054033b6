"""Plait spawning its own ranks on one machine, as `torchrun --standalone` does."""

from __future__ import annotations

import os
import sys
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from trainer.errors import EXIT_BAD_INPUT
from trainer.launch.distributed import cuda_available
from trainer.launch.preemption import EXIT_REQUEUE
from trainer.launch.rank import run_rank


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
