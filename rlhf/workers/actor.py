"""The actor (trains; generates; recomputes log-probs) and the frozen reference policy."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from rlhf.batch import Batch
from rlhf.dispatch import Mode, WorkerInfo, register
from rlhf.logprobs import teacher_forced
from rlhf.losses import LossScale
from rlhf.rollout_engine import RolloutEngine, SamplingParams, named_weights, resolve_engine
from rlhf.workers.base import Worker
from rlhf.workers.objectives import log_prob_objective, pack, policy_objective
from trainer.errors import ConfigError

TEACHER_FORCED = ("input_ids", "prompts", "prompt_mask", "responses")


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """Consecutive row slices of at most `size` rows (memory only: results never depend on it)."""
    return [batch[i:i + size] for i in range(0, len(batch), size)]


def sampling_seed(seed: int, iteration: int, dp_rank: int, stream: int = 0) -> int:
    """The generator seed of one dp rank's sampling in one iteration: every tp and pp rank of the dp
    group draws the same tokens, and a resumed run redraws exactly what it would have (no saved state)."""
    return (seed * 1_000_003 + iteration * 9_973 + dp_rank * 101 + stream) % (2 ** 63)


class ActorWorker(Worker):
    """The policy π_θ."""

    hybrid = None  # the 3D-HybridEngine's generation shards (task.rollout_tp), else None
    generation_info = None
    _engine = None  # the rollout engine, built at the first rollout

    @register(Mode.ONE_TO_ALL)
    def init_model(self, _=None):
        info = super().init_model()
        o = self.spec.options
        if self.role != "actor" or not o.rollout_tp:
            return info
        from parallel.hybrid_engine import (GenerationShards, HybridLayout, StagedGenerationShards, hybrid_groups,
                                            pipeline_owner)
        from parallel.hybrid_fsdp import GatheredGenerationShards

        layout = self.spec.layout
        if layout.dp_shard > 1:  # FSDP-sharded: weight by weight, each rank receives what its generation shard lacks
            self.hybrid = GatheredGenerationShards(self.model, self.spec.world_size, o.rollout_tp,
                                                   self._generation_network, self.device)
            h = self.hybrid
            self.generation_info = WorkerInfo(self.spec.rank, h.dp_rank, h.dp_size, h.tp_rank == 0)
            return {"train": info, "generation": self.generation_info}
        lay = HybridLayout(p=layout.pp, t=layout.tp, d=layout.dp_replicate * layout.dp_shard, p_g=o.rollout_pp,
                           t_g=o.rollout_tp)
        if self.pipeline is None:  # FSDP2 replicas (dp_replicate) own their storage: copied, not aliased
            self.hybrid = GenerationShards(self.model, lay, self._generation_network, self.device,
                                           resident=layout.dp_replicate == 1)
        else:  # every rank receives the layers of its generation stage (all of them: pp_g = 1) at its shard
            self.hybrid = StagedGenerationShards(self.parts[0], lay, self._generation_network, self.device,
                                                 pipeline_owner(self.spec.model.n_layers, layout.pp, layout.virtual_stages),
                                                 resident=True, virtual_stages=layout.virtual_stages)
        groups = hybrid_groups(lay)
        tp_rank = next(g.index(self.spec.rank) for g in groups.generation_tp if self.spec.rank in g)
        stage = next(g.index(self.spec.rank) for g in groups.generation_pp if self.spec.rank in g)
        self.generation_info = WorkerInfo(self.spec.rank, groups.generation_dp_rank[self.spec.rank],
                                          lay.d * lay.micro_dp, tp_rank == 0 and stage == lay.p_g - 1)
        return {"train": info, "generation": self.generation_info}

    def _generation_network(self, tp_mesh, chunks: Optional[list[int]] = None):
        """The generation network under the tensor mesh: the whole model, or (task.rollout_pp > 1)
        the training pipeline chunks `chunks` of this rank's generation stage."""
        from parallel.hybrid_engine import generation_network
        from trainer.models import build_model

        n_chunks = self.spec.layout.pp * self.spec.layout.virtual_stages
        return generation_network(build_model(self.spec.model, device="meta"), tp_mesh, chunks, n_chunks, self.device,
                                  self.spec.seed).requires_grad_(False)

    def load_initial_weights(self) -> None:
        if self.spec.options.init_from:
            self.load_model_component(self.spec.options.init_from)

    def _log_probs(self, batch: Batch, key: str) -> Batch:
        """`key` [B, R] (and entropy) of the responses under the current weights; empty off the last stage."""
        o = self.spec.options
        self.set_train(False)
        lps, ents = [], []
        for mb in micro_batches(batch.select(*TEACHER_FORCED), o.responses_per_micro_batch):
            tf = teacher_forced(mb)
            out: list = []
            self.run_objective(tf.tokens, pack(tf.tokens[:, 1:]), log_prob_objective(o.temperature, out), train=False)
            if self.is_last_stage:
                lp, ent = (torch.cat(parts)[:len(mb)].cpu() for parts in zip(*out))
                lps.append(tf.to_responses(lp))
                ents.append(tf.to_responses(ent))
        if not self.is_last_stage:
            return Batch()
        return Batch({key: torch.cat(lps), "entropy": torch.cat(ents)})

    @register(Mode.DP, mesh="generation")
    def generate(self, batch: Batch) -> Batch:
        """Sample one response per row of left-padded prompts (the driver repeats each prompt n times).
        meta: iteration, greedy (ReMax's baseline: temperature 0). Split by the generation layout's
        data-parallel rank; the rollout engine (task.rollout_engine) loads the weights into that
        layout first and releases what only generation needed after."""
        o = self.spec.options
        greedy = bool(batch.meta.get("greedy", False))
        info = self.generation_info or self.info
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sampling_seed(self.spec.seed, int(batch.meta["iteration"]), info.dp_rank, int(greedy)))
        self.set_train(False)
        params = SamplingParams(o.max_new_tokens, 0.0 if greedy else o.temperature, o.top_k or None, o.top_p,
                                self.spec.eos_id, self.spec.pad_id)
        engine = self.rollout_engine()
        engine.load_weights()
        try:
            return engine.generate(batch["prompts"], batch["prompt_mask"], params, gen).to("cpu")
        finally:
            engine.release()

    def rollout_engine(self) -> RolloutEngine:
        if self._engine is None:
            self._engine = resolve_engine(self.spec.options.rollout_engine)(self)
        return self._engine

    @contextlib.contextmanager
    def generation_weights(self) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
        """This rank's (name, tensor) pairs in the generation layout, for an external engine to load:
        resharded by the 3D-HybridEngine under task.rollout_tp (the copy released on exit), else
        the training weights themselves."""
        if self.pipeline is not None and self.hybrid is None:
            raise ConfigError("an external rollout engine needs the weights without pipeline stages: "
                              "set task.rollout_tp (the 3D-HybridEngine gathers them)")
        if self.hybrid is None:
            yield named_weights(self.model, full=True)
            return
        self.hybrid.to_generation()
        try:
            yield named_weights(self.hybrid.model)
        finally:
            self.hybrid.release()

    @register(Mode.DP)
    def compute_log_prob(self, batch: Batch) -> Batch:
        """old_log_probs [B, R] (and entropy) of the responses under the current weights."""
        return self._log_probs(batch, "old_log_probs")

    @register(Mode.DP)
    def update_actor(self, batch: Batch) -> Batch:
        """One optimizer step on this worker's part of a mini-batch. meta["scale"]: the whole
        mini-batch's LossScale, so Σ over workers and micro-batches is the mini-batch's loss."""
        self.set_train(True)
        stats = policy_gradients(lambda tokens, packed, fn: self.run_objective(tokens, packed, fn, train=True),
                                 batch, self.spec.options, LossScale(**batch.meta["scale"]), self.info.dp_size)
        stats["grad_norm"] = self.optimizer_step()
        return Batch({k: torch.tensor([v], dtype=torch.float64) for k, v in stats.items()})


