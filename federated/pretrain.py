"""A short central pretraining of the seed-built base, so the federation fine-tunes a *pretrained*
model, as FedPipe assumes (its importance scores rank the weights of a trained LLM).

No pretrained checkpoint exists offline, so `task.base_pretrain_steps` AdamW steps train the whole
base centrally on the keyword-topic format with **other topics**: keyword sets disjoint from the
fine-tuning task's (drawn from the content tokens it does not use), fresh samples from their own
seed. The base so learns the format (attend to the keywords, answer after the query token) but not
the clients' keyword → label mapping, which fine-tuning must still learn. The weights are a pure
function of (model config, seed, task format, steps), computed in one thread and cached on disk
(`$PLAIT_CACHE/federated/`, else ~/.cache/plait), so every process (server, simulated clients,
SuperNodes on one file system) loads the same tensors and a repeat costs a load.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from federated.data import KEYWORDS_PER_CLASS, TaskSpec, generate_with, keywords
from trainer.config import ModelConfig
from trainer.errors import ConfigError

BATCH = 32  # samples per pretraining step
LR = 1e-3
DATA_SEED_OFFSET = 4  # the task uses seed+1 (train), +2 (test), +3 (calibration)
VERSION = 1  # bump when the recipe changes: it is part of the cache key


@dataclass(frozen=True)
class Pretraining:
    """What the pretrained base depends on besides the model config and the seed."""

    steps: int
    spec: TaskSpec  # the fine-tuning task's format (classes, length, keyword density)


def of(c, model_cfg: ModelConfig):
    """The Pretraining of a task config (`c`: FederatedConfig), or None for the seed's initialisation."""
    if c.base_pretrain_steps == 0:
        return None
    return Pretraining(c.base_pretrain_steps, TaskSpec(c.num_classes, c.seq_len, model_cfg.vocab_size, c.keyword_prob))


def pretrain_keywords(spec: TaskSpec, seed: int) -> Tensor:
    """[C, k] keyword sets disjoint from the fine-tuning task's `keywords(spec, seed)`, k ≤ 8."""
    used = set(keywords(spec, seed).flatten().tolist())
    free = torch.tensor([t for t in range(spec.first_content, spec.vocab_size) if t not in used])
    per_class = min(KEYWORDS_PER_CLASS, len(free) // spec.num_classes)
    if per_class < 1:
        raise ConfigError(f"task.base_pretrain_steps needs keyword sets disjoint from the task's: "
                          f"model.vocab_size={spec.vocab_size} leaves {len(free)} free content tokens for "
                          f"task.num_classes={spec.num_classes}; raise model.vocab_size or set task.base_pretrain_steps=0")
    g = torch.Generator().manual_seed(seed + 10_007)
    free = free[torch.randperm(len(free), generator=g)]
    return free[: spec.num_classes * per_class].view(spec.num_classes, per_class)


def pretrained_weights(cfg: ModelConfig, seed: int, pre: Pretraining) -> dict[str, Tensor]:
    """The base after `pre.steps` steps from the seed's initialisation (Plait's names), from the disk
    cache when there."""
    from trainer.atomic import atomic_path
    from trainer.data.cache import cache_root, short_hash

    key = short_hash(json.dumps([asdict(cfg), seed, asdict(pre), BATCH, LR, VERSION], sort_keys=True))
    path = cache_root() / "federated" / f"base-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    print(f"plait: pretraining the base for {pre.steps} steps (once: cached at {path})", flush=True)
    start = time.perf_counter()
    weights = train(cfg, seed, pre)
    print(f"plait: base pretrained in {time.perf_counter() - start:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # processes that race write the same tensors; one rename wins
        torch.save(weights, tmp)
    return weights


def train(cfg: ModelConfig, seed: int, pre: Pretraining) -> dict[str, Tensor]:
    """AdamW on every weight, cross-entropy of the topic's label token at the last position."""
    from federated.model import loss
    from trainer.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same floats in every process, whatever its thread count
    try:
        model = build_model(cfg, seed=seed)
        tokens, labels = generate_with(pre.spec, pretrain_keywords(pre.spec, seed), pre.steps * BATCH,
                                       seed + DATA_SEED_OFFSET)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        model.train()
        for step in range(pre.steps):
            batch = slice(step * BATCH, (step + 1) * BATCH)
            opt.zero_grad(set_to_none=True)
            loss(model, tokens[batch], labels[batch], pre.spec.label_tokens).backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
