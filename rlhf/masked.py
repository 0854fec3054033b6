"""Statistics over the response tokens only (`response_mask` = 1 on tokens the policy produced):
the masked sum, mean, variance and whitening that advantages and losses share."""

from __future__ import annotations

from typing import Optional

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Σ m·x (over `dim`, or everything)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Σ m·x / Σ m."""
    count = mask.sum() if dim is None else mask.sum(dim)
    if dim is None and count == 0:
        raise ValueError("masked_mean over a mask with no tokens")
    return masked_sum(x, mask, dim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Σ m·(x − x̄)² / (Σ m − 1)  (Bessel-corrected, as verl), or / Σ m when unbiased=False."""
    count = mask.sum()
    if unbiased and count < 2:
        raise ValueError(f"an unbiased masked variance needs at least 2 tokens, got {int(count)}")
    mean = masked_mean(x, mask)
    return masked_sum((x - mean) ** 2, mask) / (count - 1 if unbiased else count)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − x̄) / √(Var[x] + ε) over the masked tokens (x̄ added back when shift_mean=False)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    return white if shift_mean else white + mean
