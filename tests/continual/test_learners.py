"""Learners: the reservoir, the EWC penalty and Fisher against hand computations, state through
LearnerState, and the learning each promises on the small streams."""

import torch
import torch.nn.functional as F

from continual.config import ContinualConfig
from continual.learners import (LEARNERS, EWC, LearnerSpec, LearnerState, build_learner, ewc_penalty,
                                learner_kind, reservoir_slot)
from continual.streams import build_stream, tensors


def spec(**o):
    return LearnerSpec(4, 3, ContinualConfig(**o), seed=0)


def test_registry_and_kinds():
    build_learner("finetune", spec())
    assert set(LEARNERS.names()) == {"finetune", "replay", "ewc", "kv_bottleneck", "tpp", "prompt_tpp"}
    assert learner_kind("prompt_tpp") == "events" and learner_kind("replay") == "experiences"


def test_reservoir_keeps_every_sample_with_equal_probability():
    assert [reservoir_slot(n, 3, 0) for n in range(3)] == [0, 1, 2]
    assert reservoir_slot(10, 3, 2) == 2 and reservoir_slot(10, 3, 3) == -1
    kept = torch.zeros(20)
    for seed in range(400):
        r = build_learner("replay", LearnerSpec(1, 2, ContinualConfig(replay_capacity=5), seed))
        r.after_experience(torch.arange(20.0)[:, None], torch.zeros(20, dtype=torch.int64))
        assert int(r.seen) == 20
        kept[r.buffer_x[:, 0].long()] += 1
    torch.testing.assert_close(kept / 400, torch.full((20,), 0.25), atol=0.08, rtol=0)


def test_ewc_penalty_and_fisher_by_hand():
    p, a, f = [torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 4.0])], [torch.tensor([2.0, 0.5])]
    assert float(ewc_penalty(p, a, f)) == 0.5 * (2 * 1 + 0.5 * 4)
    learner: EWC = build_learner("ewc", spec(hidden=5, hidden_layers=1))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    learner.after_experience(x, y)
    params = list(learner.net.parameters())
    manual = [torch.zeros_like(q) for q in params]
    for i in range(6):
        learner.net.zero_grad()
        F.cross_entropy(learner.net(x[i:i + 1]), y[i:i + 1]).backward()
        for m, q in zip(manual, params):
            m += q.grad ** 2 / 6
    for m, fisher in zip(manual, learner._ewc_state("fisher")):
        torch.testing.assert_close(fisher, m)
    assert float(ewc_penalty([q.detach() for q in params], learner._ewc_state("anchor"), learner._ewc_state("fisher"))) == 0.0


def test_learner_state_round_trip_restores_weights_buffers_and_rng():
    a = build_learner("replay", spec(replay_capacity=4, epochs=1))
    x, y = torch.randn(10, 4), torch.randint(3, (10,))
    a.train_experience(x, y)
    saved = {k: (v.clone() if torch.is_tensor(v) else {n: t.clone() for n, t in v.items()})
             for k, v in LearnerState(a).state_dict().items()}
    b = build_learner("replay", LearnerSpec(4, 3, ContinualConfig(replay_capacity=4, epochs=1), seed=9))
    LearnerState(b).load_state_dict(saved)
    a.train_experience(x, y)
    b.train_experience(x, y)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_baselines_and_bottleneck_on_split_digits():
    """Naive fine-tuning forgets everything but the last experience; replay and the bottleneck keep
    most of it (short runs: 5 epochs)."""
    s = build_stream("split_digits", 0)
    tests = [tensors(e.test) for e in s.experiences]
    acc = {}
    for name in ("finetune", "replay", "kv_bottleneck"):
        o = ContinualConfig(epochs=5, key_init_epochs=3, num_codebooks=32, key_value_pairs_per_codebook=128)
        learner = build_learner(name, LearnerSpec(s.dim, s.num_classes, o, 0))
        learner.prepare(s.unlabelled)
        for e in s.experiences:
            learner.train_experience(*tensors(e.train))
        acc[name] = sum(learner.accuracy(x, y) for x, y in tests) / len(tests)
    assert acc["finetune"] < 0.3 and acc["replay"] > 0.5 and acc["kv_bottleneck"] > 0.85, acc


def test_task_incremental_accuracy_takes_the_arg_max_within_the_experience():
    learner = build_learner("finetune", spec())
    with torch.no_grad():
        for p in learner.net.parameters():
            p.zero_()
        learner.net[-1].bias.copy_(torch.tensor([3.0, 2.0, 1.0]))  # always predicts class 0, then 1
    x, y = torch.randn(4, 4), torch.tensor([1, 1, 2, 1])
    assert learner.accuracy(x, y) == 0.0
    assert learner.accuracy(x, y, classes=(1, 2)) == 0.75


def test_llama_encoder_is_a_frozen_deterministic_plait_model():
    from continual.encoders import build_encoder

    x = torch.rand(5, 16)
    a, b = build_encoder("llama", 16, 32, seed=0), build_encoder("llama", 16, 32, seed=0)
    z = a(x)
    assert z.shape == (5, 32) and torch.equal(z, b(x)) and not any(p.requires_grad for p in a.parameters())
    assert not torch.equal(z, build_encoder("llama", 16, 32, seed=1)(x))
    learner = build_learner("kv_bottleneck", LearnerSpec(16, 3, ContinualConfig(encoder="llama", encoder_dim=32,
                                                                               num_codebooks=8, dim_keys=4), 0))
    assert learner.logits(x).shape == (5, 3)
