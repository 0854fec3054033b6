"""The composing step: apply each parallel technique to a model, in order, on one mesh.

torchtitan's order: pipeline split -> tensor parallel -> activation checkpointing -> data parallel
(FSDP2 / DDP), the last three on each model part this rank holds, then -- for a model built on the
meta device -- allocation and initialisation of only what this rank holds (parallel/init.py). What
to shard and where to cut is the model's own plan (parallel/plan.py). DeepSpeed ZeRO wraps model
and optimizer together, so it comes after the optimizer is built (parallel/deepspeed_zero.py);
DDP broadcasts and ZeRO partitions weights that exist, so under them each rank materialises its
whole (pipeline-chunk of the) model before wrapping.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.activation_checkpoint import apply_ac
from parallel.data_parallel import apply_ddp, apply_fsdp
from parallel.init import draw_seed, is_meta, materialize
from parallel.pipeline import ChunksView, Pipeline, build_pipeline, split_model, stage_ids
from parallel.plan import is_wrapped, plan_holder
from parallel.tensor import apply_tp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DP_BACKENDS = ("fsdp", "ddp", "deepspeed")


class Parallelized(NamedTuple):
    model: Optional[nn.Module]  # what forward calls (possibly DDP-wrapped); None under pp > 1
    parts: list[nn.Module]  # the unwrapped module(s) whose parameters this rank owns, under their
    # whole-model FQNs (several pipeline chunks: one ChunksView); what optimizer and checkpoint take
    pipeline: Optional[Pipeline]  # runs forward+backward when pp > 1


def parallelize(model: nn.Module, mesh: Optional[DeviceMesh], parallel, precision: str = "fp32",
                loss_fn: Optional[Callable] = None, device: Optional[Union[str, torch.device]] = None,
                seed: Optional[int] = None) -> Parallelized:
    """`parallel` is a ParallelConfig-like object (pp, virtual_stages, schedule, microbatches, tp,
    sequence_parallel, dp_replicate, dp_shard, dp_backend, activation_checkpoint); `loss_fn` is
    what the last pipeline stage computes (needed when pp > 1).

    A model on the meta device (`build_model(cfg, device="meta")`) ends on `device` (default CPU),
    each rank holding and initialising its shards only, by parallel/init.py's rule from `seed`
    (None: one draw from torch's global generator); a materialised model is sharded as it is."""
    problem = parallelize_problem(model, mesh, parallel, loss_fn)
    if problem:
        raise ValueError(problem)
    meta = is_meta(model)
    if meta:
        device = torch.device("cpu" if device is None else device)
        seed = draw_seed() if seed is None else seed
    else:
        device = next(model.parameters()).device

    def init(part: nn.Module) -> None:
        if meta:
            materialize(part, device, seed)

    if mesh is None:
        apply_ac(model, parallel.activation_checkpoint)
        init(model)
        return Parallelized(model, [model], None)

    if parallel.pp > 1:
        pp_mesh = mesh["pp"]
        chunks = stage_ids(pp_mesh.get_local_rank(), parallel.pp, parallel.virtual_stages)
        parts = [split_model(model, c, parallel.pp * parallel.virtual_stages) for c in chunks]
    else:
        parts = [model]

    runnable = []
    for part in parts:
        if parallel.tp > 1:
            apply_tp(part, mesh["tp"], sequence_parallel=parallel.sequence_parallel)
        apply_ac(part, parallel.activation_checkpoint)
        if _fsdp(parallel):  # FSDP2 shards the meta parameters: each rank allocates its shard only
            apply_fsdp(part, _fsdp_mesh(mesh, parallel), DTYPES[precision], pipelined=parallel.pp > 1)
            init(part)
            runnable.append(part)
        else:  # DDP broadcasts, ZeRO partitions (later: apply_deepspeed) materialised weights
            init(part)
            runnable.append(apply_ddp(part, mesh["dp"]) if _ddp(parallel) else part)

    if parallel.pp > 1:
        pipeline = build_pipeline(runnable, chunks, pp_mesh, parallel.schedule, parallel.microbatches,
                                  loss_fn, device)
        return Parallelized(None, [parts[0] if len(parts) == 1 else ChunksView(parts)], pipeline)
    return Parallelized(runnable[0], parts, None)


def parallelize_problem(model: nn.Module, mesh: Optional[DeviceMesh], parallel,
                        loss_fn: Optional[Callable]) -> Optional[str]:
    """Why `parallelize` cannot apply `parallel` to `model` (what config validation cannot know:
    the model object itself), or None."""
    if parallel.dp_backend not in DP_BACKENDS:
        return f"parallel.dp_backend={parallel.dp_backend!r}; allowed: {', '.join(DP_BACKENDS)}"
    if mesh is not None and parallel.pp > 1 and loss_fn is None:
        return "parallel.pp > 1 needs loss_fn: the last pipeline stage computes the loss"
    return plan_problem(model, mesh, parallel)


def plan_problem(model: nn.Module, mesh: Optional[DeviceMesh], parallel) -> Optional[str]:
    """What the layout needs from the model that it does not declare (parallel/plan.py), or None."""
    holder = plan_holder(model)
    name = type(holder).__qualname__
    distributed = mesh is not None
    needs = [what for what, used in (("pipeline parallelism", distributed and parallel.pp > 1),
                                     ("FSDP", distributed and _fsdp(parallel)),
                                     ("activation checkpointing", parallel.activation_checkpoint != "none")) if used]
    if needs and not hasattr(holder, "stage_structure"):
        return (f"{name} declares no `stage_structure` (parallel/plan.py), which {' and '.join(needs)} "
                "need: the block list to split, shard or recompute")
    if distributed and parallel.tp > 1 and not hasattr(holder, "tp_plan"):
        return f"parallel.tp={parallel.tp}: {name} declares no `tp_plan(sequence_parallel)` (parallel/plan.py)"
    if is_meta(model) and not hasattr(holder, "init_param"):
        return (f"{name} is on the meta device but declares no `init_param(fqn, weight, generator)` "
                "(parallel/plan.py): build it materialised, or give it one")
    if distributed and is_wrapped(model) and (parallel.tp > 1 or parallel.pp > 1):
        return (f"parallel.tp={parallel.tp}, parallel.pp={parallel.pp} on a wrapped model "
                f"({type(model).__qualname__}, e.g. peft): its adapters replace the modules the TP plan "
                "and the pipeline split name; wrapped models run data-parallel only (dp_shard / "
                "dp_replicate with FSDP2, or DDP)")
    return None


def _fsdp(parallel) -> bool:
    return parallel.dp_backend == "fsdp" and parallel.dp_replicate * parallel.dp_shard > 1


def _ddp(parallel) -> bool:
    return parallel.dp_backend == "ddp" and parallel.dp_replicate * parallel.dp_shard > 1


def _fsdp_mesh(mesh: DeviceMesh, parallel) -> DeviceMesh:
    """FSDP over dp_shard, or HSDP over (dp_replicate, dp_shard)."""
    return mesh["dp_replicate", "dp_shard"] if parallel.dp_replicate > 1 else mesh["dp_shard"]
