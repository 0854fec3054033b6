"""Tokenizers for pretraining: a byte-level BPE (GPT-2 style) trained on the corpus and cached, or a
user's tokenizer.json checked against the model's vocabulary size.

Trained tokenizers reserve id 0 for ``<|endoftext|>`` (the document separator), then the 256 byte
symbols, then merges, and land in ``<cache>/tokenizers/<corpus fingerprint>-b<train bytes>-v<vocab>.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.config import DataConfig
from trainer.data.cache import atomic_path, cache_root, short_hash
from trainer.data.corpus import corpus_fingerprint, iter_documents
from trainer.errors import ConfigError

EOS = "<|endoftext|>"
EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
MIN_BPE_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def tokenizer_cache_path(cfg: DataConfig, vocab_size: int) -> Path:
    """Where `build_tokenizer` caches the BPE trained for this corpus, sample size and vocabulary."""
    fp = corpus_fingerprint(cfg.source, cfg.text_field)
    return cache_root(cfg.cache_dir) / "tokenizers" / f"{fp}-b{cfg.tokenizer_train_bytes}-v{vocab_size}.json"


def build_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
    """The run's tokenizer: `cfg.tokenizer == "train"` loads the cached BPE or trains and caches it
    (atomically, so concurrent ranks never read half a file); otherwise loads `cfg.tokenizer`."""
    if cfg.tokenizer != "train":
        return load_tokenizer(cfg.tokenizer, vocab_size)
    path = tokenizer_cache_path(cfg, vocab_size)
    if not path.exists():
        tok = train_bpe(sample_text(cfg), vocab_size)
        with atomic_path(path) as tmp:
            tok.save(tmp)
    return Tokenizer.from_file(str(path))  # every rank uses the file, never an in-memory variant


def load_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    """A tokenizer.json, refused if it has more tokens than the model's embedding has rows."""
    file = os.path.expanduser(path)
    if not os.path.isfile(file):
        raise ConfigError(f"data.tokenizer={path!r}: no such file; allowed: train, or a path to tokenizer.json")
    tok = Tokenizer.from_file(file)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ConfigError(f"data.tokenizer={path!r} has {n} tokens but model.vocab_size={vocab_size}; "
                         f"set model.vocab_size >= {n}")
    eos_id(tok)  # fail now, not at packing time
    return tok


def sample_text(cfg: DataConfig) -> Iterator[str]:
    """The corpus's first `cfg.tokenizer_train_bytes` bytes (UTF-8), as documents; the last is cut."""
    budget = cfg.tokenizer_train_bytes
    for doc in iter_documents(cfg.source, cfg.text_field, streaming=True):
        data = doc.encode("utf-8", errors="replace")
        if len(data) >= budget:
            yield data[:budget].decode("utf-8", errors="ignore")
            return
        budget -= len(data)
        yield doc


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with at most `vocab_size` tokens; `<|endoftext|>` is id 0."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for a byte-level BPE; "
                         f"allowed: >= {MIN_BPE_VOCAB} (256 bytes + {EOS})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-document token (`<|endoftext|>`, else a common equivalent)."""
    for name in EOS_CANDIDATES:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise ConfigError(f"the tokenizer has no end-of-document token; expected one of {', '.join(EOS_CANDIDATES)}")


def tokenizer_hash(tok: Tokenizer) -> str:
    """A short key for a tokenizer's full definition (vocab, merges, pre-tokenizer...)."""
    return short_hash(tok.to_str())
