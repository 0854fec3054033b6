"""Per-token log-probabilities and entropies of responses under teacher forcing.

Under tensor parallelism the logits are vocabulary-sharded DTensors: `loss_parallel` computes the
log-softmax with two small all-reduces (max, sum-exp) on the shards, so the full vocabulary is
never gathered (Megatron's vocab-parallel cross-entropy)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.tensor import plain_tensor, tp_loss_context
from rlhf.batch import Batch


def response_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The logits that predict each response token: positions P-1 .. P+R-2 of prompt + response."""
    prompt_len, resp_len = batch["prompts"].shape[1], batch["responses"].shape[1]
    logits = model(batch["input_ids"], positions=batch["position_ids"], attention_mask=batch["attention_mask"])
    return logits[:, prompt_len - 1:prompt_len + resp_len - 1]


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log π(y_t | y_<t) = log_softmax(z_t / T)[y_t] for logits [B, R, V] (plain or vocab-sharded)
    and tokens [B, R]; with `with_entropy`, also H_t = −Σ_v p_v log p_v. Differentiable."""
    vocab_parallel = isinstance(logits, DTensor)
    scaled = logits / temperature if temperature != 1.0 else logits
    with tp_loss_context(vocab_parallel):
        nll = F.cross_entropy(scaled.flatten(0, 1), tokens.flatten(), reduction="none")
        entropy = None
        if with_entropy:
            logp = F.log_softmax(scaled, dim=-1)
            entropy = plain_tensor(-(logp.exp() * logp).sum(-1))
    return -plain_tensor(nll).view_as(tokens), entropy
