"""The single controller (HybridFlow §4): one RLHF iteration as a plain loop over worker-group
calls, each of which runs SPMD inside its group.

    batch   = prompts × n                           # driver
    batch  |= actor.generate(batch)                 # rollout
    batch  |= actor.compute_log_prob(batch)         # } independent:
    batch  |= reference.compute_ref_log_prob(batch) # } they overlap on
    batch  |= critic.compute_values(batch)          # } separate groups
    scores  = reward(batch)                         # rule or reward model
    A, R    = estimator(scores, ...)                # driver (pure functions)
    for epoch, mini-batch:  critic.update_critic(mb); actor.update_actor(mb)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from rlhf.advantages import ADVANTAGES
from rlhf.batch import Batch
from rlhf.data.prompts import PromptLoader, Vocabulary, prompt_batch
from rlhf.groups.base import WorkerGroup
from rlhf.losses import kl, kl_penalty_reward, loss_scale
from rlhf.masked import masked_mean
from rlhf.workers.actor import TEACHER_FORCED

CRITIC_ALGORITHMS = ("ppo",)


def needs_reference(o) -> bool:
    return bool(o.use_kl_loss or o.kl_in_reward or o.algorithm == "reinforce_pp")


def needs_critic(o) -> bool:
    return o.algorithm in CRITIC_ALGORITHMS


def outcome_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A sequence score placed on its response's last token (token-level scores [B, R])."""
    last = response_mask.long().sum(-1).clamp(min=1) - 1
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    out[torch.arange(len(scores)), last] = scores.float()
    return out * response_mask


