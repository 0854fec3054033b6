"""`task.backend=ray`: a role's workers are Ray actors in one placement group (a resource pool);
together they form the role's torch.distributed group (gloo on CPU, NCCL on GPU) and build its
mesh. A worker that raises, dies or times out becomes a `WorkerFailure` carrying the worker's own
traceback, not Ray's wrapper."""

from __future__ import annotations

import os
import re
import socket
import time
import traceback
from dataclasses import replace
from typing import Any, Callable, Optional

from rlhf.groups.base import WorkerFailure, WorkerGroup
from rlhf.workers.base import WorkerSpec


def ensure_ray(address: str = "", num_cpus: Optional[int] = None) -> bool:
    """Connect to Ray (an existing session, `address`, or a new local one); True when this call
    started it (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU workers keep the visible devices as they are
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env}, configure_logging=False)
    return True


class WorkerHost:
    """What runs inside each Ray actor: it holds one worker and calls its methods."""

    def __init__(self):
        self.worker = None

    def address(self) -> tuple[str, int, int]:
        """(ip, a free port, pid): where this rank-0 host's process group will listen."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port, os.getpid()

    def setup(self, worker_cls: type, spec: WorkerSpec) -> int:
        self.worker = worker_cls(spec)
        return os.getpid()

    def call(self, method: str, data: Any) -> Any:
        try:
            return getattr(self.worker, method)(data)
        except BaseException as err:  # the traceback as the worker saw it travels with the error
            err.worker_traceback = traceback.format_exc()
            raise


class RayWorkerGroup(WorkerGroup):
    """`world_size` actors of `worker_cls` on one placement group (CPU bundles here, GPUs on clusters)."""

    def __init__(self, role: str, worker_cls: type, spec: WorkerSpec, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 timeout: float = 600.0):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        super().__init__(role, worker_cls, spec.world_size)
        self.timeout = timeout
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.pg = placement_group([bundle] * spec.world_size, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise WorkerFailure(role, 0, "placement", f"no room for {spec.world_size} workers of {bundle} within "
                                f"{timeout:.0f}s: the cluster has {ray.available_resources()}") from None
        host = ray.remote(WorkerHost)
        self.actors = [host.options(num_cpus=num_cpus, num_gpus=num_gpus, name=None,
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)).remote()
                       for r in range(spec.world_size)]
        ip, port, _ = self._get(self.actors[0].address.remote(), 0, "address")
        specs = [replace(spec, rank=r, master_addr=ip, master_port=port) for r in range(spec.world_size)]
        self.pids = [self._get(a.setup.remote(worker_cls, s), r, "setup")
                     for r, (a, s) in enumerate(zip(self.actors, specs))]

    def _get(self, ref, rank: int, method: str):
        import ray

        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.RayTaskError as err:  # the worker raised: show its own traceback
            cause = getattr(err, "cause", None)
            detail = getattr(cause, "worker_traceback", None) or _worker_traceback(err)
            raise WorkerFailure(self.role, rank, method, detail, cause=cause) from None
        except ray.exceptions.GetTimeoutError:
            raise WorkerFailure(self.role, rank, method, f"no answer within task.worker_timeout={self.timeout:.0f}s") from None
        except ray.exceptions.RayActorError as err:
            raise WorkerFailure(self.role, rank, method, f"the worker process died: {err}") from None

    def submit(self, method: str, inputs: dict[int, Any]) -> Callable[[], dict[int, Any]]:
        import ray

        refs = {rank: self.actors[rank].call.remote(method, x) for rank, x in inputs.items()}

        def wait() -> dict[int, Any]:
            # results as they finish: the first worker that raised is reported at once, while its
            # peers may still be blocked in a collective with it (closing the group stops them)
            rank_of = {ref: rank for rank, ref in refs.items()}
            pending, deadline = list(refs.values()), time.monotonic() + self.timeout
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
                if not done:
                    raise WorkerFailure(self.role, rank_of[pending[0]], method,
                                        f"no answer within task.worker_timeout={self.timeout:.0f}s")
                self._get(done[0], rank_of[done[0]], method)
            return {rank: ray.get(ref) for rank, ref in refs.items()}

        return wait

    def close(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor, no_restart=True)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None


def _worker_traceback(err) -> str:
    """The traceback the worker printed, without Ray's framing."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(err))


def worker_resources(device: str, workers: int) -> tuple[float, float]:
    """(CPUs, GPUs) per worker: a GPU each where the run uses GPUs; else an equal share of the
    cluster's CPUs (at most one each), so every role fits at once."""
    import ray
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return 1.0, 1.0
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return min(1.0, cpus / max(workers, 1)), 0.0
