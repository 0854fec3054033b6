"""Shared test fixtures: forked gloo ranks, offline W&B/HF, a private cache directory."""

from __future__ import annotations

import os

import pytest
import torch

from plait_testing import compose, run_ranks

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: on 2 shared cores tiny models run faster, and forked ranks never inherit a busy pool.
torch.set_num_threads(1)


@pytest.fixture(name="run_ranks")
def run_ranks_fixture():
    return run_ranks


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tokenizer/token caches shared by the session's tests, never the user's ~/.cache."""
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path_factory.getbasetemp() / "plait-cache"))


@pytest.fixture(name="tiny_cfg")
def tiny_cfg_fixture(tmp_path):
    return lambda *overrides, run_dir=None: compose(list(overrides), run_dir or tmp_path / "run")