def policy_targets(batch: Batch, use_ref: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, W], packed per-position policy targets [B, W-1, 5]) of a mini-batch part."""
    tf = teacher_forced(batch)
    mask = tf.to_positions(batch["response_mask"].float())
    ref = tf.to_positions(batch["ref_log_probs"]) if use_ref else torch.zeros_like(mask)
    return tf.tokens, pack(tf.tokens[:, 1:], mask, tf.to_positions(batch["old_log_probs"]),
                           tf.to_positions(batch["advantages"]), ref)


def policy_gradients(run, batch: Batch, o, scale: LossScale, dp_size: int) -> dict[str, float]:
    """Backward of this part's share of the mini-batch policy loss, one micro-batch at a time:
    `run(tokens, packed, objective)` runs the network and backward of the objective (a worker's
    `run_objective`, on any layout). `policy_objective` makes the gradient independent of the split.
    Returns token-weighted metrics."""
    stats: dict[str, float] = {}
    for mb in micro_batches(batch, o.responses_per_micro_batch):
        tokens, packed = policy_targets(mb, o.use_kl_loss)
        run(tokens, packed, policy_objective(o, scale, dp_size, stats))
    return stats


class ReferenceWorker(ActorWorker):
    """π_ref: the actor's initial weights, frozen."""

    trainable = False

    @register(Mode.DP)
    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        out = self._log_probs(batch, "ref_log_probs")
        return out.select("ref_log_probs") if "ref_log_probs" in out else out
