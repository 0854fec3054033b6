"""Idle colocated roles give their device memory back (HybridFlow's colocated pools; verl's
parameter and optimizer offload): a role's parameters, gradients and optimizer state move to host
memory while another role hosted by the same process runs, and back before its own next call."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

HOST = torch.device("cpu")


def _nbytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _moved_state(value) -> bool:
    return torch.is_tensor(value) and value.dim() > 0  # AdamW's scalar `step` stays where it is


def state_sizes(params: list[torch.Tensor], optimizer: Optional[torch.optim.Optimizer]) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes (its shards)."""
    states = optimizer.state.values() if optimizer is not None else []
    return {"params": sum(_nbytes(p) for p in params),
            "grads": sum(_nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_nbytes(v) for st in states for v in st.values() if _moved_state(v))}


def state_bytes(parts: Iterable[nn.Module], optimizer: Optional[torch.optim.Optimizer]) -> int:
    return sum(state_sizes([p for part in parts for p in part.parameters()], optimizer).values())


@torch.no_grad()
def move_state(parts: Iterable[nn.Module], optimizer: Optional[torch.optim.Optimizer], device: torch.device) -> int:
    """Every parameter (with its gradient and buffers) and optimizer-state tensor onto `device`;
    returns the bytes moved. Parameters keep their identity (the optimizer's references stay
    valid; FSDP2 re-points its sharded storage after `_apply`). On a host that is its own device
    each move is a fresh copy: nothing is saved, but the mechanism runs as it would on a GPU."""
    parts = list(parts)
    copy = all(p.device == device for part in parts for p in part.parameters())
    moved = state_bytes(parts, optimizer)
    for part in parts:
        part._apply(lambda t: t.to(device, copy=copy))
    if optimizer is not None:
        for st in optimizer.state.values():
            for key, value in st.items():
                if _moved_state(value):
                    st[key] = value.to(device, copy=copy)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the idle role held goes back to the allocator's pool
    return moved


class Offloader:
    """One worker's state between its device and host memory, with the bytes moved each way."""

    def __init__(self, worker):
        self.worker, self.on_host, self.moved = worker, False, 0

    def reason_not(self) -> Optional[str]:
        w = self.worker
        if w.engine is not None:
            return "DeepSpeed keeps its own partitions (use its offload_optimizer)"
        if getattr(w, "hybrid", None) is not None:
            return "its training shards live inside the generation buffers (task.rollout_tp)"
        return None

    def offload(self) -> int:
        if self.on_host or not self.worker.parts or self.reason_not():  # not built yet, or pinned
            return 0
        self.on_host = True
        moved = move_state(self.worker.parts, self.worker.optimizer, HOST)
        self.moved += moved
        return moved

    def onload(self) -> int:
        if not self.on_host:
            return 0
        self.on_host = False
        moved = move_state(self.worker.parts, self.worker.optimizer, self.worker.device)
        self.moved += moved
        return moved
