"""Data pipeline for language-model pretraining: corpus -> tokenizer -> packed, dp-sharded,
resumable next-token batches.

`build_data` is the one entry point the training loop needs; the modules below it are usable alone:
`corpus` (documents), `tokenizer` (BPE training and loading), `packing` (token cache and
`PackedBatches`), `streaming` (`StreamingPackedBatches`), `cache` (cache dir, atomic writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from tokenizers import Tokenizer

from trainer.config import DataConfig
from trainer.data.corpus import corpus_fingerprint, iter_documents
from trainer.data.packing import PackedBatches, build_token_cache, load_tokens, split_tokens
from trainer.data.streaming import StreamingPackedBatches
from trainer.data.tokenizer import build_tokenizer, eos_id
from trainer.errors import ConfigError

Batches = Union[PackedBatches, StreamingPackedBatches]

__all__ = [
    "DataBundle", "build_data", "iter_documents", "corpus_fingerprint", "build_tokenizer", "eos_id",
    "PackedBatches", "StreamingPackedBatches",
]


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: Batches  # endless, shuffled per epoch (streaming: corpus order), resumable via state_dict
    val: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # a fresh one-pass eval iterator
    eos_id: int
    num_tokens: Optional[int]  # tokens in the whole token array (train + val); None when streaming


def no_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation iterator when data.val_fraction=0."""
    return iter(())


def build_data(cfg: DataConfig, vocab_size: int, batch_size: int, dp_rank: int, dp_size: int,
               seed: int, is_main: bool = True, barrier: Optional[Callable[[], None]] = None) -> DataBundle:
    """Tokenizer and train/val batches for this data-parallel rank.

    `batch_size` is the per-rank batch of one `next()` (a microbatch). `is_main` builds the caches,
    then everyone meets at `barrier` (e.g. `torch.distributed.barrier`) and the others load them. A
    rank that finds no cache after the barrier (node-local cache dirs) builds its own: builds are
    idempotent and atomic. If the main rank's build fails it still enters the barrier, so the others
    fail with the same error instead of hanging.
    """

    def build() -> tuple[Tokenizer, Optional[Path]]:
        tok = build_tokenizer(cfg, vocab_size)
        return tok, None if cfg.streaming else build_token_cache(cfg, tok)

    error: Optional[BaseException] = None
    if is_main:
        try:
            built = build()
        except Exception as err:  # re-raised after the barrier
            error = err
    if barrier is not None:
        barrier()
    if error is not None:
        raise error
    if not is_main:
        built = build()
    tok, path = built
    shape = dict(seq_len=cfg.seq_len, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size)
    need = batch_size * dp_size * (cfg.seq_len + 1)

    if cfg.streaming:
        every = max(2, round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else 0
        docs = partial(iter_documents, cfg.source, cfg.text_field, streaming=True)
        name = f"data.source={cfg.source!r}"
        train = StreamingPackedBatches(docs, tok, holdout_every=every, name=name, **shape)
        make_val = partial(StreamingPackedBatches, docs, tok, holdout_every=every, heldout=True,
                           loop=False, name=name, **shape)
        # fail at start, not at the first step, if the corpus is too small
        next(StreamingPackedBatches(docs, tok, holdout_every=every, name=name, **shape))
        if every and next(make_val(), None) is None:
            raise ConfigError(f"{name}: the validation documents (every {every}th, data.val_fraction="
                             f"{cfg.val_fraction}) hold fewer than the {need} tokens one batch needs "
                             "(batch_size*dp_size*(seq_len+1)); lower the batch or set data.val_fraction=0")
        val = make_val if every else no_batches
        return DataBundle(tok, train, val, eos_id(tok), None)

    tokens = load_tokens(path)
    train_tokens, val_tokens = split_tokens(tokens, cfg.val_fraction)
    for split, part in (("training", train_tokens), ("validation", val_tokens)):
        if len(part) < need and (split == "training" or cfg.val_fraction > 0):
            raise ConfigError(
                f"data.source={cfg.source!r} gives {len(tokens)} tokens (data.max_tokens={cfg.max_tokens}), "
                f"{len(part)} of them {split} (data.val_fraction={cfg.val_fraction}); one batch needs "
                f"batch_size*dp_size*(seq_len+1) = {batch_size}*{dp_size}*{cfg.seq_len + 1} = {need} "
                f"{split} tokens; use more data or a smaller batch or seq_len")
    train = PackedBatches(train_tokens, seed=seed, **shape)
    val = no_batches
    if cfg.val_fraction > 0:
        val = partial(PackedBatches, val_tokens, shuffle=False, loop=False, **shape)
    return DataBundle(tok, train, val, eos_id(tok), len(tokens))
