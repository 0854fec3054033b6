"""Packed next-token batches tokenized on the fly from a document stream, for corpora too large to
tokenize up front (`data.streaming=true`).

Documents are read in corpus order (no shuffling: shuffle shards before, if needed), each followed by
EOS, and packed back to back into non-overlapping windows of seq_len+1 tokens. A global batch is
`batch_size * dp_size` consecutive windows; rank r keeps rows [r*batch_size, (r+1)*batch_size), so the
union over ranks equals one process with batch_size*dp_size. Every rank tokenizes the whole stream
(the price of needing no coordination). Validation holds out every `holdout_every`-th document.

State is ``{"epoch", "documents", "offset"}``: the index of the first document not fully consumed and
how many of its tokens (EOS included) were; resume re-reads documents up to it without tokenizing
them. The tail of an epoch shorter than one global batch is dropped.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from trainer.data.packing import encode_batches, token_dtype
from trainer.data.tokenizer import eos_id
from trainer.errors import ConfigError


def is_heldout(index: int, holdout_every: int) -> bool:
    """Document `index` belongs to validation: the last of every `holdout_every` (0 = none)."""
    return holdout_every > 0 and index % holdout_every == holdout_every - 1


class StreamingPackedBatches:
    """(inputs, targets) LongTensor pairs [batch_size, seq_len] packed from `documents()`, a factory
    returning a fresh, deterministic document iterator. `heldout=True` reads the validation documents;
    `loop=False` makes one pass and stops (evaluation)."""

    def __init__(self, documents: Callable[[], Iterable[str]], tok: Tokenizer, seq_len: int,
                 batch_size: int, dp_rank: int = 0, dp_size: int = 1, holdout_every: int = 0,
                 heldout: bool = False, loop: bool = True, name: str = "the corpus"):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if heldout and holdout_every < 1:
            raise ValueError("heldout=True needs holdout_every >= 1")
        self.documents, self.tok, self.name = documents, tok, name
        self.seq_len, self.batch_size, self.dp_rank, self.dp_size = seq_len, batch_size, dp_rank, dp_size
        self.holdout_every, self.heldout, self.loop = holdout_every, heldout, loop
        self.window = seq_len + 1
        self.global_batch = batch_size * dp_size
        self.eos, self.dtype = eos_id(tok), token_dtype(tok)
        self.load_state_dict({"epoch": 0, "documents": 0, "offset": 0})

    def __iter__(self) -> "StreamingPackedBatches":
        return self

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.load_state_dict({"epoch": 0, "documents": 0, "offset": 0})

    def state_dict(self) -> dict[str, int]:
        if self._pieces:
            return {"epoch": self.epoch, "documents": self._pieces[0][0], "offset": self._head}
        return {"epoch": self.epoch, "documents": self._next_doc, "offset": self._pending_offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._open(int(state["documents"]), int(state["offset"]))

    def _open(self, start: int, offset: int) -> None:
        self._pieces: deque[tuple[int, np.ndarray]] = deque()  # (document index, its tokens + EOS)
        self._head = 0  # tokens of _pieces[0] already consumed
        self._buffered = 0  # tokens in _pieces not yet consumed
        self._start, self._next_doc, self._pending_offset = start, start, offset
        self._from_start, self._produced = start == 0 and offset == 0, False
        self._stream = self._encoded(start)

    def _encoded(self, start: int) -> Iterator[tuple[int, list[int]]]:
        """(index, token ids) of this split's documents from index `start` on."""
        indices: deque[int] = deque()

        def texts() -> Iterator[str]:
            for i, doc in itertools.islice(enumerate(self.documents()), start, None):
                if is_heldout(i, self.holdout_every) == self.heldout:
                    indices.append(i)
                    yield doc

        for ids_batch in encode_batches(texts(), self.tok):
            for ids in ids_batch:
                yield indices.popleft(), ids

    def _fill(self, need: int) -> None:
        while self._buffered < need:
            item = next(self._stream, None)
            if item is None:
                self._end_epoch()
                continue
            i, ids = item
            ids.append(self.eos)
            self._pieces.append((i, np.asarray(ids, dtype=self.dtype)))
            self._buffered += len(ids)
            self._next_doc = i + 1
            if self._pending_offset:  # resuming inside document i
                if i != self._start or self._pending_offset >= len(ids):
                    raise ConfigError(f"{self.name}: the data state does not match the corpus "
                                     f"(document {i}, offset {self._pending_offset})")
                self._head, self._buffered = self._pending_offset, self._buffered - self._pending_offset
                self._pending_offset = 0

    def _end_epoch(self) -> None:
        if not self.loop:
            raise StopIteration
        if self._from_start and not self._produced:
            split = "validation" if self.heldout else "training"
            raise ConfigError(
                f"{self.name}: the {split} documents hold fewer tokens than one batch needs: "
                f"batch_size*dp_size*(seq_len+1) = {self.batch_size}*{self.dp_size}*{self.window} = "
                f"{self.global_batch * self.window}")
        self.epoch += 1
        self._open(0, 0)

    def _consume(self, n: int, keep: bool) -> np.ndarray | None:
        out = []
        while n:
            i, arr = self._pieces[0]
            take = min(n, len(arr) - self._head)
            if keep:
                out.append(arr[self._head: self._head + take])
            self._head, self._buffered, n = self._head + take, self._buffered - take, n - take
            if self._head == len(arr):
                self._pieces.popleft()
                self._head = 0
        return np.concatenate(out) if keep else None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        local = self.batch_size * self.window
        self._fill(self.global_batch * self.window)
        self._consume(self.dp_rank * local, keep=False)
        mine = self._consume(local, keep=True)
        self._consume((self.dp_size - 1 - self.dp_rank) * local, keep=False)
        self._produced = True
        batch = torch.from_numpy(mine.astype(np.int64)).view(self.batch_size, self.window)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
