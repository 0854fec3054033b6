"""build_data: the bundle, rank-0-builds protocol with a barrier, streaming, too-little-data errors."""

import threading

import pytest
import torch

from trainer.config import DataConfig
from trainer.data import build_data, packing, tokenizer
from trainer.data.packing import PackedBatches
from trainer.data.streaming import StreamingPackedBatches

SMALL = dict(tokenizer_train_bytes=300_000, max_tokens=40_000, seq_len=16, val_fraction=0.1)


def test_stdlib_bundle(cache_dir):
    cfg = DataConfig(cache_dir=cache_dir, **SMALL)
    data = build_data(cfg, vocab_size=512, batch_size=4, dp_rank=0, dp_size=1, seed=0)
    assert isinstance(data.train, PackedBatches) and data.num_tokens == 40_000 and data.eos_id == 0
    assert data.tokenizer.get_vocab_size() <= 512
    x, y = next(data.train)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    first, again = list(data.val()), list(data.val())
    assert len(first) == 4_000 // 17 // 4 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert first[0][0].shape == (4, 16)
    assert int(x.max()) < 512


def test_ranks_share_rank0_cache_through_barrier(cache_dir, monkeypatch):
    """Two ranks as threads: only the main rank trains and tokenizes; the other loads after the barrier."""
    cfg = DataConfig(cache_dir=cache_dir, **SMALL)
    built = []
    train_bpe, tokenize = tokenizer.train_bpe, packing.tokenize_corpus
    monkeypatch.setattr(tokenizer, "train_bpe", lambda *a: built.append("tok") or train_bpe(*a))
    monkeypatch.setattr(packing, "tokenize_corpus", lambda *a: built.append("tokens") or tokenize(*a))
    barrier, out = threading.Barrier(2, timeout=60), {}

    def rank(r):
        out[r] = build_data(cfg, 512, 2, dp_rank=r, dp_size=2, seed=5, is_main=r == 0, barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(built) == ["tok", "tokens"] and set(out) == {0, 1}
    single = build_data(cfg, 512, 4, dp_rank=0, dp_size=1, seed=5)
    x = torch.cat([next(out[0].train)[0], next(out[1].train)[0]])
    assert torch.equal(x, next(single.train)[0])


def test_main_rank_failure_still_meets_the_barrier(tmp_path):
    calls = []
    cfg = DataConfig(source=str(tmp_path / "missing.jsonl"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="no such file or directory"):
        build_data(cfg, 512, 2, 0, 1, 0, is_main=True, barrier=lambda: calls.append(1))
    assert calls == [1]


def test_not_enough_tokens_names_source_count_and_need(cache_dir):
    cfg = DataConfig(cache_dir=cache_dir, **{**SMALL, "max_tokens": 2_000})
    with pytest.raises(ValueError, match=r"data.source='stdlib' gives 2000 tokens .* 1800 of them training .*"
                                         r"= 32\*4\*17 = 2176 training tokens"):
        build_data(cfg, 512, 32, 0, 4, 0)
    with pytest.raises(ValueError, match=r"200 of them validation \(data.val_fraction=0.1\)"):
        build_data(cfg, 512, 16, 0, 1, 0)
    ok = build_data(DataConfig(cache_dir=cache_dir, **{**SMALL, "max_tokens": 2_000, "val_fraction": 0.0}),
                    512, 8, 0, 1, 0)
    assert list(ok.val()) == []


@pytest.mark.parametrize("key, value", [("val_fraction", 1.0), ("val_fraction", -0.1), ("max_tokens", -1),
                                        ("tokenizer_train_bytes", 0)])
def test_out_of_range_config_is_refused(cache_dir, key, value):
    from trainer.config import ConfigError, validate

    with pytest.raises(ConfigError, match=rf"data.{key}={value} is out of range; allowed: "):
        validate({"data": {"cache_dir": cache_dir, key: value}})


def test_streaming_bundle_resumes(jsonl_corpus, cache_dir):
    path, _ = jsonl_corpus
    cfg = DataConfig(source=path, streaming=True, cache_dir=cache_dir, seq_len=31, val_fraction=0.2,
                     tokenizer_train_bytes=100_000)
    data = build_data(cfg, 300, 2, 0, 1, seed=0)
    assert isinstance(data.train, StreamingPackedBatches) and data.num_tokens is None
    for _ in range(5):
        next(data.train)
    again = build_data(cfg, 300, 2, 0, 1, seed=0)
    again.train.load_state_dict(data.train.state_dict())
    assert torch.equal(next(again.train)[0], next(data.train)[0])
    val = list(data.val())
    assert val and val[0][0].shape == (2, 31) and torch.equal(list(data.val())[-1][0], val[-1][0])
    with pytest.raises(ValueError, match=r"data.source=.*corpus.jsonl.*fewer tokens than one batch needs"):
        build_data(cfg, 300, 400, 0, 1, seed=0)
