"""Sparse initialization (stream-x): LeCun-uniform weights U(±1/√fan_in), then a random
`sparsity` fraction of each output unit's inputs (each output channel's, for convolutions) set
to zero; biases zero."""

from __future__ import annotations

import math

import torch
from torch import nn


def sparse_init_(weight: torch.Tensor, sparsity: float = 0.9) -> torch.Tensor:
    """w ~ U(−1/√fan_in, 1/√fan_in); then ⌊sparsity·fan_in⌋ inputs of every output unit ← 0."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    rows = weight.shape[0]
    fan_in = weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    n_zero = int(sparsity * fan_in)  # floor: every unit keeps at least one input
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        flat = weight.view(rows, fan_in)
        for row in range(rows):
            flat[row, torch.randperm(fan_in)[:n_zero]] = 0.0
    return weight


def sparse_init_module_(module: nn.Module, sparsity: float = 0.9) -> nn.Module:
    """Sparse-initialize every Linear and Conv2d in `module` (biases to zero)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            sparse_init_(layer.weight, sparsity)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module