@dataclass
class StageTimer:
    seconds: dict = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class RLHFDriver:
    """The algorithm of `task.algorithm` over the role groups (`actor`, and `reference`, `critic`,
    `reward_model` where the algorithm and options need them)."""

    def __init__(self, o, groups: dict[str, WorkerGroup], vocab: Vocabulary, loader: PromptLoader,
                 heldout: list[dict], reward_fn: Optional[Callable], kl_ctrl, seed: int):
        self.o, self.groups, self.vocab, self.loader = o, groups, vocab, loader
        self.heldout, self.reward_fn, self.kl_ctrl, self.seed = heldout, reward_fn, kl_ctrl, seed

    # --- stages -----------------------------------------------------------------------------------

    def rollout(self, iteration: int) -> Batch:
        records = self.loader.next()
        prompts = prompt_batch(records, self.vocab, uid_offset=(self.loader.drawn - len(records)))
        prompts = prompts.repeat_interleave(self.o.samples_per_prompt)
        prompts.meta.update(iteration=iteration)
        out = self.groups["actor"].generate(prompts.select("prompts", "prompt_mask"))
        return Batch(out.tensors, prompts.non_tensors, {"iteration": iteration})

    def decode(self, batch: Batch) -> list[str]:
        return [self.vocab.decode_response(r[m].tolist()) for r, m in zip(batch["responses"], batch["response_mask"])]

    def score(self, batch: Batch) -> torch.Tensor:
        if "reward_model" in self.groups:
            return self.groups["reward_model"].compute_rm_score(batch)["rm_scores"]
        texts = self.decode(batch)
        return torch.tensor([self.reward_fn(p, r, a) for p, r, a in
                             zip(batch["prompt_text"], texts, batch["answer"])], dtype=torch.float32)

    def greedy_baseline(self, batch: Batch, iteration: int) -> torch.Tensor:
        """ReMax: the reward of each prompt's greedy response, repeated over its samples."""
        n = self.o.samples_per_prompt
        firsts = batch[torch.arange(0, len(batch), n)]
        prompts = Batch(firsts.select("prompts", "prompt_mask").tensors, firsts.non_tensors,
                        {"iteration": iteration, "greedy": True})
        out = self.groups["actor"].generate(prompts.select("prompts", "prompt_mask"))
        greedy = Batch(out.tensors, firsts.non_tensors)
        return self.score(greedy).repeat_interleave(n)

    def advantages(self, batch: Batch, token_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o, mask = self.o, batch["response_mask"]
        estimator = ADVANTAGES.get(o.algorithm if o.algorithm != "ppo" else "gae")
        if o.algorithm == "ppo":
            return estimator(token_rewards, batch["values"], mask, gamma=o.gamma, lam=o.lam)
        if o.algorithm == "grpo":
            return estimator(token_rewards, mask, batch["uid"], norm_by_std=o.norm_adv_by_std)
        if o.algorithm == "rloo":
            return estimator(token_rewards, mask, batch["uid"])
        if o.algorithm == "remax":
            return estimator(token_rewards, mask, batch["reward_baselines"])
        return estimator(token_rewards, mask, gamma=o.gamma, kl=batch["kl"], kl_coef=self.kl_ctrl.value)

    def update(self, batch: Batch, iteration: int) -> dict[str, float]:
        """Every epoch: a seeded shuffle, then one update of each trained role per mini-batch."""
        o, rows = self.o, len(batch)
        size = o.prompts_per_minibatch * o.samples_per_prompt
        fields = [*TEACHER_FORCED, "response_mask", "old_log_probs", "advantages"] + \
            (["ref_log_probs"] if o.use_kl_loss else [])
        stats: dict[str, list[float]] = {}
        for epoch in range(o.epochs_per_iteration):
            order = torch.from_numpy(np.random.default_rng([self.seed, iteration, epoch]).permutation(rows))
            for start in range(0, rows, size):
                mb = batch[order[start:start + size]]
                scale = loss_scale(mb["response_mask"], o.max_new_tokens).__dict__
                if "critic" in self.groups:
                    critic_mb = mb.select(*TEACHER_FORCED, "response_mask", "values", "returns")
                    critic_mb.meta["scale"] = scale
                    _collect(stats, self.groups["critic"].update_critic(critic_mb))
                actor_mb = mb.select(*fields)
                actor_mb.meta["scale"] = scale
                _collect(stats, self.groups["actor"].update_actor(actor_mb))
        return {f"actor/{k}" if not k.startswith(("vf_", "critic_")) else f"critic/{k}": float(np.mean(v))
                for k, v in stats.items()}

    # --- one iteration ----------------------------------------------------------------------------

    def step(self, iteration: int) -> dict[str, float]:
        o, g, timer = self.o, self.groups, StageTimer()
        start = time.perf_counter()
        with timer("generate"):
            batch = self.rollout(iteration)
        mask = batch["response_mask"]
        # independent reads of the same batch: on Ray they run at the same time
        view = batch.select(*TEACHER_FORCED)
        with timer("log_prob_ref_values"):
            old = g["actor"].compute_log_prob.future(view)
            ref = g["reference"].compute_ref_log_prob.future(view) if "reference" in g else None
            values = g["critic"].compute_values.future(view) if "critic" in g else None
            batch = batch.union(old.result().select("old_log_probs"))
            entropy = old.result()["entropy"]
            if ref is not None:
                batch = batch.union(ref.result())
            if values is not None:
                batch = batch.union(values.result())
        with timer("reward"):
            scores = self.score(batch)
            if o.algorithm == "remax":
                batch = batch.union(Batch({"reward_baselines": self.greedy_baseline(batch, iteration)}))
        with timer("advantage"):
            token_scores = outcome_rewards(scores, mask)
            metrics = {}
            if "reference" in g:
                kl_mat = kl(batch["old_log_probs"], batch["ref_log_probs"], "k1") * mask
                metrics["kl"] = float(masked_mean(kl_mat, mask))
                batch = batch.union(Batch({"kl": kl_mat}))
            token_rewards = token_scores
            if o.kl_in_reward:
                token_rewards = kl_penalty_reward(token_scores, batch["old_log_probs"], batch["ref_log_probs"], mask,
                                                  self.kl_ctrl.value, o.kl_estimator)
                self.kl_ctrl.update(metrics["kl"], len(batch))
            adv, returns = self.advantages(batch, token_rewards)
            batch = batch.union(Batch({"advantages": adv.float(), "returns": returns.float()}))
        with timer("update"):
            metrics.update(self.update(batch, iteration))
        seconds = time.perf_counter() - start
        tokens = int(batch["attention_mask"].sum())
        mismatch = (batch["log_probs"] - batch["old_log_probs"]).abs()[mask]
        metrics.update({
            "reward": float(scores.mean()), "accuracy": float((scores >= 1.0).float().mean()),
            "entropy": float(masked_mean(entropy, mask)), "response_length": float(mask.sum(-1).float().mean()),
            "logprob_mismatch_max": float(mismatch.max()) if mismatch.numel() else 0.0,
            "logprob_mismatch_mean": float(mismatch.mean()) if mismatch.numel() else 0.0,
            "prompts": o.prompts_per_iteration, "responses": len(batch),
            "tokens_per_s": tokens / seconds, "kl_coef": float(self.kl_ctrl.value),
            **{f"time/{k}": v for k, v in timer.seconds.items()},
        })
        return metrics

    def evaluate(self, iteration: int) -> dict[str, float]:
        """Held-out exact-match accuracy of the greedy policy."""
        batch = prompt_batch(self.heldout, self.vocab)
        out = self.groups["actor"].generate(Batch(batch.select("prompts", "prompt_mask").tensors,
                                                  meta={"iteration": iteration, "greedy": True}))
        scores = self.score(Batch(out.tensors, batch.non_tensors))
        return {"eval/accuracy": float((scores >= 1.0).float().mean()), "eval/reward": float(scores.mean())}


def _collect(stats: dict[str, list[float]], out: Batch) -> None:
    for k in out.keys():
        stats.setdefault(k, []).append(float(out[k].mean()))
