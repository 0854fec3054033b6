"""Global gradient-norm clipping that works when parameters live on different meshes."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def by_mesh(params: Iterable[torch.nn.Parameter]) -> dict:
    """Parameters with gradients, grouped by their gradient's mesh (None: plain tensors). A foreach
    op takes one group, not a list mixing meshes or plain tensors with DTensors."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(mesh, []).append(p)
    return groups


def grad_norm(params: Iterable[torch.nn.Parameter], pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """‖g‖₂ = √(Σ_meshes ‖g_mesh‖²): one foreach norm and one reduction per mesh (FSDP and TP meshes
    may differ); summed across pipeline stages, which hold disjoint parameters, if `pp_group` is given."""
    total = torch.zeros((), dtype=torch.float32)
    for group in by_mesh(params).values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total = total.to(norm.device) + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float,
                   pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """gᵢ ← gᵢ · min(1, max_norm / ‖g‖₂); returns ‖g‖₂ before clipping (no host sync)."""
    norm = grad_norm(params, pp_group)
    if max_norm > 0:
        for group in by_mesh(params).values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
    return norm
