"""The rollout engine: what generates the actor's responses (`task.rollout_engine`). Three calls per
rollout, in this order, on every actor rank:

    engine.load_weights()     the actor's current weights into the generation layout
    engine.generate(...)      sample this rank's share of prompts (split by the generation dp rank)
    engine.release()          give back what only generation needed (KV cache, generation copy)

Plait's KV-cache engine (`plait`, the default) generates with the actor's own network, through the
3D-HybridEngine's generation shards under `task.rollout_tp` (stage to stage under
`task.rollout_pp > 1`), or stage to stage in the training pipeline. An external engine (vLLM,
SGLang on GPUs) implements the same three calls: it reads
`actor.generation_weights()` (this rank's (name, tensor) pairs of the generation layout) in
`load_weights`, and is chosen with `task.rollout_engine=package.module:Class`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from rlhf.batch import Batch
from rlhf.pipeline_decode import PipelineDecoder
from rlhf.rollout import sample
from trainer.errors import ConfigError
from trainer.registry import Registry

ROLLOUT_ENGINES: Registry[type] = Registry("rollout engine", key="task.rollout_engine")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_k: Optional[int]
    top_p: float
    eos_id: Optional[int]
    pad_id: int


class RolloutEngine(abc.ABC):
    """The interface; `actor` is the ActorWorker it generates for (its spec, device, layouts)."""

    def __init__(self, actor):
        self.actor = actor

    @abc.abstractmethod
    def load_weights(self) -> None:
        """The actor's current weights into the generation layout."""

    @abc.abstractmethod
    def generate(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator) -> Batch:
        """Left-padded prompts [B, P] → `rlhf.rollout.sample`'s Batch (responses, masks, log_probs)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give back what only generation needed."""


@ROLLOUT_ENGINES.register("plait")
class KVCacheEngine(RolloutEngine):
    """Plait's own: prefill once, then one token per step on a KV cache."""

    def load_weights(self) -> None:
        if self.actor.hybrid is not None:
            self.actor.hybrid.to_generation()

    def generate(self, prompts, prompt_mask, params: SamplingParams, generator) -> Batch:
        a = self.actor
        model, decoder, agree = a.model, None, None
        if a.hybrid is not None:  # the generation layout: its tensor and pipeline groups share their prompts
            model = a.hybrid.model
            if a.hybrid.pp_group is not None:  # task.rollout_pp > 1: stage to stage
                h = a.hybrid
                decoder = PipelineDecoder.factory(h.stage_chunks(), h.n_chunks, h.pp_group, a.spec.model, a.device,
                                                  owner=h.chunk_stage)
                model = None
        else:
            if a.pipeline is not None:
                decoder = PipelineDecoder.of_pipeline(a.pipeline, a.mesh["pp"].get_group(), a.spec.model, a.device)
            if a.info.dp_size > 1:  # the forward may gather across ranks holding other prompts (FSDP)
                agree = dist.group.WORLD
        return sample(model, prompts.to(a.device), params.max_new_tokens, attention_mask=prompt_mask.to(a.device),
                      temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, eos_id=params.eos_id,
                      pad_id=params.pad_id, generator=generator, decoder=decoder, device=a.device, agree_group=agree)

    def release(self) -> None:
        if self.actor.hybrid is not None:
            self.actor.hybrid.release()


def resolve_engine(name: str) -> type:
    """A registered name, or `package.module:Class` (a RolloutEngine subclass)."""
    cls = ROLLOUT_ENGINES.resolve(name)
    if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
        raise ConfigError(f"task.rollout_engine={name!r} is not a subclass of rlhf.rollout_engine.RolloutEngine")
    return cls


def named_weights(model: torch.nn.Module, full: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a network: each rank's local shard, or with `full` each weight whole (a
    collective on sharded weights: every rank iterates in the same order)."""
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "to_local"):
            tensor = tensor.full_tensor() if full else tensor.to_local()
        yield name, tensor
