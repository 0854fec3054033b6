"""Streaming packing: same tokens as up-front packing, dp sharding, held-out split, exact resume."""

import functools

import numpy as np
import pytest
import torch

from trainer.data.corpus import iter_documents
from trainer.data.packing import tokenize_corpus
from trainer.data.streaming import StreamingPackedBatches, is_heldout


def stream(path, tok, **kw):
    docs = functools.partial(iter_documents, path, "text", streaming=True)
    kw = {"seq_len": 63, "batch_size": 2, **kw}
    return StreamingPackedBatches(docs, tok, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_windows_are_the_packed_token_stream(jsonl_corpus, small_tok):
    path, docs = jsonl_corpus
    flat = tokenize_corpus(docs, small_tok)
    it = stream(path, small_tok)
    n = len(flat) // (2 * 64)  # whole batches in one epoch
    got = torch.cat([torch.cat([x, y[:, -1:]], 1).reshape(-1) for x, y in take(it, n)])
    assert torch.equal(got, torch.from_numpy(flat[: n * 128].astype(np.int64)))
    assert it.epoch == 0
    x, _ = next(it)  # the tail is dropped and the stream starts over
    assert it.epoch == 1 and torch.equal(x.reshape(-1)[:63], got[:63])


def test_dp_shards_union_equals_single_process(jsonl_corpus, small_tok):
    path, _ = jsonl_corpus
    single = stream(path, small_tok, batch_size=4, holdout_every=5)
    ranks = [stream(path, small_tok, batch_size=2, dp_rank=r, dp_size=2, holdout_every=5) for r in range(2)]
    for _ in range(40):  # several epochs of this small corpus
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert all(r.state_dict() == single.state_dict() for r in ranks)
    assert single.epoch >= 2


@pytest.mark.parametrize("consumed", [1, 7, 23, 31])
def test_resume_is_exact(jsonl_corpus, small_tok, consumed):
    path, _ = jsonl_corpus
    ref = stream(path, small_tok, holdout_every=4)
    take(ref, consumed)
    state = ref.state_dict()
    assert set(state) == {"epoch", "documents", "offset"} and all(type(v) is int for v in state.values())
    fresh = stream(path, small_tok, holdout_every=4)
    fresh.load_state_dict(dict(state))
    for (x0, y0), (x1, y1) in zip(take(ref, 30), take(fresh, 30)):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert ref.epoch >= 1  # the comparison crossed an epoch boundary


def test_heldout_documents_are_disjoint_from_training(jsonl_corpus, small_tok):
    path, docs = jsonl_corpus
    assert [i for i in range(10) if is_heldout(i, 5)] == [4, 9] and not is_heldout(4, 0)
    val_docs = [d for i, d in enumerate(docs) if is_heldout(i, 5)]
    val = stream(path, small_tok, batch_size=1, holdout_every=5, heldout=True, loop=False)
    got = torch.cat([torch.cat([x, y[:, -1:]], 1).reshape(-1) for x, y in val])
    flat = tokenize_corpus(val_docs, small_tok)
    assert len(got) == len(flat) // 64 * 64
    assert torch.equal(got, torch.from_numpy(flat[: len(got)].astype(np.int64)))
    assert list(val) == []
    val.reset()
    assert next(val)[0].shape == (1, 63)


def test_too_small_corpus_names_the_need(tmp_path, small_tok):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "tiny"}\n')
    it = stream(str(path), small_tok, batch_size=4, dp_size=2, name="data.source='tiny.jsonl'")
    with pytest.raises(ValueError, match=r"tiny.jsonl'.*fewer tokens than one batch needs: .*4\*2\*64 = 512"):
        next(it)
