"""Losses of the model heads: the language model's mean token cross-entropy, -1/N Σ_t log p(target_t | tokens_<t),
and a value head's mean squared error; both in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose target is not `ignore_index`; logits upcast to float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


def value_loss(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a value head, 1/N Σ_t (v_t - R_t)², in float32 (a critic's regression loss)."""
    return F.mse_loss(values.float(), targets.float())
