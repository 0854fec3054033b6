"""Per-token log-probabilities, entropies and values of responses under teacher forcing.

The rollout's batches are left-padded (prompt | response). For teacher forcing each row is shifted
left so that it starts at its first real token: `TeacherForced.tokens` [B, W] is then right-padded,
positions are 0..W-1 and causal attention alone is exact (padding sits after every real token), so
every layout runs the model's plain training forward — pipeline stages and DeepSpeed included.
Per-position results [B, W-1] (position j predicts token j+1) map to and from the response
layout [B, R] with `to_responses` / `to_positions`.

Under tensor parallelism the logits are vocabulary-sharded DTensors: `loss_parallel` computes the
log-softmax with two small all-reduces (max, sum-exp) on the shards, so the full vocabulary is
never gathered (Megatron's vocab-parallel cross-entropy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from parallel.tensor import plain_tensor
from rlhf.batch import Batch


@dataclass
class TeacherForced:
    tokens: torch.Tensor  # [B, W] each row from its first real token, right-padded
    index: torch.Tensor   # [B, R] the position (of tokens[:, :-1]) whose output predicts response token t

    def to_responses(self, per_position: torch.Tensor) -> torch.Tensor:
        """[B, W-1] (or [B, W]) per-position values -> [B, R] at the response tokens."""
        return per_position.gather(1, self.index.to(per_position.device))

    def to_positions(self, per_response: torch.Tensor) -> torch.Tensor:
        """[B, R] -> [B, W-1], zero at positions that predict no response token."""
        out = per_response.new_zeros(self.tokens.shape[0], self.tokens.shape[1] - 1)
        return out.scatter(1, self.index.to(per_response.device), per_response)


def teacher_forced(batch: Batch) -> TeacherForced:
    """The right-padded view of a left-padded rollout batch (`prompts`, `prompt_mask`, `input_ids`)."""
    ids = batch["input_ids"]
    rows, width = ids.shape
    prompt_len, resp_len = batch["prompts"].shape[1], batch["responses"].shape[1]
    left = (~batch["prompt_mask"].bool()).sum(1)  # each row's left padding
    shift = (torch.arange(width)[None, :] + left[:, None]) % width  # padding rotates to the end
    tokens = ids.gather(1, shift.to(ids.device))
    index = (prompt_len - left - 1)[:, None] + torch.arange(resp_len)[None, :]
    return TeacherForced(tokens, index)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log π(y_j) = log_softmax(z_j / T)[y_j] for logits [B, L, V] and their target tokens [B, L];
    with `with_entropy`, also H_j = −Σ_v p_v log p_v. Differentiable. Vocabulary-sharded logits
    (DTensor) need `parallel.tensor.tp_loss_context(True)` around forward AND backward (the
    workers' `run_objective` holds it): the loss ops then run on the shards."""
    scaled = logits / temperature if temperature != 1.0 else logits
    nll = F.cross_entropy(scaled.flatten(0, 1), tokens.flatten(), reduction="none")
    entropy = None
    if with_entropy:
        logp = F.log_softmax(scaled, dim=-1)
        entropy = plain_tensor(-(logp.exp() * logp).sum(-1))
    return -plain_tensor(nll).view_as(tokens), entropy

