"""What each role computes from its network's output on a teacher-forced batch, as functions of
(output, packed target): the form a pipeline's last stage calls them in, so one definition serves
every layout. Targets are packed per position [B, W-1, channels] (rlhf/logprobs.py's layout)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from rlhf.logprobs import token_log_probs
from rlhf.losses import POLICY_LOSSES, LossScale, aggregate, kl, value_loss

POLICY = ("target", "mask", "old_log_probs", "advantages", "ref_log_probs")
VALUE = ("mask", "old_values", "returns")


def pack(*channels: torch.Tensor) -> torch.Tensor:
    """Per-position channels [B, L] -> one float tensor [B, L, C] (token ids stay exact below 2^24)."""
    return torch.stack([c.float() for c in channels], dim=-1)


class StagedObjective:
    """The loss function a pipeline is built with; each call sets what it computes (`fn`)."""

    def __init__(self):
        self.fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(output, target)


def policy_objective(o, scale: LossScale, dp_size: int, stats: dict[str, float]) -> Callable:
    """Clipped surrogate − entropy bonus + KL loss on the positions that predict response tokens,
    aggregated by `o.loss_agg_mode` over the WHOLE mini-batch's `scale` and multiplied by the dp size
    (data-parallel reduction averages): summed over workers and micro-batches it is the mini-batch's
    loss, however it is split. Adds token-weighted metrics to `stats`."""
    policy_loss = POLICY_LOSSES.get("ppo_clip")

    def objective(logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        target, mask, old, adv, ref = (packed[..., i] for i in range(len(POLICY)))
        log_prob, entropy = token_log_probs(logits[:, :-1], target.long(), o.temperature,
                                            with_entropy=o.entropy_coef > 0)
        if not bool(mask.any()):  # a pipeline microbatch of padding rows: nothing to learn, still a graph
            return (log_prob * mask).sum()
        loss_mat, m = policy_loss(log_prob, old, adv, mask, o.clip_ratio_low, o.clip_ratio_high, o.clip_ratio_c)
        if entropy is not None:
            loss_mat = loss_mat - o.entropy_coef * entropy
        if o.use_kl_loss:
            kl_mat = kl(log_prob, ref, o.kl_estimator)
            loss_mat = loss_mat + o.kl_loss_coef * kl_mat
            m["kl_loss"] = float((kl_mat.detach() * mask).sum() / mask.sum().clamp(min=1))
        loss = aggregate(loss_mat, mask, o.loss_agg_mode, scale) * dp_size
        share = float(mask.sum()) / max(scale.num_tokens, 1) * dp_size  # this part's token weight
        m["pg_loss"] = float(loss.detach())
        for k, v in m.items():
            stats[k] = stats.get(k, 0.0) + (v if k == "pg_loss" else v * share)
        return loss

    return objective


def log_prob_objective(temperature: float, out: list) -> Callable:
    """Forward only: append (log-probs, entropy) [B, W-1] of target tokens to `out`."""

    @torch.no_grad()
    def objective(logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        lp, ent = token_log_probs(logits[:, :-1], packed[..., 0].long(), temperature, with_entropy=True)
        out.append((lp.float(), ent.float()))
        return lp.new_zeros(())

    return objective


def values_objective(out: list) -> Callable:
    """Forward only: append the value head's outputs [B, W] to `out`."""

    @torch.no_grad()
    def objective(values: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        out.append(values.float())
        return values.new_zeros(())

    return objective


def value_objective(o, scale: LossScale, dp_size: int, stats: dict[str, float]) -> Callable:
    """The clipped value loss at the response positions, aggregated like the policy loss."""

    def objective(values: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        mask, old, returns = (packed[..., i] for i in range(len(VALUE)))
        vpred = values[:, :-1].float()
        loss = aggregate(value_loss(vpred, old, returns, o.cliprange_value), mask, o.loss_agg_mode, scale) * dp_size
        stats["vf_loss"] = stats.get("vf_loss", 0.0) + float(loss.detach())
        return loss

    return objective
