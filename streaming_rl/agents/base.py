"""What every stream-x learner shares: its spec, the optimizer switch, and checkpointable parts."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from streaming_rl.config import StreamConfig
from streaming_rl.networks import initialize_
from streaming_rl.obgd import AdaptiveObGD, ObGD
from trainer.checkpoint.state import ModelState, OptimizerState


@dataclass
class AgentSpec:
    cfg: StreamConfig
    obs_shape: tuple[int, ...]
    action_space: gym.Space
    hidden_size: int
    total_steps: int  # environment steps of the whole run (the ε schedule's horizon)
    exploration_fraction: float = 0.05


def make_optimizer(params, cfg: StreamConfig, kappa: float) -> ObGD:
    """`obgd`, `adaptive_obgd`, or `sgd` (the same traces without the overshooting bound)."""
    common = dict(lr=cfg.lr, gamma=cfg.gamma, lamda=cfg.lamda, kappa=kappa)
    if cfg.optimizer == "adaptive_obgd":
        return AdaptiveObGD(params, beta2=cfg.beta2, eps=cfg.eps, **common)
    return ObGD(params, overshoot_bound=cfg.optimizer == "obgd", **common)


class StreamAgent(Stateful, abc.ABC):
    """One transition at a time: `act(obs)`, then `learn(obs, action, reward, next_obs, ...)`.

    `act` may keep the forward pass of `obs` for the `learn` that follows (no update happens in
    between), so the two are called in pairs. Observations are float32 tensors, already normalized.
    """

    name = ""
    discrete_only = False

    def __init__(self, spec: AgentSpec):
        self.spec = spec
        self.cfg = spec.cfg
        self.steps = 0  # transitions learned from: the ε schedule's position
        self.networks = nn.ModuleDict()
        self.optimizers: dict[str, ObGD] = {}
        self._minus_one = torch.tensor(-1.0)  # backward(−1): the gradient of −output

    def network(self, module: nn.Module) -> nn.Module:
        return initialize_(module, self.cfg.init, self.cfg.sparsity)

    @abc.abstractmethod
    def act(self, obs: torch.Tensor):
        """The action to take in `obs` (and whatever `learn` needs to remember of it)."""

    @abc.abstractmethod
    def learn(self, obs: torch.Tensor, action, reward: float, next_obs: torch.Tensor,
              terminated: bool, truncated: bool) -> float:
        """Update from one transition; returns the TD error δ."""

    def components(self) -> dict[str, Stateful]:
        """Weights, optimizer state (eligibility traces), and the agent's own counters."""
        out: dict[str, Stateful] = {"networks": ModelState([self.networks])}
        for key, opt in self.optimizers.items():
            out[f"optimizer_{key}"] = OptimizerState([self.networks], opt)
        out["agent"] = self
        return out

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
