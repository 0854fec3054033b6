"""Stream Q(λ) (Watkins): δ = r + γ·max_a′ q(s′, a′)·(1 − terminated) − q(s, a), updated by ObGD;
the eligibility traces are cleared AFTER the update when the episode ends or the action taken was
exploratory (its value below the greedy one)."""

from __future__ import annotations

import torch
from gymnasium import spaces

from streaming_rl.agents import register_agent
from streaming_rl.agents.base import AgentSpec, StreamAgent, make_optimizer
from streaming_rl.exploration import epsilon_greedy, linear_epsilon
from streaming_rl.networks import ValueNetwork


class EpsilonGreedyAgent(StreamAgent):
    """A Q network and its ObGD; ε follows the linear schedule over the run's total steps."""

    discrete_only = True

    def __init__(self, spec: AgentSpec):
        super().__init__(spec)
        if not isinstance(spec.action_space, spaces.Discrete):
            raise ValueError(f"stream {self.name} needs a Discrete action space, got {spec.action_space}")
        c = spec.cfg
        self.n_actions = int(spec.action_space.n)
        self.networks["q"] = self.network(
            ValueNetwork(spec.obs_shape, self.n_actions, spec.hidden_size, c.hidden_layers, c.layer_norm))
        self.optimizers["q"] = make_optimizer(self.networks["q"].parameters(), c, c.kappa)
        self._q = None  # q(s, ·) of the last act(), with its graph, for the learn() that follows
        self._q_list: list[float] = []
        self._exploratory = False

    def epsilon(self, step: int | None = None) -> float:
        c = self.cfg
        return linear_epsilon(self.steps if step is None else step, self.spec.total_steps,
                              self.spec.exploration_fraction, c.epsilon_start, c.epsilon_end)

    def _forward(self, obs: torch.Tensor) -> None:
        self._q = self.networks["q"](obs)
        self._q_list = self._q.tolist()

    def _update(self, action: int, target: float, reset: bool) -> float:
        delta = target - self._q_list[action]
        opt = self.optimizers["q"]
        opt.zero_grad()
        self._q[action].backward(self._minus_one)
        opt.step(delta, reset=reset)
        self._q = None
        self.steps += 1
        return delta


@register_agent("q")
class StreamQ(EpsilonGreedyAgent):
    def act(self, obs: torch.Tensor) -> int:
        self._forward(obs)
        action, self._exploratory = epsilon_greedy(self._q_list, self.epsilon())
        return action

    def learn(self, obs, action, reward, next_obs, terminated, truncated) -> float:
        target = reward
        if not terminated:
            with torch.no_grad():
                target += self.cfg.gamma * self.networks["q"](next_obs).max().item()
        return self._update(action, target, reset=terminated or truncated or self._exploratory)
