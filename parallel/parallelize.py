"""The composing step: apply each parallel technique to a model, in order, on one mesh.

torchtitan's order: pipeline split -> tensor parallel -> activation checkpointing -> data parallel
(FSDP2 / DDP), the last three on each model part this rank holds. DeepSpeed ZeRO wraps model and
optimizer together, so it comes after the optimizer is built (parallel/deepspeed_zero.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.activation_checkpoint import apply_ac
from parallel.data_parallel import apply_ddp, apply_fsdp
from parallel.pipeline import ChunksView, Pipeline, build_pipeline, split_model, stage_ids
from parallel.tensor import apply_tp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Parallelized(NamedTuple):
    model: Optional[nn.Module]  # what forward calls (possibly DDP-wrapped); None under pp > 1
    parts: list[nn.Module]  # the unwrapped module(s) whose parameters this rank owns, under their
    # whole-model FQNs (several pipeline chunks: one ChunksView); what optimizer and checkpoint take
    pipeline: Optional[Pipeline]  # runs forward+backward when pp > 1


def parallelize(model: nn.Module, mesh: Optional[DeviceMesh], parallel, precision: str = "fp32",
                loss_fn: Optional[Callable] = None) -> Parallelized:
    """`parallel` is a ParallelConfig-like object (pp, virtual_stages, schedule, microbatches, tp,
    sequence_parallel, dp_replicate, dp_shard, dp_backend, activation_checkpoint); `loss_fn` is
    what the last pipeline stage computes (needed when pp > 1)."""
    if mesh is None:
        return Parallelized(apply_ac(model, parallel.activation_checkpoint), [model], None)
    device = next(model.parameters()).device

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
        runnable.append(_apply_dp(part, mesh, parallel, precision))

    if parallel.pp > 1:
        pipeline = build_pipeline(runnable, chunks, pp_mesh, parallel.schedule, parallel.microbatches,
                                  loss_fn, device)
        return Parallelized(None, [parts[0] if len(parts) == 1 else ChunksView(parts)], pipeline)
    return Parallelized(runnable[0], parts, None)


def _apply_dp(part: nn.Module, mesh: DeviceMesh, parallel, precision: str) -> nn.Module:
    """FSDP2 shards `part` in place (returned as is); DDP returns a wrapper around it."""
    if parallel.dp_replicate * parallel.dp_shard == 1:
        return part
    if parallel.dp_backend == "deepspeed":  # wrapped with the optimizer, later: apply_deepspeed
        return part
    if parallel.dp_backend == "ddp":
        return apply_ddp(part, mesh["dp"])
    dp_mesh = mesh["dp_replicate", "dp_shard"] if parallel.dp_replicate > 1 else mesh["dp_shard"]
    return apply_fsdp(part, dp_mesh, DTYPES[precision], pipelined=parallel.pp > 1)
