"""Tokenizer: BPE training and its cache, loading a supplied tokenizer.json, EOS, cache dir."""

import os

import pytest

from trainer.config import DataConfig
from trainer.data import tokenizer as tokmod
from trainer.data.cache import atomic_path, cache_root
from trainer.data.tokenizer import (EOS, build_tokenizer, eos_id, tokenizer_cache_path,
                                    tokenizer_hash)


def test_trained_bpe_is_cached_and_reloads_identically(cache_dir, monkeypatch):
    cfg = DataConfig(cache_dir=cache_dir, tokenizer_train_bytes=300_000)
    tok = build_tokenizer(cfg, 600)
    path = tokenizer_cache_path(cfg, 600)
    assert path.parent == cache_root(cache_dir) / "tokenizers" and path.name.endswith("-b300000-v600.json")
    assert path.exists() and not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]
    assert tok.get_vocab_size() <= 600 and eos_id(tok) == 0 and tok.id_to_token(0) == EOS

    def no_training(*args):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(tokmod, "train_bpe", no_training)
    again = build_tokenizer(cfg, 600)
    assert tokenizer_hash(again) == tokenizer_hash(tok) and again.to_str() == tok.to_str()
    text = "def f(x):\n    return x  # ok"
    assert again.encode(text).ids == tok.encode(text).ids


def test_roundtrip_encode_decode(small_tok):
    for text in ["def foo(bar):\n\treturn bar ** 2\n", "héllo wörld 数据 🙂", "  spaces  \n\n", ""]:
        assert small_tok.decode(small_tok.encode(text).ids) == text
    assert len(small_tok.encode("import os\nimport sys\n").ids) < len("import os\nimport sys\n")


def test_supplied_tokenizer_is_loaded_and_checked_against_vocab(tmp_path, small_tok):
    path = str(tmp_path / "tok.json")
    small_tok.save(path)
    loaded = build_tokenizer(DataConfig(tokenizer=path), 512)
    assert loaded.to_str() == small_tok.to_str()
    n = small_tok.get_vocab_size()
    with pytest.raises(ValueError, match=rf"has {n} tokens but model.vocab_size=300"):
        build_tokenizer(DataConfig(tokenizer=path), 300)
    with pytest.raises(ValueError, match="no such file"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "none.json")), 512)


def test_vocab_too_small_for_bytes(cache_dir):
    with pytest.raises(ValueError, match=r"model.vocab_size=100 is too small .* >= 257"):
        build_tokenizer(DataConfig(cache_dir=cache_dir, tokenizer_train_bytes=1000), 100)


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "env"))
    assert cache_root("") == tmp_path / "env"
    assert cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.delenv("PLAIT_CACHE")
    assert cache_root("") == cache_root("~/.cache/plait")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "d" / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path / "d") == []
    with atomic_path(target) as tmp:
        open(tmp, "wb").write(b"whole")
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path / "d") == ["x.bin"]
