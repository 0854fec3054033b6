"""Language-model loss: mean token cross-entropy, -1/N sum_t log p(target_t | tokens_<t), in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose target is not `ignore_index`; logits upcast to float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)
