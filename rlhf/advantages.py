"""Advantage estimators (PPO/GAE, GRPO, Dr. GRPO, RLOO, ReMax, REINFORCE++), looked up by
`task.advantage`. Each is a pure function of (batch, response_len) tensors returning
`(advantages, returns)`, both zero outside `response_mask`.

Shapes: `token_level_rewards`, `values`, `response_mask`: (B, T) over response tokens;
`index`: (B,) prompt ids (the responses to one prompt form a group); `reward_baselines`: (B,).
An outcome reward is a token-level reward that is non-zero on the last response token only, so the
sequence score is `token_level_rewards.sum(-1)`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from rlhf.masked import masked_whiten
from trainer.registry import Registry

ADVANTAGES: Registry[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = Registry("advantage estimator",
                                                                                    key="task.advantage")

GRPO_EPS = 1e-6  # verl's epsilon; TRL's GRPOTrainer adds 1e-4 to the std (pass eps=1e-4 to match it)


def group_ids(index: Any) -> torch.Tensor:
    """(B,) integer group ids from prompt ids of any kind (uid strings, ints, a tensor)."""
    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    _, inverse = np.unique(np.asarray(index).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def _group_stats(scores: torch.Tensor, index: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each response's group (size n, mean, unbiased std), gathered back to (B,)."""
    g = group_ids(index).to(scores.device)
    if len(g) != len(scores):
        raise ValueError(f"index has {len(g)} entries for {len(scores)} responses")
    groups = int(g.max()) + 1
    n = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add_(0, g, torch.ones_like(scores))
    total = torch.zeros_like(n).index_add_(0, g, scores)
    mean = total / n
    sq = torch.zeros_like(n).index_add_(0, g, (scores - mean[g]) ** 2)
    std = torch.sqrt(sq / (n - 1).clamp(min=1))
    return n[g], mean[g], std[g]


@ADVANTAGES.register("gae")
def gae(token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 1.0, whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t; returns R_t = A_t + V_t (Schulman 2016)."""
    mask = response_mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(values.shape[1])):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * last
        # a masked position (padding inside the response) is skipped: the next real token's
        # value and advantage carry over it
        next_value = mask[:, t] * values[:, t] + (1 - mask[:, t]) * next_value
        last = mask[:, t] * adv + (1 - mask[:, t]) * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = (advantages + values) * mask
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages * mask, returns


@ADVANTAGES.register("grpo")
def grpo(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any,
         norm_by_std: bool = True, eps: float = GRPO_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i − mean(r_group)) / (std(r_group) + ε), std unbiased; norm_by_std=False: A_i = r_i − mean (Dr. GRPO).

    A group of one response has no comparison: its advantage is 0."""
    scores = token_level_rewards.sum(-1)
    n, mean, std = _group_stats(scores, index)
    adv = scores - mean
    if norm_by_std:
        adv = adv / (std + eps)
    adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    advantages = adv.unsqueeze(-1) * response_mask
    return advantages, advantages


@ADVANTAGES.register("dr_grpo")
def dr_grpo(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = r_i − mean(r_group) (Liu et al. 2025, "Understanding R1-Zero-like training")."""
    return grpo(token_level_rewards, response_mask, index, norm_by_std=False)


@ADVANTAGES.register("rloo")
def rloo(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = r_i − 1/(n−1) Σ_{j≠i} r_j = n/(n−1)·(r_i − mean(r_group)) (Ahmadian et al. 2024).

    A group of one response has no leave-one-out baseline: its advantage is 0."""
    scores = token_level_rewards.sum(-1)
    n, mean, _ = _group_stats(scores, index)
    adv = torch.where(n > 1, n / (n - 1).clamp(min=1) * (scores - mean), torch.zeros_like(scores))
    advantages = adv.unsqueeze(-1) * response_mask
    return advantages, advantages


@ADVANTAGES.register("remax")
def remax(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
          reward_baselines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_t = Σ_{t'≥t} r_t' − r(greedy response) (Li et al. 2023, ReMax)."""
    returns = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
    advantages = (returns - reward_baselines.unsqueeze(-1)) * response_mask
    return advantages, returns


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0,
                 kl: Optional[torch.Tensor] = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A_t = whiten_batch(G_t), G_t = Σ_{t'≥t} γ^{t'−t} (r_t' − β·KL_t') (Hu 2025, REINFORCE++).

    Whitening runs over every response token of the batch given (the global batch: the driver
    computes advantages before dispatching)."""
    mask = response_mask.to(token_level_rewards.dtype)
    rewards = token_level_rewards if kl is None else token_level_rewards - kl_coef * kl
    rewards = rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    returns = returns * mask
    return masked_whiten(returns, mask) * mask, returns
