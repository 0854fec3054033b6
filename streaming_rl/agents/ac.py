"""Stream AC(λ): a critic v and an actor π, each with its own ObGD (κ_value = 2, κ_policy = 3),
both stepped with the critic's δ = r + γ·v(s′)·(1 − terminated) − v(s). The actor's output is
log π(a|s) + c·sign(δ)·H(π(·|s)) (c = 0.01). Continuous actions come from a Gaussian with a
softplus std head and are clipped to the action space; discrete ones from a softmax."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces

from streaming_rl.agents import register_agent
from streaming_rl.agents.base import AgentSpec, StreamAgent, make_optimizer
from streaming_rl.networks import CategoricalPolicy, GaussianPolicy, ValueNetwork

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob_entropy(action: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    """log N(a; μ, σ²) = −(a−μ)²/(2σ²) − log σ − ½log 2π;  H = ½ + ½log 2π + log σ  (summed over dims)."""
    log_std = std.log()
    log_prob = (-((action - mean) ** 2) / (2 * std**2) - log_std - HALF_LOG_2PI).sum()
    entropy = (0.5 + HALF_LOG_2PI + log_std).sum()
    return log_prob, entropy


@register_agent("ac")
class StreamAC(StreamAgent):
    def __init__(self, spec: AgentSpec):
        super().__init__(spec)
        c, space = spec.cfg, spec.action_space
        self.continuous = isinstance(space, spaces.Box)
        if self.continuous:
            if len(space.shape) != 1:
                raise ValueError(f"stream ac needs a flat Box action space, got {space}")
            actor = GaussianPolicy(spec.obs_shape, space.shape[0], spec.hidden_size, c.hidden_layers, c.layer_norm)
            self._low, self._high = space.low, space.high
        elif isinstance(space, spaces.Discrete):
            actor = CategoricalPolicy(spec.obs_shape, int(space.n), spec.hidden_size, c.hidden_layers, c.layer_norm)
        else:
            raise ValueError(f"stream ac needs a Box or Discrete action space, got {space}")
        self.networks["actor"] = self.network(actor)
        self.networks["critic"] = self.network(
            ValueNetwork(spec.obs_shape, 1, spec.hidden_size, c.hidden_layers, c.layer_norm))
        self.optimizers["actor"] = make_optimizer(self.networks["actor"].parameters(), c, c.kappa_policy)
        self.optimizers["critic"] = make_optimizer(self.networks["critic"].parameters(), c, c.kappa)
        self._log_prob = self._entropy = None  # of the last act(), with their graphs

    def act(self, obs: torch.Tensor):
        if self.continuous:
            mean, std = self.networks["actor"](obs)
            with torch.no_grad():
                action = mean + std * torch.randn_like(mean)
            self._log_prob, self._entropy = gaussian_log_prob_entropy(action, mean, std)
            # the sampled action is learned from; the environment gets it clipped to its bounds
            return np.clip(action.numpy().astype(self._low.dtype), self._low, self._high)
        log_p = F.log_softmax(self.networks["actor"](obs), dim=-1)
        with torch.no_grad():
            action = int(torch.multinomial(log_p.exp(), 1))
        self._log_prob = log_p[action]
        self._entropy = -(log_p.exp() * log_p).sum()
        return action

    def learn(self, obs, action, reward, next_obs, terminated, truncated) -> float:
        v = self.networks["critic"](torch.stack((obs, next_obs))).squeeze(-1)
        v_s, v_next = v.tolist()
        delta = reward + (0.0 if terminated else self.cfg.gamma * v_next) - v_s
        done = terminated or truncated
        critic, actor = self.optimizers["critic"], self.optimizers["actor"]
        critic.zero_grad()
        v[0].backward(self._minus_one)
        critic.step(delta, reset=done)
        sign = (delta > 0) - (delta < 0)
        actor.zero_grad()
        (self._log_prob + self.cfg.entropy_coef * sign * self._entropy).backward(self._minus_one)
        actor.step(delta, reset=done)
        self._log_prob = self._entropy = None
        self.steps += 1
        return delta
