"""The four learners, one transition at a time: their TD errors and when traces are cleared."""

import random

import gymnasium as gym
import numpy as np
import pytest
import torch

from streaming_rl.agents import AGENTS, AgentSpec, build_agent
from trainer.errors import ConfigError
from streaming_rl.config import StreamConfig
from streaming_rl.obgd import TRACE


def spec(action_space, obs_dim=4, **options):
    return AgentSpec(cfg=StreamConfig(**options), obs_shape=(obs_dim,), action_space=action_space,
                     hidden_size=16, total_steps=1000)


def traces(agent, key):
    return agent.optimizers[key]._buffers[TRACE]


def test_registry_has_the_four_learners():
    assert sorted(AGENTS) == ["ac", "q", "sarsa", "td"]
    with pytest.raises(ConfigError, match="task.agent='dqn' is not a registered stream agent; allowed: ac, q, sarsa, td"):
        build_agent("dqn", spec(gym.spaces.Discrete(2)))
    with pytest.raises(ValueError, match="Discrete"):
        build_agent("q", spec(gym.spaces.Box(-1, 1, (2,))))


def test_q_td_error_and_trace_reset_after_the_update_on_exploration():
    torch.manual_seed(0)
    random.seed(0)
    s, s2 = torch.randn(4), torch.randn(4)
    greedy = build_agent("q", spec(gym.spaces.Discrete(3), epsilon_start=0.0, epsilon_end=0.0))
    a = greedy.act(s)
    q_s = greedy.networks["q"](s).tolist()
    target = 0.5 + 0.99 * greedy.networks["q"](s2).max().item()
    delta = greedy.learn(s, a, 0.5, s2, False, False)
    assert a == int(np.argmax(q_s)) and delta == pytest.approx(target - q_s[a], abs=1e-6)
    assert traces(greedy, "q").abs().sum() > 0  # greedy, not done: the trace carries on
    greedy.act(s2)
    greedy.learn(s2, 0, 1.0, s, True, False)
    assert traces(greedy, "q").abs().sum() == 0  # episode end

    explore = build_agent("q", spec(gym.spaces.Discrete(3), epsilon_start=1.0, epsilon_end=1.0))
    before = [p.detach().clone() for p in explore.networks.parameters()]
    while True:  # draw until the action is exploratory (below the greedy value)
        a = explore.act(s)
        if explore._exploratory:
            break
        explore.learn(s, a, 0.0, s2, False, False)
        explore.optimizers["q"].reset_traces()
        before = [p.detach().clone() for p in explore.networks.parameters()]
    explore.learn(s, a, 1.0, s2, False, False)
    moved = any(not torch.equal(p, b) for p, b in zip(explore.networks.parameters(), before))
    assert moved and traces(explore, "q").abs().sum() == 0  # updated with the trace, THEN cleared


def test_terminal_transitions_do_not_bootstrap():
    torch.manual_seed(0)
    agent = build_agent("td", spec(gym.spaces.Discrete(2)))
    s, s2 = torch.randn(4), torch.randn(4)
    v_s = agent.networks["value"](s).item()
    assert agent.learn(s, agent.act(s), 2.0, s2, True, False) == pytest.approx(2.0 - v_s, abs=1e-6)
    v_s, v_2 = agent.networks["value"](s).item(), agent.networks["value"](s2).item()
    assert agent.learn(s, 0, 2.0, s2, False, True) == pytest.approx(2.0 + 0.99 * v_2 - v_s, abs=1e-6)


def test_sarsa_takes_the_action_its_update_chose():
    torch.manual_seed(0)
    random.seed(1)
    agent = build_agent("sarsa", spec(gym.spaces.Discrete(3), epsilon_start=0.5, epsilon_end=0.5))
    s, s2 = torch.randn(4), torch.randn(4)
    a = agent.act(s)
    q_next = agent.networks["q"](s2).tolist()
    q_sa = agent.networks["q"](s)[a].item()
    delta = agent.learn(s, a, 1.0, s2, False, False)
    a2 = agent.next_action
    assert delta == pytest.approx(1.0 + 0.99 * q_next[a2] - q_sa, abs=1e-6)
    assert agent.act(s2) == a2
    agent.learn(s2, a2, 0.0, s, True, False)
    assert agent.next_action == -1 and traces(agent, "q").abs().sum() == 0


@pytest.mark.parametrize("space", [gym.spaces.Box(-0.4, 0.4, (3,)), gym.spaces.Discrete(2)])
def test_actor_critic_steps_both_optimizers_with_the_critics_delta(space):
    torch.manual_seed(0)
    agent = build_agent("ac", spec(space))
    s, s2 = torch.randn(4), torch.randn(4)
    action = agent.act(s)
    if isinstance(space, gym.spaces.Box):
        assert action.shape == (3,) and np.all(np.abs(action) <= 0.4) and action.dtype == np.float32
    v_s, v_2 = agent.networks["critic"](s).item(), agent.networks["critic"](s2).item()
    delta = agent.learn(s, action, 1.0, s2, False, False)
    assert delta == pytest.approx(1.0 + 0.99 * v_2 - v_s, abs=1e-6)
    assert traces(agent, "actor").abs().sum() > 0 and traces(agent, "critic").abs().sum() > 0
    assert agent.optimizers["actor"].defaults["kappa"] == 3.0 and agent.optimizers["critic"].defaults["kappa"] == 2.0
    agent.learn(s2, agent.act(s2), 0.0, s, False, True)
    assert traces(agent, "actor").abs().sum() == 0 and traces(agent, "critic").abs().sum() == 0


def test_gaussian_actor_output_has_the_gradient_of_log_prob_plus_entropy():
    from streaming_rl.agents.ac import gaussian_actor_output, gaussian_entropy, gaussian_log_prob

    mean = torch.randn(3, requires_grad=True)
    pre = torch.randn(3, requires_grad=True)
    action = torch.randn(3)
    std = torch.nn.functional.softplus(pre)
    dist = torch.distributions.Normal(mean, std)
    assert gaussian_log_prob(action, mean, std).item() == pytest.approx(dist.log_prob(action).sum().item(), rel=1e-5)
    assert gaussian_entropy(std).item() == pytest.approx(dist.entropy().sum().item(), rel=1e-5)
    coef = -0.01
    ref = torch.autograd.grad(dist.log_prob(action).sum() + coef * dist.entropy().sum(), (mean, pre))
    std = torch.nn.functional.softplus(pre)
    got = torch.autograd.grad(gaussian_actor_output(action, mean, std, coef), (mean, pre))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r)
