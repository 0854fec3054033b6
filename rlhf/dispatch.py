"""Transfer protocols declared on worker methods (HybridFlow §4, verl's `@register`): how the
driver's input is split across a worker group and how the workers' outputs are gathered.

The contract is data on the method; the split is derived from each worker's mesh, not from one
hand-written mode per parallelism. Every worker reports a `WorkerInfo` (dp_rank, dp_size,
is_collector); `DP` then sends chunk `dp_rank` of the batch to every worker of that dp rank
(replicated across its tp and pp ranks) and collects from the one collector per dp rank (tp rank
0 of the last pipeline stage, whose output is complete). A batch that dp_size does not divide is
padded for the call and the padding removed from the result.

    class Actor(Worker):
        @register(Mode.DP)
        def compute_log_prob(self, batch: Batch) -> Batch: ...

    call = dispatch(contract_of(Actor.compute_log_prob).dispatch, batch, infos)   # rank -> input
    outputs = {rank: workers[rank].compute_log_prob(x) for rank, x in call.inputs.items()}
    result = collect(contract_of(Actor.compute_log_prob).collect, outputs, infos, pad=call.pad)

No Ray here: a Ray worker group and the local backend both bind methods through these functions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from parallel.mesh import MESH_DIMS, ParallelDims
from rlhf.batch import Batch


class Mode(str, enum.Enum):
    """How a worker group's call is split (dispatch) and gathered (collect)."""

    ONE_TO_ALL = "one_to_all"  # the same input to every worker; collect: every output, rank order
    ALL_TO_ALL = "all_to_all"  # input i to worker i; collect: every output, rank order
    DP = "dp"                  # chunk dp_rank to each worker; collect: the collectors' chunks, concatenated
    RANK_ZERO = "rank_zero"    # only worker 0 runs; collect: its output


CONTRACT_ATTR = "__plait_contract__"


@dataclass(frozen=True)
class Contract:
    """A worker method's transfer protocol (and whether the driver waits for it)."""

    dispatch: Mode
    collect: Mode
    blocking: bool = True
    mesh: str = "train"  # whose WorkerInfos split and gather it: "train", or "generation" (3D-HybridEngine)


