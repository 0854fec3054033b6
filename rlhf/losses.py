"""Policy, value, entropy and KL losses of PPO-family RLHF, and loss aggregation defined over the
WHOLE mini-batch.

Every loss here is a (B, T) per-token matrix; `aggregate` turns it into the scalar to backward.
Its normaliser (`LossScale`: total response tokens, number of sequences, max response length)
is computed once over the global mini-batch and passed to every part, so a part's loss is its
exact share of the global loss: summing the parts' gradients (micro-batches accumulated, data-
parallel workers all-reduced with SUM) gives the gradient of the whole mini-batch, however it was
split. (DDP and FSDP average gradients over dp ranks: multiply each worker's loss by dp size.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlhf.masked import masked_mean
from trainer.errors import ConfigError
from trainer.registry import Registry

POLICY_LOSSES: Registry[Callable] = Registry("policy loss", key="task.policy_loss")
KL_ESTIMATORS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry(
    "KL estimator", key="task.kl_estimator")
LOSS_AGG_MODES: Registry[Callable] = Registry("loss aggregation mode", key="task.loss_agg_mode")


# --- aggregation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossScale:
    """The normalisers of one global mini-batch (never of a micro-batch or one worker's part)."""

    num_tokens: int           # Σ response_mask over the mini-batch
    num_seqs: int             # responses in the mini-batch
    max_response_length: int  # L of seq-mean-token-sum-norm: the configured max, constant over training


def loss_scale(response_mask: torch.Tensor, max_response_length: Optional[int] = None) -> LossScale:
    """The LossScale of a global mini-batch (L defaults to the mask's width)."""
    length = response_mask.shape[-1] if max_response_length is None else max_response_length
    if length < response_mask.shape[-1]:
        raise ConfigError(f"max_response_length={length} is shorter than the responses ({response_mask.shape[-1]} tokens)")
    return LossScale(int(response_mask.sum().item()), int(response_mask.shape[0]), int(length))


@LOSS_AGG_MODES.register("token-mean")
def token_mean(loss_mat: torch.Tensor, response_mask: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """Σ_{i,t} m_it ℓ_it / N_tokens  (TRL loss_type="dapo", verl token-mean)."""
    if scale.num_tokens == 0:
        raise ValueError("token-mean over a mini-batch with no response tokens")
    return (loss_mat * response_mask).sum() / scale.num_tokens


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def seq_mean_token_mean(loss_mat: torch.Tensor, response_mask: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """Σ_i (Σ_t m_it ℓ_it / Σ_t m_it) / N_seqs  (TRL loss_type="grpo", verl seq-mean-token-mean)."""
    per_seq = (loss_mat * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
    return per_seq.sum() / scale.num_seqs


@LOSS_AGG_MODES.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_mat: torch.Tensor, response_mask: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """Σ_{i,t} m_it ℓ_it / (N_seqs · L)  (TRL loss_type="dr_grpo", Dr. GRPO's constant normaliser)."""
    return (loss_mat * response_mask).sum() / (scale.num_seqs * scale.max_response_length)


def aggregate(loss_mat: torch.Tensor, response_mask: torch.Tensor, mode: str, scale: LossScale) -> torch.Tensor:
    """This part's share of the mini-batch loss under `mode` (task.loss_agg_mode)."""
    return LOSS_AGG_MODES.get(mode)(loss_mat, response_mask.to(loss_mat.dtype), scale)


# --- policy loss ------------------------------------------------------------------------------


def _check_clip(clip_ratio_low: float, clip_ratio_high: float, clip_ratio_c: Optional[float]) -> None:
    if not 0 <= clip_ratio_low < 1:
        raise ConfigError(f"task.clip_ratio_low={clip_ratio_low!r} is out of range; allowed: 0 <= x < 1")
    if clip_ratio_high < 0:
        raise ConfigError(f"task.clip_ratio_high={clip_ratio_high!r} is out of range; allowed: x >= 0")
    if clip_ratio_c is not None and clip_ratio_c <= 1:
        raise ConfigError(f"task.clip_ratio_c={clip_ratio_c!r} is out of range; allowed: a number > 1 (or null: no dual-clip)")


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
             response_mask: torch.Tensor, clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2,
             clip_ratio_c: Optional[float] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ℓ = max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), and for A<0 min(ℓ, −c·A) (dual-clip, Ye et al. 2020); ρ = π/π_old.

    Returns the per-token loss and metrics over this part's response tokens (clip fractions)."""
    _check_clip(clip_ratio_low, clip_ratio_high, clip_ratio_c)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    loss = torch.maximum(unclipped, clipped)
    mask = response_mask.to(loss.dtype)
    metrics = {"clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), mask).item(),
               "ppo_kl": masked_mean(old_log_prob - log_prob, mask).item()}
    if clip_ratio_c is not None:
        floor = -advantages * clip_ratio_c
        dual = (advantages < 0) & (loss > floor)
        loss = torch.where(dual, floor, loss)
        metrics["clipfrac_dual"] = masked_mean(dual.to(loss.dtype), mask).item()
    return loss, metrics


# --- value and entropy ------------------------------------------------------------------------


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_range: Optional[float] = 0.2) -> torch.Tensor:
    """ℓ = ½·max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)  (PPO2's clipped value loss; None: ½(V − R)²)."""
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * unclipped
    if clip_range <= 0:
        raise ConfigError(f"task.cliprange_value={clip_range!r} is out of range; allowed: a number > 0 (or null)")
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * torch.maximum(unclipped, (clipped_values - returns) ** 2)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) − Σ_v softmax(z)_v z_v per token (add −coef·aggregate(H) to the loss as a bonus)."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


# --- KL to the reference ----------------------------------------------------------------------


@KL_ESTIMATORS.register("k1")
def kl_k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k1 = log π/π_ref  (unbiased, high variance; Schulman 2020, "Approximating KL divergence")."""
    return log_prob - ref_log_prob


@KL_ESTIMATORS.register("k2")
def kl_k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π/π_ref)²  (biased, low variance; its gradient is the true KL's)."""
    return 0.5 * (log_prob - ref_log_prob) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k3 = π_ref/π − 1 − log(π_ref/π)  (unbiased, low variance, ≥ 0; verl's low_var_kl without its clamp)."""
    log_r = ref_log_prob - log_prob
    return torch.exp(log_r) - 1 - log_r


def kl(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """The per-token KL estimate named by task.kl_estimator."""
    return KL_ESTIMATORS.get(estimator)(log_prob, ref_log_prob)


def kl_penalty_reward(token_level_scores: torch.Tensor, log_prob: torch.Tensor, ref_log_prob: torch.Tensor,
                      response_mask: torch.Tensor, kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """r_t = s_t − β·KL_t on response tokens (KL as a reward penalty, Ziegler et al. 2019)."""
    if kl_coef < 0:
        raise ConfigError(f"task.kl_coef={kl_coef!r} is out of range; allowed: a number >= 0")
    return (token_level_scores - kl_coef * kl(log_prob, ref_log_prob, estimator)) * response_mask
