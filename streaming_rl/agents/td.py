"""Stream TD(λ): prediction of the state value under a uniformly random behaviour policy,
δ = r + γ·v(s′)·(1 − terminated) − v(s), updated by ObGD."""

from __future__ import annotations

import random

import numpy as np
import torch
from gymnasium import spaces

from streaming_rl.agents import register_agent
from streaming_rl.agents.base import AgentSpec, StreamAgent, make_optimizer
from streaming_rl.networks import ValueNetwork


def random_action(space: spaces.Space):
    """A uniform action from Python's `random` (checkpointed with the RNG streams)."""
    if isinstance(space, spaces.Discrete):
        return int(space.start) + random.randrange(int(space.n))
    if isinstance(space, spaces.Box) and np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)):
        u = np.array([random.random() for _ in range(space.low.size)]).reshape(space.shape)
        return (space.low + u * (space.high - space.low)).astype(space.dtype)
    raise ValueError(f"stream TD's random policy needs a Discrete or bounded Box action space, got {space}")


@register_agent("td")
class StreamTD(StreamAgent):
    def __init__(self, spec: AgentSpec):
        super().__init__(spec)
        c = spec.cfg
        self.networks["value"] = self.network(
            ValueNetwork(spec.obs_shape, 1, spec.hidden_size, c.hidden_layers, c.layer_norm))
        self.optimizers["value"] = make_optimizer(self.networks["value"].parameters(), c, c.kappa)

    def act(self, obs: torch.Tensor):
        return random_action(self.spec.action_space)

    def learn(self, obs, action, reward, next_obs, terminated, truncated) -> float:
        v = self.networks["value"](torch.stack((obs, next_obs))).squeeze(-1)
        v_s, v_next = v.tolist()
        delta = reward + (0.0 if terminated else self.cfg.gamma * v_next) - v_s
        opt = self.optimizers["value"]
        opt.zero_grad()
        v[0].backward(self._minus_one)
        opt.step(delta, reset=terminated or truncated)
        self.steps += 1
        return delta

    def value(self, obs: torch.Tensor) -> float:
        with torch.no_grad():
            return self.networks["value"](obs).item()
