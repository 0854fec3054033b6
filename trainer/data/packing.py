"""Packed next-token batches from one flat token array: the corpus tokenized once, cached as .npy,
cut into non-overlapping windows of seq_len+1 tokens, shuffled per epoch, sharded by dp rank.

A global batch is `batch_size * dp_size` windows; rank r gets rows [r*batch_size, (r+1)*batch_size),
so the ranks of one step together see exactly what one process with batch_size*dp_size would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from trainer.config import DataConfig
from trainer.data.cache import atomic_path, cache_root
from trainer.data.corpus import corpus_fingerprint, iter_documents
from trainer.data.tokenizer import eos_id, tokenizer_hash
from trainer.errors import ConfigError

ENCODE_DOCS = 256  # documents per encode_batch call
ENCODE_BYTES = 1 << 20  # ... or this much text, whichever comes first


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.get_vocab_size(with_added_tokens=True) <= 1 << 16 else np.int32)


def encode_batches(docs: Iterable[str], tok: Tokenizer) -> Iterator[list[list[int]]]:
    """Token ids of `docs`, a few hundred documents per (multithreaded) encode_batch call."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers>=0.21)
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if len(chunk) >= ENCODE_DOCS or size >= ENCODE_BYTES:
            yield [e.ids for e in encode(chunk, add_special_tokens=False)]
            chunk, size = [], 0
    if chunk:
        yield [e.ids for e in encode(chunk, add_special_tokens=False)]


def tokenize_corpus(docs: Iterable[str], tok: Tokenizer, max_tokens: int = 0) -> np.ndarray:
    """One flat array of `docs`' tokens, each document followed by EOS; at most `max_tokens` (0 = all)."""
    eos, dtype = eos_id(tok), token_dtype(tok)
    parts, total = [], 0
    for ids_batch in encode_batches(docs, tok):
        for ids in ids_batch:
            ids.append(eos)
            parts.append(np.asarray(ids, dtype=dtype))
            total += len(ids)
        if max_tokens and total >= max_tokens:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return tokens[:max_tokens] if max_tokens else tokens


def token_cache_path(cfg: DataConfig, tok: Tokenizer) -> Path:
    """Cache key: corpus fingerprint, tokenizer hash and max_tokens."""
    fp = corpus_fingerprint(cfg.source, cfg.text_field)
    return cache_root(cfg.cache_dir) / "tokens" / f"{fp}-{tokenizer_hash(tok)}-n{cfg.max_tokens}.npy"


def build_token_cache(cfg: DataConfig, tok: Tokenizer) -> Path:
    """Tokenize the corpus into the cache unless already there; idempotent and atomic, so it is safe
    for rank 0 to build while others wait at a barrier (or for each node to build its own cache)."""
    path = token_cache_path(cfg, tok)
    if not path.exists():
        docs = iter_documents(cfg.source, cfg.text_field, streaming=True)  # one pass: no Arrow copy
        tokens = tokenize_corpus(docs, tok, cfg.max_tokens)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, tokens)
    return path


def load_tokens(path: Path) -> np.ndarray:
    """The cached token array, memory-mapped read-only (ranks share the page cache)."""
    return np.load(path, mmap_mode="r")


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last `val_fraction` of the tokens is held out (documents may straddle it)."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


class PackedBatches:
    """(inputs, targets) LongTensor pairs [batch_size, seq_len], targets = inputs shifted by one.

    Windows are shuffled per epoch by a numpy Generator seeded with (seed, epoch); `position` counts
    windows of the epoch consumed by all ranks together, so state is the same on every rank and a
    resume with another dp_size but the same global batch continues exactly. With `shuffle=False,
    loop=False` it is an evaluation iterator: windows in order, one pass, then StopIteration.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True, loop: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle, self.loop = shuffle, loop
        self.window = seq_len + 1
        self.num_windows = len(tokens) // self.window
        self.global_batch = batch_size * dp_size
        if self.num_windows < self.global_batch:
            raise ConfigError(
                f"{len(tokens)} tokens make {self.num_windows} windows of seq_len+1={self.window}; one "
                f"batch needs batch_size*dp_size={batch_size}*{dp_size}={self.global_batch} windows "
                f"({self.global_batch * self.window} tokens)")
        self._order: tuple[int, Optional[np.ndarray]] = (-1, None)
        self.reset()

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.num_windows // self.global_batch

    def __iter__(self) -> "PackedBatches":
        return self

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def order(self, epoch: int) -> Optional[np.ndarray]:
        """The window permutation of `epoch` (None: in order)."""
        if not self.shuffle:
            return None
        if self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.num_windows))
        return self._order[1]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.num_windows:
            if not self.loop:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
        lo = self.position + self.dp_rank * self.batch_size
        order = self.order(self.epoch)
        windows = order[lo: lo + self.batch_size] if order is not None else np.arange(lo, lo + self.batch_size)
        self.position += self.global_batch
        if self.loop and self.position + self.global_batch > self.num_windows:
            self.epoch, self.position = self.epoch + 1, 0  # state names the epoch the next batch is in
        rows = np.asarray(self.tokens[windows[:, None] * self.window + np.arange(self.window)], dtype=np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
