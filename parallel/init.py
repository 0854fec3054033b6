"""Layout-invariant initialisation of a model built on the meta device and already parallelized
(torchtitan's order: meta model -> pipeline split, TP, AC, FSDP -> `to_empty(device)` -> init).

The rule: parameter `fqn` (its checkpoint name, e.g. `layers.3.attention.wq.weight`) is drawn
whole, by the model's `init_param(fqn, weight, generator)`, from a generator of the parameter's
device type seeded with `param_seed(seed, fqn)`, and this rank keeps only the shard it holds
(cut locally, no communication). So the same seed gives the same global weights on every layout
(one process, FSDP, TP, pipeline chunks, any mix) of one device type, and a rank's start-up peak
is its shards plus one whole parameter (the largest), never the whole model.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from parallel.activation_checkpoint import unwrapped_fqn
from parallel.plan import plan_holder


def param_seed(seed: int, fqn: str) -> int:
    """seed_p = (seed · 1_000_003 + crc32(fqn)) mod 2⁶³: the same on every rank, layout and run."""
    return (seed * 1_000_003 + zlib.crc32(fqn.encode())) % 2**63


def draw_seed() -> int:
    """A seed from torch's global generator: what `torch.manual_seed(s)` before a build decides."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the whole tensor `full` that `like` holds, as a view (no copy): all of it for a
    plain tensor; for a DTensor the block at its global offset, for any placements (FSDP x TP's
    strided ones too: each rank's shard is still one block). DTensor's own `distribute_tensor(...,
    src_data_rank=None)` gives the same values but copies (2-3 whole tensors under FSDP x TP);
    tests/parallel/test_parallel_init.py pins the two against each other."""
    if not isinstance(like, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


@torch.no_grad()
def init_params(module: nn.Module, seed: int) -> None:
    """Every parameter of `module` by the rule above, one whole parameter alive at a time."""
    holder = plan_holder(module)
    for name, param in module.named_parameters():
        fqn = unwrapped_fqn(name)
        local = param.to_local() if isinstance(param, DTensor) else param
        full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
        generator = torch.Generator(device=full.device).manual_seed(param_seed(seed, fqn))
        holder.init_param(fqn, full, generator)
        local.copy_(local_shard(full, param))
        del full


def materialize(module: nn.Module, device: torch.device, seed: Optional[int] = None) -> nn.Module:
    """Allocate `module`'s (local) parameters and buffers on `device`, then initialise them:
    parameters by `init_params`, derived buffers by the model's `init_buffers()`. `seed` None:
    `draw_seed()`."""
    module.to_empty(device=device)
    init_params(module, draw_seed() if seed is None else seed)
    plan_holder(module).init_buffers()
    return module
