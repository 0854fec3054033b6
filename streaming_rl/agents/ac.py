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


def gaussian_log_prob(action: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(a; μ, σ²) = Σ −(a−μ)²/(2σ²) − log σ − ½ log 2π."""
    return (-0.5 * ((action - mean) / std) ** 2 - std.log() - HALF_LOG_2PI).sum()


def gaussian_entropy(std: torch.Tensor) -> torch.Tensor:
    """H(N(μ, σ²)) = Σ ½ + ½ log 2π + log σ."""
    return (0.5 + HALF_LOG_2PI + std.log()).sum()


def gaussian_actor_output(action, mean, std, coef: float) -> torch.Tensor:
    """log π(a|s) + coef·H(π), less the constants (they have no gradient):
    Σ −½((a−μ)/σ)² + (coef − 1)·log σ."""
    return (-0.5 * ((action - mean) / std) ** 2 + (coef - 1.0) * std.log()).sum()


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
        self._policy = None  # the last act()'s policy outputs and action, with their graph
        self._grads = (self._minus_one, self._minus_one)

    def act(self, obs: torch.Tensor):
        if self.continuous:
            mean, std = self.networks["actor"](obs)
            with torch.no_grad():
                action = mean + std * torch.randn_like(mean)
            self._policy = (action, mean, std)
            # the sampled action is learned from; the environment gets it clipped to its bounds
            return np.clip(action.numpy().astype(self._low.dtype), self._low, self._high)
        log_p = F.log_softmax(self.networks["actor"](obs), dim=-1)
        with torch.no_grad():
            action = int(torch.multinomial(log_p.exp(), 1))
        self._policy = (action, log_p)
        return action

    def _actor_output(self, sign: int) -> torch.Tensor:
        coef = self.cfg.entropy_coef * sign
        if self.continuous:
            return gaussian_actor_output(*self._policy, coef)
        action, log_p = self._policy
        return log_p[action] - coef * (log_p.exp() * log_p).sum()

    def learn(self, obs, action, reward, next_obs, terminated, truncated) -> float:
        v = self.networks["critic"](torch.stack((obs, next_obs))).squeeze(-1)
        v_s, v_next = v.tolist()
        delta = reward + (0.0 if terminated else self.cfg.gamma * v_next) - v_s
        done = terminated or truncated
        critic, actor = self.optimizers["critic"], self.optimizers["actor"]
        critic.zero_grad()
        actor.zero_grad()
        # the two networks share no parameter: one backward pass fills both gradients
        torch.autograd.backward((v[0], self._actor_output((delta > 0) - (delta < 0))), self._grads)
        critic.step(delta, reset=done)
        actor.step(delta, reset=done)
        self._policy = None
        self.steps += 1
        return delta
