"""federated/pretrain.py: the base's central pretraining on other topics, cached on disk."""

from __future__ import annotations

import pytest
import torch

from federated import model as fm
from federated import pretrain as pre
from federated.data import TaskSpec, generate_with, keywords
from trainer.config import ModelConfig
from trainer.errors import ConfigError

MC = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
SPEC = TaskSpec(4, 12, MC.vocab_size, 0.3)


def test_pretraining_topics_are_disjoint_from_the_task():
    kw, task = pre.pretrain_keywords(SPEC, 0), keywords(SPEC, 0)
    assert kw.shape == (4, 6)  # 64 − 6 − 32 = 26 free content tokens: 6 per class
    assert not set(kw.flatten().tolist()) & set(task.flatten().tolist())
    assert len(set(kw.flatten().tolist())) == kw.numel() and int(kw.min()) >= SPEC.first_content
    assert pre.pretrain_keywords(TaskSpec(4, 16, 256, 0.3), 0).shape == (4, 8)
    with pytest.raises(ConfigError, match="task.base_pretrain_steps"):
        pre.pretrain_keywords(TaskSpec(4, 12, 40, 0.3), 0)  # 34 content tokens, 32 of them the task's


def test_pretrained_base_learns_the_format_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    p = pre.Pretraining(150, SPEC)
    w = pre.pretrained_weights(MC, 0, p)
    assert len(list((tmp_path / "cache" / "federated").glob("base-*.pt"))) == 1
    again = pre.pretrained_weights(MC, 0, p)  # from the cache
    assert all(torch.equal(w[k], again[k]) for k in w)
    assert all(torch.equal(w[k], v) for k, v in pre.train(MC, 0, p).items())  # a pure function of its inputs
    seed_init = fm.base_weights(MC, 0)
    assert not torch.equal(w["layers.0.attention.wq.weight"], seed_init["layers.0.attention.wq.weight"])
    # it answers its own topics well above chance (0.25) and the task's not at all better than chance
    model = fm.build_base(MC, 0, pretrain=p)
    tokens, labels = generate_with(SPEC, pre.pretrain_keywords(SPEC, 0), 256, seed=99)
    assert fm.accuracy(model, tokens, labels, SPEC.label_tokens) > 0.6
    tokens, labels = generate_with(SPEC, keywords(SPEC, 0), 256, seed=99)
    assert fm.accuracy(model, tokens, labels, SPEC.label_tokens) < 0.45


def test_base_pretrain_steps_reach_every_model_the_task_builds(tmp_path, monkeypatch):
    """task.base_pretrain_steps: the planner's base, the clients' and the merged model are the pretrained one."""
    from types import SimpleNamespace

    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    c = SimpleNamespace(base_pretrain_steps=20, num_classes=4, seq_len=12, keyword_prob=0.3)
    p = pre.of(c, MC)
    assert p == pre.Pretraining(20, SPEC) and pre.of(SimpleNamespace(base_pretrain_steps=0), MC) is None
    w = pre.pretrained_weights(MC, 0, p)
    plain = fm.merged(MC, 0, {}, pretrain=p).state_dict()
    assert all(torch.equal(plain[k], v) for k, v in w.items())
    hf = fm.plait_state_dict(fm.merged(MC, 0, {}, kind="hf", pretrain=p))
    assert all(torch.equal(hf[k], v) for k, v in w.items())
