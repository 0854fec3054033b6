"""AdamW with decoupled weight decay on matrices only, and the warmup + decay LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import OptimConfig


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine: r + (1-r)·½(1+cos(π·t)) (or linear: 1-(1-r)·t), t∈[0,1]."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * t
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices; leave norms, biases and 1-D parameters undecayed (GPT-2, Llama)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(models: list[nn.Module], cfg: OptimConfig) -> torch.optim.Optimizer:
    """One AdamW over all model parts, with the same two groups however many parts a rank holds
    (so optimizer checkpoints line up across layouts)."""
    groups = [{"params": [], "weight_decay": cfg.weight_decay}, {"params": [], "weight_decay": 0.0}]
    for m in models:
        for group, part in zip(groups, param_groups(m, cfg.weight_decay)):
            group["params"] += part["params"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio),
    )
