"""`task.backend=local`: a role's worker runs in the driver process, world size 1 (no Ray, no
process group), so a debugger steps from the algorithm into any worker method. Calls run when
submitted: a future is already done."""

from __future__ import annotations

import traceback
from typing import Any, Callable

from rlhf.groups.base import WorkerFailure, WorkerGroup
from rlhf.workers.base import WorkerSpec


class LocalWorkerGroup(WorkerGroup):

    def __init__(self, role: str, worker_cls: type, spec: WorkerSpec):
        if spec.world_size != 1:
            raise ValueError(f"the local backend runs one worker per role; {role} asks for {spec.world_size}")
        super().__init__(role, worker_cls, 1)
        self.worker = worker_cls(spec)

    def submit(self, method: str, inputs: dict[int, Any]) -> Callable[[], dict[int, Any]]:
        try:
            out = {rank: getattr(self.worker, method)(x) for rank, x in inputs.items()}
        except Exception as err:
            raise WorkerFailure(self.role, 0, method, traceback.format_exc(), cause=err) from err
        return lambda: out

    def close(self) -> None:
        self.worker = None
