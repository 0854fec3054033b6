"""Online normalization for streaming learners: observations by their Welford running statistics
(trainer/running_stats.py), rewards by the running standard deviation of the discounted return
trace (stream-x).

Both are `Stateful`: their statistics are part of the learner and go through the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainer.running_stats import RunningMeanVar

EPS = 1e-8


def normalize(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """(x − μ)/√(σ² + 1e-8)."""
    return (x - mean) / np.sqrt(var + EPS)


def return_trace(u: float, reward: float, gamma: float, done: bool) -> float:
    """u ← γ·u·(1 − done) + r."""
    return gamma * u * (1.0 - float(done)) + reward


def scale_reward(reward: float, var_u: float) -> float:
    """r / √(Var u + 1e-8)  (no mean subtraction)."""
    return reward / float(np.sqrt(var_u + EPS))


class ObservationNormalizer(Stateful):
    """Statistics updated with each observation first, then (o − μ)/√(σ² + 1e-8); or the identity."""

    def __init__(self, shape: tuple[int, ...], enabled: bool = True):
        self.enabled = enabled
        self.stats = RunningMeanVar(shape)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return obs
        self.stats.update(obs)
        return normalize(obs, self.stats.mean, self.stats.var)

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)


class RewardScaler(Stateful):
    """r / √(Var u + 1e-8) with u the discounted return trace (reset at episode end); or the identity."""

    def __init__(self, gamma: float, enabled: bool = True):
        self.gamma = gamma
        self.enabled = enabled
        self.trace = np.zeros((), dtype=np.float64)
        self.stats = RunningMeanVar(())

    def __call__(self, reward: float, done: bool) -> float:
        if not self.enabled:
            return float(reward)
        self.trace[...] = return_trace(float(self.trace), reward, self.gamma, done)
        self.stats.update(self.trace)
        return scale_reward(reward, float(self.stats.var))

    def state_dict(self) -> dict:
        return {"return_trace": torch.from_numpy(self.trace), **self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.trace[...] = float(state["return_trace"])
        self.stats.load_state_dict({k: v for k, v in state.items() if k != "return_trace"})
