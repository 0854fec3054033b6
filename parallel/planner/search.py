"""Layout search: every candidate layout for a device count, each costed (memory.py,
step_time.py) and ranked, those that fit first."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from parallel.planner.layout import AC_MODES, Hardware, Layout, Workload
from parallel.planner.memory import MemoryEstimate, bubble_fraction, memory_per_device
from parallel.planner.step_time import StepTime, group_bandwidth, step_time

# --- ranking ------------------------------------------------------------------------------------

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(n_layers: int, devices: int, gpus_per_node: int, batch_size: int,
                      microbatch_sizes: Iterable[int] = (1, 2, 4, 8)) -> Iterable[Layout]:
    """Every (tp | gpus_per_node, pp, dp_replicate x dp_shard, data-parallel backend, schedule,
    virtual stages splitting the layers evenly, microbatch size, sequence parallelism, recomputation)
    for `devices`; pp = 1 accumulates gradients over the microbatches, pp > 1 pipelines them.
    Unchecked: the caller's `problem` rejects what trainer/config.py would (DDP and DeepSpeed are
    only proposed without tp, pp and dp_replicate, which Plait refuses, to keep the search small)."""
    for tp in divisors(math.gcd(devices, gpus_per_node)):
        for pp in divisors(devices // tp):
            if pp > n_layers:
                continue
            dp = devices // (tp * pp)
            if batch_size % dp:
                continue
            local = batch_size // dp
            schedules = [("1f1b", 1)] if pp == 1 else \
                [("1f1b", 1), ("gpipe", 1)] + [("interleaved_1f1b", v) for v in divisors(n_layers // pp)[1:]
                                               if n_layers % (pp * v) == 0]
            for dp_shard in divisors(dp):
                backends = [("fsdp", 1)]
                if dp_shard == dp > 1 and tp == pp == 1:
                    backends += [("ddp", 1)] + [("deepspeed", z) for z in (1, 2, 3)]
                for backend, zero in backends:
                    for schedule, v in schedules:
                        for b in microbatch_sizes:
                            if local % b:
                                continue
                            m, accum = (1, local // b) if pp == 1 else (local // b, 1)
                            for sp in (False, True) if tp > 1 else (False,):
                                for ac in AC_MODES:
                                    yield Layout(pp=pp, dp_replicate=dp // dp_shard, dp_shard=dp_shard, tp=tp,
                                                 virtual_stages=v, microbatches=m, schedule=schedule,
                                                 sequence_parallel=sp, dp_backend=backend, zero_stage=zero,
                                                 activation_checkpoint=ac, grad_accum=accum)


@dataclass
class Plan:
    """One ranked layout: its estimates and whether it fits."""

    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    fits: bool
    bubble: float
    notes: list[str] = field(default_factory=list)


def communication_notes(layout: Layout, hw: Hardware) -> list[str]:
    """Which groups cross nodes (TP should not: Megatron-LM §3.3 keeps it on NVLink)."""
    notes = []
    if layout.tp > 1:
        notes.append("tp in node" if layout.tp <= hw.gpus_per_node else "tp ACROSS NODES")
    if layout.pp > 1 and group_bandwidth(layout.pp, layout.dp * layout.tp, hw) == hw.inter_node_bw:
        notes.append("pp across nodes")
    if layout.dp > 1:
        inner = layout.dp_shard if layout.fsdp else layout.dp
        where = "in node" if inner * layout.tp <= hw.gpus_per_node else "across nodes"
        backend = {"fsdp": "fsdp", "ddp": "ddp", "deepspeed": f"zero{layout.zero_stage}"}[layout.dp_backend]
        notes.append(f"{backend} {where}")
    return notes


def evaluate(model, layout: Layout, work: Workload, hw: Hardware, flops_per_token: float) -> Plan:
    """Memory (the worst pipeline rank), step time, bubble and fit (of the step's peak and of the
    start-up peak) of one layout."""
    memory = memory_per_device(model, layout, work, hw)
    return Plan(layout=layout, memory=memory, time=step_time(model, layout, work, hw, flops_per_token),
                fits=max(memory.peak, memory.startup) <= hw.memory_bytes * (1 - hw.headroom),
                bubble=bubble_fraction(layout.schedule, layout.pp, layout.virtual_stages, layout.microbatches),
                notes=communication_notes(layout, hw))


def rank_layouts(model, devices: int, work: Workload, hw: Hardware, flops_per_token: float,
                 problem: Callable[[Layout], Optional[str]] = lambda layout: None,
                 layouts: Optional[Iterable[Layout]] = None) -> list[Plan]:
    """Valid layouts (`problem(layout)` is None), those that fit first, by step-time proxy then
    peak memory; then those that do not, closest to fitting first. `problem` is where the config
    rules come in (the CLI passes trainer/config.py's check_combinations)."""
    if layouts is None:
        layouts = candidate_layouts(model.n_layers, devices, hw.gpus_per_node, work.batch_size)
    plans = [evaluate(model, lay, work, hw, flops_per_token) for lay in layouts if problem(lay) is None]
    return sorted(plans, key=lambda p: (0, p.time.total, p.memory.peak) if p.fits else (1, p.memory.peak, 0))
