"""Shared fixtures for the data pipeline tests: offline `datasets`, tmp caches, small corpora."""

import atexit
import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:  # keep non-streaming Arrow caches out of ~/.cache
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="plait-test-hf-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

import pytest  # noqa: E402

from trainer.config import DataConfig  # noqa: E402
from trainer.data.tokenizer import build_tokenizer  # noqa: E402

def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({field: text, "id": i}) + "\n")
    return path


def make_docs(n, seed=0):
    """`n` documents of varying length (a few tokens to about 150), deterministic."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "(", ")", "\n", "é", "数据"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for i in range(n)]


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture(scope="session")
def small_tok(tmp_path_factory):
    """A 512-token BPE trained on 300 kB of the stdlib (cached in a session tmp dir)."""
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("tokcache")), tokenizer_train_bytes=300_000)
    return build_tokenizer(cfg, 512)


@pytest.fixture
def jsonl_corpus(tmp_path):
    """(path, documents): 60 generated documents in a .jsonl file."""
    docs = make_docs(60)
    return str(write_jsonl(tmp_path / "corpus.jsonl", docs)), docs
