"""Global gradient-norm clipping that works when parameters live on different meshes."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def grad_norm(params: Iterable[torch.nn.Parameter], pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """‖g‖₂ = √(Σ‖gᵢ‖²): plain gradients in one foreach kernel; each DTensor's norm reduced on its
    own mesh (FSDP and TP meshes may differ); summed across pipeline stages if `pp_group` is given."""
    grads = [p.grad for p in params if p.grad is not None]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    total = torch.nn.utils.get_total_norm(plain, foreach=True) ** 2 if plain else None
    for g in grads:
        if isinstance(g, DTensor):
            sq = torch.linalg.vector_norm(g, dtype=torch.float32).full_tensor() ** 2
            total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float,
                   pp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """gᵢ ← gᵢ · min(1, max_norm / ‖g‖₂); returns ‖g‖₂ before clipping (no host sync)."""
    norm = grad_norm(params, pp_group)
    if max_norm > 0:
        # One foreach kernel per kind of gradient: plain tensors, and DTensors per mesh (a foreach
        # op refuses a list mixing plain tensors and DTensors, as under TP without FSDP).
        groups: dict = {}
        for p in params:
            if p.grad is not None:
                mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
                groups.setdefault(mesh, []).append(p)
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
    return norm
