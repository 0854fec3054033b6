"""`task.backend=ray`: a role's workers are Ray actors in one placement group (a resource pool);
together they form the role's torch.distributed group (gloo on CPU, NCCL on GPU) and build its
mesh. A worker that raises, dies or times out becomes a `WorkerFailure` carrying the worker's own
traceback, not Ray's wrapper."""

from __future__ import annotations

import os
import re
import time
import traceback
from dataclasses import replace
from typing import Any, Callable, Optional

from rlhf.groups.base import WorkerFailure, WorkerGroup
from rlhf.workers.base import WorkerSpec
from trainer.launch.forked import free_port


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
        # "local": a new instance, never the host's last `ray start` cluster (maybe gone by now)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True, runtime_env={"env_vars": env}, configure_logging=False)
    return True


class WorkerHost:
    """What runs inside each Ray actor: one worker per role it hosts (several when colocated: they
    share this process, its device and its process group), and calls their methods."""

    PASSIVE = ("resident_bytes", "shutdown")  # calls that leave the device to whoever holds it

    def __init__(self):
        self.workers: dict[str, Any] = {}
        self.offload, self.active = False, None

    def enable_offload(self) -> None:
        """Colocated roles: only the role being called keeps its state on the device."""
        self.offload = True

    def address(self) -> tuple[str, int, int]:
        """(ip, a free port, pid): where this rank-0 host's process group will listen."""
        import ray

        return ray.util.get_node_ip_address(), free_port(""), os.getpid()

    def node(self) -> str:
        """The Ray node this host runs on (its IP and the node id's first 8 digits)."""
        import ray

        return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"

    def setup(self, role: str, worker_cls: type, spec: WorkerSpec) -> int:
        self.workers[role] = worker_cls(spec)
        if self.offload:
            from rlhf.workers.offload import Offloader

            self.workers[role].offloader = Offloader(self.workers[role])
        return os.getpid()

    def _activate(self, role: str) -> None:
        if self.active == role:
            return
        for other, worker in self.workers.items():
            if other != role:
                worker.offloader.offload()
        self.workers[role].offloader.onload()
        self.active = role

    def call(self, role: str, method: str, data: Any) -> Any:
        try:
            if self.offload and method not in self.PASSIVE:
                self._activate(role)
            return getattr(self.workers[role], method)(data)
        except BaseException as err:  # the traceback as the worker saw it travels with the error
            err.worker_traceback = traceback.format_exc()
            raise


class RayPool:
    """A resource pool: one placement group of `size` bundles and a WorkerHost actor on each, with
    the address rank 0 listens on. A role's group runs on a pool of its own (split placement) or
    shares one with other roles (colocated, HybridFlow's default)."""

    def __init__(self, size: int, num_cpus: float = 1.0, num_gpus: float = 0.0, timeout: float = 600.0,
                 name: str = "pool", offload: bool = False):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.size, self.timeout, self.name = size, timeout, name
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.pg = placement_group([bundle] * size, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            self.pg = None
            raise WorkerFailure(name, 0, "placement", f"no room for {size} workers of {bundle} within "
                                f"{timeout:.0f}s: the cluster has {ray.available_resources()}") from None
        host = ray.remote(WorkerHost)
        self.actors = [host.options(num_cpus=num_cpus, num_gpus=num_gpus,
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                                        self.pg, placement_group_bundle_index=r)).remote()
                       for r in range(size)]
        try:
            self.address = ray.get(self.actors[0].address.remote(), timeout=timeout)[:2]
            self.nodes = ray.get([a.node.remote() for a in self.actors], timeout=timeout)  # per rank
            if offload:
                ray.get([a.enable_offload.remote() for a in self.actors], timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as err:
            self.close()
            what = f"no answer within task.worker_timeout={timeout:.0f}s" \
                if isinstance(err, ray.exceptions.GetTimeoutError) else f"a worker process died: {err}"
            raise WorkerFailure(name, 0, "start", f"its {size} worker processes did not start: {what}") from None
        self.roles: list[str] = []

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None


class RayWorkerGroup(WorkerGroup):
    """A role's workers on a `RayPool` (its own unless `pool=` is shared with colocated roles, which
    then take the pool's size as their world size and its process group as theirs)."""

    def __init__(self, role: str, worker_cls: type, spec: WorkerSpec, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 timeout: float = 600.0, pool: Optional[RayPool] = None):
        super().__init__(role, worker_cls, spec.world_size)
        self.timeout = timeout
        self.owns_pool = pool is None
        self.pool = pool or RayPool(spec.world_size, num_cpus, num_gpus, timeout, name=role)
        if self.pool.size != spec.world_size:
            raise ValueError(f"the {role} workers need {spec.world_size} processes but the pool has {self.pool.size}")
        self.pool.roles.append(role)
        self.actors = self.pool.actors
        ip, port = self.pool.address
        specs = [replace(spec, rank=r, master_addr=ip, master_port=port) for r in range(spec.world_size)]
        self.pids = [self._get(a.setup.remote(role, worker_cls, s), r, "setup")
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

        refs = {rank: self.actors[rank].call.remote(self.role, method, x) for rank, x in inputs.items()}

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
        """Stop the workers: the pool goes with its last role (colocated roles share it)."""
        pool = getattr(self, "pool", None)
        if pool is None:
            return
        if self.role in pool.roles:
            pool.roles.remove(self.role)
        if self.owns_pool or not pool.roles:
            pool.close()
        self.pool, self.actors = None, []


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
