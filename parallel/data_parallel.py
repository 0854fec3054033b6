"""Data parallelism: FSDP2 `fully_shard` on dp_shard (HSDP with dp_replicate) or DDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from parallel.plan import blocks_of


def mixed_precision(param_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Compute in `param_dtype`, reduce gradients in fp32 (torchtitan's default policy)."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32,
               pipelined: bool = False) -> nn.Module:
    """Shard each block (the model's `stage_structure`), then the root (embeddings, norm, head), over `mesh`.

    `mesh` is 1-D (dp_shard: FSDP) or 2-D (dp_replicate, dp_shard: HSDP). In a pipeline stage the
    blocks stay gathered between microbatches (torchtitan's policy): resharding after every
    microbatch's forward would all-gather them again for each one.
    """
    mp = mixed_precision(param_dtype)
    blocks = list(blocks_of(model).values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        reshard = not pipelined and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Replicate the model over a 1-D data-parallel mesh; gradients all-reduced in buckets."""
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model,
        process_group=mesh.get_group(),
        device_ids=[device.index] if device.type == "cuda" else None,
    )
