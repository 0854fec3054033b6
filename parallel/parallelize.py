"""The composing step: apply each parallel technique to a model, in order, on one mesh."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.data_parallel import apply_ddp, apply_fsdp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parallelize(model: nn.Module, mesh: Optional[DeviceMesh], parallel, precision: str = "fp32"
                ) -> tuple[nn.Module, list[nn.Module]]:
    """Returns (what forward calls, the model parts this rank owns).

    `parallel` is a ParallelConfig-like object (tp, pp, dp_replicate, dp_shard, dp_backend).
    """
    if mesh is None:
        return model, [model]
    if parallel.dp_replicate * parallel.dp_shard > 1:
        if parallel.dp_backend == "fsdp":
            dp_mesh = mesh["dp_replicate", "dp_shard"] if parallel.dp_replicate > 1 else mesh["dp_shard"]
            apply_fsdp(model, dp_mesh, DTYPES[precision])
        elif parallel.dp_backend == "ddp":
            return apply_ddp(model, mesh["dp"]), [model]
    return model, [model]
