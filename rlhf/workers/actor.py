"""The actor (trains; generates; recomputes log-probs) and the frozen reference policy."""

from __future__ import annotations

from typing import Any

import torch

from parallel.grad import clip_grad_norm
from rlhf.batch import Batch
from rlhf.dispatch import Mode, register
from rlhf.logprobs import response_logits, token_log_probs
from rlhf.losses import POLICY_LOSSES, LossScale, aggregate, kl
from rlhf.rollout import sample
from rlhf.workers.base import Worker

TEACHER_FORCED = ("input_ids", "attention_mask", "position_ids", "prompts", "responses")


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """Consecutive row slices of at most `size` rows (memory only: results never depend on it)."""
    return [batch[i:i + size] for i in range(0, len(batch), size)]


def sampling_seed(seed: int, iteration: int, dp_rank: int, stream: int = 0) -> int:
    """The generator seed of one dp rank's sampling in one iteration: every tp rank of the dp group
    draws the same tokens, and a resumed run redraws exactly what it would have (no saved state)."""
    return (seed * 1_000_003 + iteration * 9_973 + dp_rank * 101 + stream) % (2 ** 63)


def policy_gradients(model, batch: Batch, o, scale: LossScale, dp_size: int) -> dict[str, float]:
    """Backward of this part's share of the mini-batch policy loss (clipped surrogate − entropy
    bonus + KL loss, aggregated by `o.loss_agg_mode` over the WHOLE mini-batch's `scale`), one
    micro-batch at a time. Data-parallel reduction averages gradients over `dp_size` workers, so
    each share is scaled by it: the summed gradient is the mini-batch's, however it is split.
    Returns token-weighted metrics (a worker's share of the mini-batch's)."""
    policy_loss = POLICY_LOSSES.get("ppo_clip")
    stats: dict[str, float] = {}
    for mb in micro_batches(batch, o.responses_per_micro_batch):
        mask = mb["response_mask"]
        log_prob, entropy = token_log_probs(response_logits(model, mb), mb["responses"], o.temperature,
                                            with_entropy=o.entropy_coef > 0)
        loss_mat, m = policy_loss(log_prob, mb["old_log_probs"], mb["advantages"], mask,
                                  o.clip_ratio_low, o.clip_ratio_high, o.clip_ratio_c)
        if entropy is not None:
            loss_mat = loss_mat - o.entropy_coef * entropy
        if o.use_kl_loss:
            kl_mat = kl(log_prob, mb["ref_log_probs"], o.kl_estimator)
            loss_mat = loss_mat + o.kl_loss_coef * kl_mat
            m["kl_loss"] = float((kl_mat.detach() * mask).sum() / mask.sum().clamp(min=1))
        loss = aggregate(loss_mat, mask, o.loss_agg_mode, scale) * dp_size
        loss.backward()
        share = float(mask.sum()) / max(scale.num_tokens, 1) * dp_size  # this micro-batch's token weight
        m["pg_loss"] = float(loss.detach())
        for k, v in m.items():
            stats[k] = stats.get(k, 0.0) + (v if k == "pg_loss" else v * share)
    return stats


class ActorWorker(Worker):
    """The policy π_θ."""

    def load_initial_weights(self) -> None:
        if self.spec.options.init_from:
            self.load_model_component(self.spec.options.init_from)

    @torch.no_grad()
    def _log_probs(self, batch: Batch, key: str) -> Batch:
        o = self.spec.options
        self.model.eval()
        out, ent = [], []
        for mb in micro_batches(batch.select(*TEACHER_FORCED), o.responses_per_micro_batch):
            lp, h = token_log_probs(response_logits(self.model, mb), mb["responses"], o.temperature, with_entropy=True)
            out.append(lp)
            ent.append(h)
        return Batch({key: torch.cat(out).float().cpu(), "entropy": torch.cat(ent).float().cpu()})

    @register(Mode.DP)
    def generate(self, batch: Batch) -> Batch:
        """Sample one response per row of left-padded prompts (the driver repeats each prompt n times).
        meta: iteration, greedy (ReMax's baseline: temperature 0)."""
        o = self.spec.options
        greedy = bool(batch.meta.get("greedy", False))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sampling_seed(self.spec.seed, int(batch.meta["iteration"]), self.info.dp_rank, int(greedy)))
        self.model.eval()
        out = sample(self.model, batch["prompts"].to(self.device), o.max_new_tokens,
                     attention_mask=batch["prompt_mask"].to(self.device), temperature=0.0 if greedy else o.temperature,
                     top_k=o.top_k or None, top_p=o.top_p, eos_id=self.spec.eos_id, pad_id=self.spec.pad_id,
                     generator=gen)
        return out.to("cpu")

    @register(Mode.DP)
    def compute_log_prob(self, batch: Batch) -> Batch:
        """old_log_probs [B, R] (and entropy) of the responses under the current weights."""
        return self._log_probs(batch, "old_log_probs")

    @register(Mode.DP)
    def update_actor(self, batch: Batch) -> Batch:
        """One optimizer step on this worker's part of a mini-batch. meta["scale"]: the whole
        mini-batch's LossScale, so Σ over workers and micro-batches is the mini-batch's loss."""
        self.model.train()
        stats = policy_gradients(self.model, batch.to(self.device), self.spec.options,
                                 LossScale(**batch.meta["scale"]), self.info.dp_size)
        norm = clip_grad_norm([p for part in self.parts for p in part.parameters()], self.spec.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats["grad_norm"] = float(norm)
        return Batch({k: torch.tensor([v], dtype=torch.float64) for k, v in stats.items()})

    @register(Mode.ONE_TO_ALL)
    def parameter_bytes(self, _: Any = None) -> int:
        """This rank's resident parameter bytes (its shards)."""
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                   for p in self.model.parameters())


class ReferenceWorker(ActorWorker):
    """π_ref: the actor's initial weights, frozen."""

    trainable = False

    @register(Mode.DP)
    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        return self._log_probs(batch, "ref_log_probs").select("ref_log_probs")
