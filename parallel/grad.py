"""Global gradient-norm clipping that works when parameters live on different meshes."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def grad_norm(params: Iterable[torch.nn.Parameter], pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """‖g‖₂ over all parameters: each DTensor's norm is reduced on its own mesh, then summed
    (and across pipeline stages, which hold disjoint parameters, when `pp_group` is given)."""
    total = None
    for p in params:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total = norm**2 if total is None else total + norm**2
    if total is None:
        total = torch.zeros((), dtype=torch.float32)
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float,
                   pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Scale gradients by min(1, max_norm / ‖g‖₂); returns ‖g‖₂ before clipping."""
    norm = grad_norm(params, pp_group)
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm.item() + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm
