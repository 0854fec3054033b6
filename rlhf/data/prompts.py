"""The prompts an RLHF run draws from, and the tokenizer that encodes them.

A `PromptLoader` walks the training prompts in a fresh seeded order each epoch; its position is
checkpoint state, so a resumed run draws exactly the prompts it would have."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from rlhf.batch import Batch
from rlhf.data import arithmetic
from rlhf.data.chars import BOS_ID, EOS_ID, PAD_ID, char_tokenizer
from rlhf.data.files import load_rows
from rlhf.rollout import left_pad
from trainer.errors import ConfigError


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer and the ids generation needs."""

    tokenizer: Tokenizer
    pad_id: int
    eos_id: int
    bos_id: Optional[int]

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode_response(self, ids: list[int]) -> str:
        """The response's text up to (without) its end token."""
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def build_vocabulary(data, key: str = "task.prompts.tokenizer") -> Vocabulary:
    if data.tokenizer == "chars":
        return Vocabulary(char_tokenizer(arithmetic.ALPHABET), PAD_ID, EOS_ID, BOS_ID)
    try:
        tok = Tokenizer.from_file(data.tokenizer)
    except Exception as err:
        raise ConfigError(f"{key}={data.tokenizer!r}: not a tokenizer.json ({err}); or 'chars'") from None
    from trainer.data.tokenizer import eos_id

    eos = eos_id(tok)
    return Vocabulary(tok, eos, eos, None)


def prompt_records(data, split: str, seed: int, key: str = "task.prompts") -> list[dict[str, str]]:
    """[{"prompt", "answer"}] of a split ("train" or "heldout"): generated, or a file's rows (a file
    has no held-out split of its own: its last 5% serve)."""
    if data.source == "arithmetic":
        size = data.train_size if split == "train" else data.heldout_size
        stream = arithmetic.problems(seed, data.digits, data.operators, split, reverse_answer=data.reverse_answer)
        return [{"prompt": p.prompt, "answer": p.answer} for p in arithmetic.take(stream, size)]
    fields = {data.prompt_field: f"{key}.prompt_field", data.answer_field: f"{key}.answer_field"}
    rows = load_rows(data.source, fields, f"{key}.source")
    rows = [{"prompt": str(r[data.prompt_field]), "answer": str(r[data.answer_field])} for r in rows]
    cut = max(1, len(rows) // 20)
    return rows[:-cut] if split == "train" and len(rows) > 1 else rows[-cut:]


def prompt_batch(records: list[dict[str, str]], vocab: Vocabulary, uid_offset: int = 0) -> Batch:
    """Left-padded prompt tokens with their text, answers and a uid per prompt (GRPO's groups)."""
    tokens, mask = left_pad([vocab.encode_prompt(r["prompt"]) for r in records], vocab.pad_id)
    return Batch({"prompts": tokens, "prompt_mask": mask},
                 {"prompt_text": [r["prompt"] for r in records], "answer": [r["answer"] for r in records],
                  "uid": [str(uid_offset + i) for i in range(len(records))]})


class PromptLoader:
    """Batches of `batch_size` prompts, reshuffled (seeded) every epoch; Stateful."""

    def __init__(self, records: list[dict[str, str]], batch_size: int, seed: int):
        if batch_size > len(records):
            raise ConfigError(f"task.prompts_per_iteration={batch_size} is more than the {len(records)} training prompts")
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.epoch, self.index, self.drawn = 0, 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def next(self) -> list[dict[str, str]]:
        if self.index + self.batch_size > len(self.records):  # drop the ragged end of an epoch
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        self.drawn += self.batch_size
        return [self.records[i] for i in order]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": torch.tensor(self.epoch), "index": torch.tensor(self.index), "drawn": torch.tensor(self.drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self.drawn = int(state["epoch"]), int(state["index"]), int(state["drawn"])
