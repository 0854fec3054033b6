"""bench/stream_x.py times Plait against a straightforward per-parameter implementation: check
that the two are the same algorithm (same weights after the same transitions), so the speed-up
it reports is not bought by doing less."""

import importlib.util
import random
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from streaming_rl.agents import AgentSpec, build_agent
from streaming_rl.config import StreamConfig

BENCH = Path(__file__).resolve().parents[2] / "bench" / "stream_x.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("stream_x_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_linears(src_modules, dst_modules):
    with torch.no_grad():
        for s, d in zip(src_modules, dst_modules):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


def test_q_matches_the_reference(bench):
    torch.manual_seed(0)
    random.seed(0)
    ref = bench.RefStreamQ(4, 2, total_steps=150_000)
    agent = build_agent("q", AgentSpec(cfg=StreamConfig(), obs_shape=(4,), action_space=gym.spaces.Discrete(2),
                                       hidden_size=32, total_steps=150_000))
    ref_linears = [m for m in ref.net if isinstance(m, torch.nn.Linear)]
    copy_linears(ref_linears, [*agent.networks["q"].torso.layers, agent.networks["q"].head])
    env = bench.RefScaleReward(bench.RefNormalizeObservation(gym.make("CartPole-v1")), 0.99)
    s, _ = env.reset(seed=0)
    for _ in range(800):
        st = torch.tensor(s, dtype=torch.float32)
        a = agent.act(st)  # Plait chooses; both learn from the same transition
        s2, r, term, trunc, _ = env.step(a)
        s2t = torch.tensor(s2, dtype=torch.float32)
        exploratory = agent._exploratory
        agent.learn(st, a, float(r), s2t, term, trunc)
        ref.update(st, a, float(r), s2t, term, trunc, exploratory)
        s = env.reset()[0] if term or trunc else s2
    assert max_diff(agent.networks["q"].parameters(), ref.net.parameters()) < 1e-4


def test_ac_matches_the_reference(bench):
    torch.manual_seed(0)
    ref = bench.RefStreamAC(11, 3)
    space = gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
    agent = build_agent("ac", AgentSpec(cfg=StreamConfig(agent="ac"), obs_shape=(11,), action_space=space,
                                        hidden_size=128, total_steps=1000))
    actor, critic = agent.networks["actor"], agent.networks["critic"]
    copy_linears([ref.actor.body[0], ref.actor.body[3], ref.actor.mu, ref.actor.pre_std],
                 [*actor.torso.layers, actor.mean, actor.pre_std])
    copy_linears([ref.critic[0], ref.critic[3], ref.critic[6]], [*critic.torso.layers, critic.head])
    env = bench.RefScaleReward(bench.RefNormalizeObservation(gym.make("Hopper-v5")), 0.99)
    s, _ = env.reset(seed=0)
    for _ in range(150):
        st = torch.tensor(s, dtype=torch.float32)
        clipped = agent.act(st)
        sampled = agent._policy[0].clone()
        s2, r, term, trunc, _ = env.step(clipped)
        s2t = torch.tensor(s2, dtype=torch.float32)
        agent.learn(st, clipped, float(r), s2t, term, trunc)
        ref.update(st, sampled, float(r), s2t, term, trunc)
        s = env.reset()[0] if term or trunc else s2
    assert max_diff(actor.parameters(), [*ref.actor.body.parameters(), *ref.actor.mu.parameters(),
                                         *ref.actor.pre_std.parameters()]) < 1e-4
    assert max_diff(critic.parameters(), ref.critic.parameters()) < 1e-4


def test_stored_seeds_are_reused_only_from_the_same_code(bench, tmp_path, monkeypatch):
    job = ("stream_q", "q", "CartPole-v1", 0, 300, {"lr": 1.0}, str(tmp_path))
    run = bench.learning_run(job)
    assert run["diverged_at"] is None and run["episodes"] and run["code"] == bench.code_version()
    assert bench.finished(job)
    assert not bench.finished((*job[:4], 400, *job[5:]))  # other steps
    monkeypatch.setattr(bench, "code_version", lambda: "another-commit")
    assert not bench.finished(job)


def test_bad_options_are_not_counted_as_divergence(bench, tmp_path):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="task.lr"):
        bench.learning_run(("stream_q", "q", "CartPole-v1", 0, 300, {"lr": -1.0}, str(tmp_path)))
    assert not list(tmp_path.rglob("bench_result.json"))


@pytest.mark.parametrize("code", [2, 75])
def test_only_exit_1_is_divergence(bench, tmp_path, monkeypatch, code):
    import streaming_rl.run

    def stops(cfg, env):
        raise SystemExit(code)

    monkeypatch.setattr(streaming_rl.run, "run", stops)
    with pytest.raises(SystemExit) as exit_:
        bench.learning_run(("stream_q", "q", "CartPole-v1", 0, 300, {}, str(tmp_path)))
    assert exit_.value.code == code and not list(tmp_path.rglob("bench_result.json"))
    monkeypatch.setattr(streaming_rl.run, "run", lambda cfg, env: (_ for _ in ()).throw(SystemExit(1)))
    assert bench.learning_run(("stream_q", "q", "CartPole-v1", 0, 300, {}, str(tmp_path)))["diverged_at"] == 0
