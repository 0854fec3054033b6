"""What both backends share: bound methods, futures, and failures that name the role and rank."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from rlhf.dispatch import Contract, WorkerInfo, collect, contract_of, dispatch, registered_methods


class WorkerFailure(RuntimeError):
    """A worker raised (or died, or timed out): which role, which rank, and its own traceback."""

    def __init__(self, role: str, rank: int, method: str, detail: str, cause: Optional[BaseException] = None):
        self.role, self.rank, self.method, self.detail, self.cause = role, rank, method, detail, cause
        super().__init__(f"{role} worker rank {rank} failed in {method}:\n{detail.rstrip()}")


class Pending:
    """The future of a call on a worker group: `result()` waits and collects. Passing it to another
    group's method waits for it first (independent calls overlap until then)."""

    def __init__(self, wait: Callable[[], dict[int, Any]], contract: Contract, infos: Sequence[WorkerInfo], pad: int):
        self._wait, self._contract, self._infos, self._pad = wait, contract, infos, pad
        self._done, self._value = False, None

    def result(self) -> Any:
        if not self._done:
            self._value = collect(self._contract.collect, self._wait(), self._infos, pad=self._pad)
            self._done = True
        return self._value


class BoundMethod:
    """`group.compute_log_prob(batch)` (blocking) and `group.compute_log_prob.future(batch)`."""

    def __init__(self, group: "WorkerGroup", name: str, contract: Contract):
        self.group, self.name, self.contract = group, name, contract

    def future(self, data: Any = None) -> Pending:
        if isinstance(data, Pending):
            data = data.result()
        infos = self.group.infos_for(self.contract.mesh)
        call = dispatch(self.contract.dispatch, data, infos)
        return Pending(self.group.submit(self.name, call.inputs), self.contract, infos, call.pad)

    def __call__(self, data: Any = None) -> Any:
        pending = self.future(data)
        return pending.result() if self.contract.blocking else pending


class WorkerGroup:
    """A role's workers; subclasses say how a method runs on them (`submit`)."""

    def __init__(self, role: str, worker_cls: type, world_size: int):
        self.role, self.worker_cls, self.world_size = role, worker_cls, world_size
        self.infos: Optional[list[WorkerInfo]] = None  # where each worker sits in the training mesh
        self.mesh_infos: dict[str, list[WorkerInfo]] = {}  # ... and in every mesh it reports
        self._methods = registered_methods(worker_cls)

    def __getattr__(self, name: str) -> BoundMethod:
        methods = self.__dict__.get("_methods", {})
        if name not in methods:
            raise AttributeError(f"{self.__dict__.get('worker_cls', type(self)).__name__} has no registered method "
                                 f"{name!r}; registered: {', '.join(sorted(methods))}")
        return BoundMethod(self, name, methods[name])

    def start(self) -> "WorkerGroup":
        """Build every worker's model; learn where each sits in the mesh."""
        return self.started(self.init_model())

    def started(self, reported: list) -> "WorkerGroup":
        """Record what `init_model` returned on each worker: a WorkerInfo, or {mesh name: WorkerInfo}."""
        per_rank = [r if isinstance(r, dict) else {"train": r} for r in reported]
        self.mesh_infos = {name: [r[name] for r in per_rank] for name in per_rank[0]}
        self.infos = self.mesh_infos["train"]
        return self

    def infos_for(self, mesh: str) -> list[WorkerInfo]:
        if self.infos is None:  # before init_model answered: every worker its own rank, rank 0 collects
            return [WorkerInfo(r, 0, 1, r == 0) for r in range(self.world_size)]
        return self.mesh_infos.get(mesh, self.infos)

    def submit(self, method: str, inputs: dict[int, Any]) -> Callable[[], dict[int, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop every worker (idempotent)."""


def method_contract(cls: type, name: str) -> Contract:
    c = contract_of(getattr(cls, name))
    if c is None:
        raise ValueError(f"{cls.__name__}.{name} has no @register contract")
    return c