def _mode(value: Union[Mode, str], what: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        allowed = ", ".join(m.value for m in Mode)
        raise ValueError(f"{what}={value!r} is not a transfer mode; allowed: {allowed}") from None


def register(mode: Union[Mode, str, None] = None, *, dispatch: Union[Mode, str, None] = None,
             collect: Union[Mode, str, None] = None, blocking: bool = True, mesh: str = "train") -> Callable:
    """Decorator storing a `Contract` on a worker method: `@register(Mode.DP)` (one mode for
    both directions) or `@register(dispatch="dp", collect="rank_zero")`; `mesh="generation"` splits
    by the workers' generation layout (each reports one WorkerInfo per mesh). The method itself is
    unchanged: called on a worker it runs locally."""
    if mode is not None and (dispatch is not None or collect is not None):
        raise ValueError("give one mode, or dispatch= and collect=, not both")
    d, c = (mode, mode) if mode is not None else (dispatch, collect)
    if d is None or c is None:
        raise ValueError("register needs a mode, or both dispatch= and collect=")
    contract = Contract(_mode(d, "dispatch"), _mode(c, "collect"), blocking, mesh)

    def mark(fn: Callable) -> Callable:
        setattr(fn, CONTRACT_ATTR, contract)
        return fn

    return mark


def contract_of(fn: Callable) -> Optional[Contract]:
    """The contract registered on a (bound or unbound) method; None for a plain method."""
    return getattr(getattr(fn, "__func__", fn), CONTRACT_ATTR, None)


def registered_methods(cls: type) -> dict[str, Contract]:
    """name -> contract for every method of a worker class that carries one (what a worker
    group binds on the driver side)."""
    out = {}
    for name in dir(cls):
        c = contract_of(getattr(cls, name, None))
        if c is not None:
            out[name] = c
    return out


# --- where each worker sits -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports about its place in its group's mesh."""

    rank: int          # rank inside the worker group
    dp_rank: int       # which chunk of a DP batch it reads
    dp_size: int       # how many chunks a DP batch is split into
    is_collector: bool  # whether its output is the one gathered for its dp rank
    coords: Mapping[str, int] = field(default_factory=dict, compare=False)  # pp/dp_replicate/dp_shard/tp


def worker_infos(dims: ParallelDims) -> list[WorkerInfo]:
    """Every rank's WorkerInfo under `parallel.mesh`'s layout (pp-major, tp-minor; dp =
    dp_replicate × dp_shard): the collector of each dp rank is tp 0 on the last pp stage."""
    sizes = dims.sizes()
    infos = []
    for rank in range(dims.world_size):
        coords, rest = {}, rank
        for name, size in zip(reversed(MESH_DIMS), reversed(sizes)):
            coords[name], rest = rest % size, rest // size
        coords = {name: coords[name] for name in MESH_DIMS}
        dp_rank = coords["dp_replicate"] * dims.dp_shard + coords["dp_shard"]
        is_collector = coords["tp"] == 0 and coords["pp"] == dims.pp - 1
        infos.append(WorkerInfo(rank, dp_rank, dims.dp, is_collector, coords))
    return infos


def worker_info(mesh, rank: int = 0) -> WorkerInfo:
    """This process's WorkerInfo from its live named DeviceMesh (None: a single process)."""
    if mesh is None:
        return WorkerInfo(rank, 0, 1, True, {name: 0 for name in MESH_DIMS})
    names = mesh.mesh_dim_names or ()
    coords = {name: mesh.get_local_rank(name) for name in MESH_DIMS if name in names}
    size = {name: mesh.size(names.index(name)) for name in MESH_DIMS if name in names}
    dp_shard = size.get("dp_shard", 1)
    dp_rank = coords.get("dp_replicate", 0) * dp_shard + coords.get("dp_shard", 0)
    dp_size = size.get("dp_replicate", 1) * dp_shard
    is_collector = coords.get("tp", 0) == 0 and coords.get("pp", 0) == size.get("pp", 1) - 1
    return WorkerInfo(rank, dp_rank, dp_size, is_collector, coords)


def check_infos(infos: Sequence[WorkerInfo]) -> int:
    """The dp size of a consistent group: ranks 0..n-1 in order, one dp size, every dp rank held
    by some worker and collected by exactly one."""
    if not infos:
        raise ValueError("a worker group needs at least one worker")
    if [i.rank for i in infos] != list(range(len(infos))):
        raise ValueError(f"worker infos must be in rank order 0..{len(infos) - 1}, got {[i.rank for i in infos]}")
    dp_sizes = {i.dp_size for i in infos}
    if len(dp_sizes) != 1:
        raise ValueError(f"workers disagree on the dp size: {sorted(dp_sizes)}")
    dp_size = dp_sizes.pop()
    for d in range(dp_size):
        members = [i for i in infos if i.dp_rank == d]
        collectors = [i.rank for i in members if i.is_collector]
        if not members:
            raise ValueError(f"no worker holds dp rank {d} of {dp_size}")
        if len(collectors) != 1:
            raise ValueError(f"dp rank {d} must have exactly one collector, has ranks {collectors}")
    if any(not 0 <= i.dp_rank < dp_size for i in infos):
        raise ValueError(f"a dp rank is outside 0..{dp_size - 1}: {[i.dp_rank for i in infos]}")
    return dp_size


# --- the two pure functions -------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatched:
    """The inputs of one call: worker rank -> its input (only the ranks that run), and how many
    padding rows were added to the batch (collect removes them)."""

    inputs: dict[int, Any]
    pad: int = 0


def dispatch(mode: Union[Mode, str], data: Any, infos: Sequence[WorkerInfo]) -> Dispatched:
    """Split the driver's input across the group according to `mode`."""
    mode = _mode(mode, "dispatch")
    dp_size = check_infos(infos)
    world = len(infos)
    if mode is Mode.ONE_TO_ALL:
        return Dispatched({i.rank: data for i in infos})
    if mode is Mode.RANK_ZERO:
        return Dispatched({0: data})
    if mode is Mode.ALL_TO_ALL:
        if not isinstance(data, (list, tuple)) or len(data) != world:
            got = f"{type(data).__name__} of {len(data)}" if isinstance(data, (list, tuple)) else type(data).__name__
            raise ValueError(f"all_to_all needs one input per worker ({world}), got {got}")
        return Dispatched({i.rank: data[i.rank] for i in infos})
    if isinstance(data, Batch):
        padded, pad = data.pad_to_divisor(dp_size)
        chunks = padded.chunk(dp_size)
    elif isinstance(data, (list, tuple)):  # already one item per dp rank
        if len(data) != dp_size:
            raise ValueError(f"dp dispatch of a list needs one item per dp rank ({dp_size}), got {len(data)}")
        chunks, pad = list(data), 0
    else:
        raise TypeError(f"dp dispatch splits a Batch (or a list of one item per dp rank), got {type(data).__name__}")
    return Dispatched({i.rank: chunks[i.dp_rank] for i in infos}, pad)


def collect(mode: Union[Mode, str], outputs: Union[Mapping[int, Any], Sequence[Any]],
            infos: Sequence[WorkerInfo], pad: int = 0) -> Any:
    """Gather the workers' outputs (rank -> output, or a list in rank order) according to
    `mode`; a DP result has the dispatch's padding rows removed."""
    mode = _mode(mode, "collect")
    check_infos(infos)
    outputs = dict(outputs) if isinstance(outputs, Mapping) else dict(enumerate(outputs))
    if mode is Mode.RANK_ZERO:
        return _need(outputs, [0])[0]
    if mode in (Mode.ONE_TO_ALL, Mode.ALL_TO_ALL):
        return _need(outputs, [i.rank for i in infos])
    collectors = sorted((i for i in infos if i.is_collector), key=lambda i: i.dp_rank)
    parts = _need(outputs, [i.rank for i in collectors])
    if all(isinstance(p, Batch) for p in parts):
        return Batch.concat(parts).unpad(pad)
    if all(isinstance(p, torch.Tensor) for p in parts):
        out = torch.cat(parts)
        return out[:len(out) - pad]
    if pad:
        raise TypeError(f"a dp result of {type(parts[0]).__name__} cannot have its {pad} padding rows "
                        "removed: return a Batch or a tensor")
    return parts


def _need(outputs: dict[int, Any], ranks: list[int]) -> list[Any]:
    missing = [r for r in ranks if r not in outputs]
    if missing:
        raise ValueError(f"no output from worker rank(s) {missing}")
    return [outputs[r] for r in ranks]


def execute(workers: Sequence[Any], method: str, data: Any, infos: Optional[Sequence[WorkerInfo]] = None) -> Any:
    """Run a registered method across in-process workers: dispatch -> call each worker in rank
    order -> collect (the same steps a worker group's bound method takes, without a group)."""
    infos = list(infos) if infos is not None else [WorkerInfo(r, r, len(workers), True) for r in range(len(workers))]
    if len(infos) != len(workers):
        raise ValueError(f"{len(workers)} workers but {len(infos)} worker infos")
    contract = contract_of(getattr(type(workers[0]), method))
    if contract is None:
        raise ValueError(f"{type(workers[0]).__name__}.{method} has no @register contract")
    call = dispatch(contract.dispatch, data, infos)
    outputs = {rank: getattr(workers[rank], method)(x) for rank, x in call.inputs.items()}
    return collect(contract.collect, outputs, infos, pad=call.pad)


__all__ = ["Mode", "Contract", "register", "contract_of", "registered_methods", "WorkerInfo", "worker_infos",
           "worker_info", "check_infos", "Dispatched", "dispatch", "collect", "execute"]
