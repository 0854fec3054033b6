"""Prompt/response pairs as teacher-forced batches: the loss falls on response tokens only.

A pair becomes tokens = [bos] + prompt + response + [eos]; inputs = tokens[:-1], targets =
tokens[1:] with every prompt position (and the right padding) set to IGNORE, so pretraining's mean
cross-entropy over non-ignored targets is the SFT loss. Batches are dp-sharded, reshuffled each
epoch from the seed, and resumable (Stateful), like trainer/data's packed batches."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch

from rlhf.data.prompts import Vocabulary
from trainer.errors import ConfigError

IGNORE = -100


def encode_pair(vocab: Vocabulary, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """(tokens, prompt length) of one pair; too long is a ConfigError naming task.max_length."""
    prompt_ids = vocab.encode_prompt(prompt)
    tokens = prompt_ids + vocab.tokenizer.encode(response).ids + [vocab.eos_id]
    if len(tokens) > max_length:
        raise ConfigError(f"a pair of {len(tokens)} tokens ({prompt[:40]!r} ...) exceeds task.max_length={max_length}")
    return tokens, len(prompt_ids)


def pair_tensors(pairs: list[tuple[list[int], int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [N, width-1] and targets [N, width-1] (prompt and padding targets IGNORE)."""
    inputs = torch.full((len(pairs), width - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), width - 1), IGNORE, dtype=torch.long)
    for i, (tokens, plen) in enumerate(pairs):
        t = torch.tensor(tokens)
        inputs[i, :len(t) - 1] = t[:-1]
        targets[i, plen - 1:len(t) - 1] = t[plen:]
    return inputs, targets


class PairBatches:
    """Endless (inputs, targets) micro-batches of this dp rank; Stateful."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, collate: Optional[Callable] = None):
        per_step = batch_size * dp_size
        if per_step > len(inputs):
            raise ConfigError(f"trainer.batch_size needs {per_step} pairs per step but the data has {len(inputs)}")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self.collate = collate or (lambda x, y: (x, y))
        self.epoch, self.index = 0, 0

    def __iter__(self) -> "PairBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        per_step = self.batch_size * self.dp_size
        if self.index + per_step > len(self.inputs):
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.inputs))
        start = self.index + self.dp_rank * self.batch_size
        rows = torch.from_numpy(order[start:start + self.batch_size])
        self.index += per_step
        return self.collate(self.inputs[rows], self.targets[rows])

    def state_dict(self) -> dict:
        return {"epoch": torch.tensor(self.epoch), "index": torch.tensor(self.index)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 collate: Optional[Callable] = None) -> Iterator:
    collate = collate or (lambda x, y: (x, y))
    for i in range(0, len(inputs), batch_size):
        yield collate(inputs[i:i + batch_size], targets[i:i + batch_size])
