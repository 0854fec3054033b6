"""Packing: token cache, split, batch shapes and shift, per-epoch shuffle, dp sharding, exact resume."""

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import packing
from trainer.data.packing import (PackedBatches, build_token_cache, load_tokens, split_tokens,
                                  token_cache_path, tokenize_corpus)
from trainer.data.tokenizer import eos_id

TOKENS = (np.arange(2000) % 997).astype(np.uint16)  # 2000 tokens, all windows distinguishable


def take(it, n):
    return [next(it) for _ in range(n)]


def test_tokenize_corpus_separates_documents_with_eos(small_tok):
    docs = ["def a(): pass", "x = 1", "ünïcode"]
    tokens = tokenize_corpus(docs, small_tok)
    eos = eos_id(small_tok)
    assert tokens.dtype == np.uint16 and tokens[-1] == eos and (tokens == eos).sum() == 3
    pieces = np.split(tokens, np.flatnonzero(tokens == eos) + 1)[:-1]
    assert [small_tok.decode(p[:-1].tolist()) for p in pieces] == docs
    assert len(tokenize_corpus(docs, small_tok, max_tokens=5)) == 5


def test_token_cache_is_built_once_and_memory_mapped(cache_dir, small_tok, monkeypatch):
    cfg = DataConfig(cache_dir=cache_dir, max_tokens=3000)
    path = build_token_cache(cfg, small_tok)
    assert path == token_cache_path(cfg, small_tok) and path.name.endswith("-n3000.npy")
    tokens = load_tokens(path)
    assert isinstance(tokens, np.memmap) and len(tokens) == 3000 and tokens.dtype == np.uint16
    monkeypatch.setattr(packing, "tokenize_corpus", lambda *a: pytest.fail("rebuilt a cached array"))
    assert build_token_cache(cfg, small_tok) == path
    assert token_cache_path(DataConfig(cache_dir=cache_dir, max_tokens=0), small_tok) != path


def test_split_holds_out_the_tail():
    train, val = split_tokens(TOKENS, 0.1)
    assert len(val) == 200 and np.array_equal(np.concatenate([train, val]), TOKENS)
    assert len(split_tokens(TOKENS, 0.0)[1]) == 0


def test_shapes_shift_and_windows():
    it = PackedBatches(TOKENS, seq_len=9, batch_size=4, seed=1)
    x, y = next(it)
    assert x.shape == y.shape == (4, 9) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()  # seq_len+1 tokens each
    windows = {tuple(w) for w in TOKENS.reshape(200, 10).tolist()}  # non-overlapping windows of 10
    assert all(tuple(r) in windows for r in rows.tolist())


def test_epoch_covers_each_window_once_and_reshuffles():
    it = PackedBatches(TOKENS, seq_len=9, batch_size=5, seed=0)
    assert it.num_windows == 200 and len(it) == 40
    epoch0 = torch.cat([x for x, _ in take(it, 40)])
    assert it.state_dict() == {"epoch": 1, "position": 0}
    assert len({tuple(r) for r in epoch0.tolist()}) == 200
    epoch1 = torch.cat([x for x, _ in take(it, 40)])
    assert not torch.equal(epoch0, epoch1)
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, epoch1.tolist()))
    same = PackedBatches(TOKENS, seq_len=9, batch_size=5, seed=0)
    assert torch.equal(torch.cat([x for x, _ in take(same, 40)]), epoch0)
    other = PackedBatches(TOKENS, seq_len=9, batch_size=5, seed=1)
    assert not torch.equal(torch.cat([x for x, _ in take(other, 40)]), epoch0)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_shards_union_equals_single_process(dp_size):
    single = PackedBatches(TOKENS, seq_len=7, batch_size=2 * dp_size, seed=3)
    ranks = [PackedBatches(TOKENS, seq_len=7, batch_size=2, dp_rank=r, dp_size=dp_size, seed=3)
             for r in range(dp_size)]
    for _ in range(len(single) + 3):  # across an epoch boundary
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert all(r.state_dict() == single.state_dict() for r in ranks)


@pytest.mark.parametrize("consumed", [3, 39, 40, 41, 85])  # mid-epoch, last of epoch, boundary, later
def test_resume_is_exact(consumed):
    ref = PackedBatches(TOKENS, seq_len=9, batch_size=5, seed=7)
    take(ref, consumed)
    state = ref.state_dict()
    assert all(type(v) is int for v in state.values())
    fresh = PackedBatches(TOKENS, seq_len=9, batch_size=5, seed=7)
    fresh.load_state_dict(dict(state))
    for (x0, y0), (x1, y1) in zip(take(ref, 45), take(fresh, 45)):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_eval_iterator_is_ordered_one_pass_and_resettable():
    it = PackedBatches(TOKENS, seq_len=9, batch_size=64, shuffle=False, loop=False)
    batches = list(it)
    assert len(batches) == 3 and torch.equal(batches[0][0][0], torch.from_numpy(TOKENS[:9].astype(np.int64)))
    assert list(it) == []
    it.reset()
    assert torch.equal(next(it)[0], batches[0][0])


def test_too_few_tokens_and_bad_rank():
    with pytest.raises(ValueError, match=r"2000 tokens make 15 windows .* needs batch_size\*dp_size=8\*2=16"):
        PackedBatches(TOKENS, seq_len=128, batch_size=8, dp_size=2, dp_rank=0)
    with pytest.raises(ValueError, match="dp_rank=2"):
        PackedBatches(TOKENS, seq_len=9, batch_size=1, dp_rank=2, dp_size=2)
