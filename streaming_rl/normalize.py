"""Online normalization for streaming learners: Welford running statistics of observations, and
reward scaling by the running standard deviation of the discounted return trace (stream-x).

Both are `Stateful`: their statistics are part of the learner and go through the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

EPS = 1e-8


def welford_update(count: int, mean: np.ndarray, m2: np.ndarray, x: np.ndarray) -> int:
    """n ← n+1;  d = x − μ;  μ ← μ + d/n;  M₂ ← M₂ + d·(x − μ)   (in place on mean, m2; returns n)."""
    count += 1
    d = x - mean
    mean += d / count
    m2 += d * (x - mean)
    return count


def welford_variance(count: int, m2: np.ndarray) -> np.ndarray:
    """σ² = M₂/(n−1) for n ≥ 2, else 1."""
    return m2 / (count - 1) if count >= 2 else np.ones_like(m2)


def normalize(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """(x − μ)/√(σ² + 1e-8)."""
    return (x - mean) / np.sqrt(var + EPS)


def return_trace(u: float, reward: float, gamma: float, done: bool) -> float:
    """u ← γ·u·(1 − done) + r."""
    return gamma * u * (1.0 - float(done)) + reward


def scale_reward(reward: float, var_u: float) -> float:
    """r / √(Var u + 1e-8)  (no mean subtraction)."""
    return reward / float(np.sqrt(var_u + EPS))


class RunningMeanVar(Stateful):
    """Welford mean and variance of a stream of arrays of one shape (float64)."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.count = 0
        self.mean = np.zeros(shape, dtype=np.float64)
        self.m2 = np.zeros(shape, dtype=np.float64)

    def update(self, x: np.ndarray | float) -> None:
        self.count = welford_update(self.count, self.mean, self.m2, x)

    @property
    def var(self) -> np.ndarray:
        return welford_variance(self.count, self.m2)

    def state_dict(self) -> dict:
        # tensors that share memory with the arrays: a checkpoint load fills them in place
        return {"count": torch.tensor(self.count, dtype=torch.int64),
                "mean": torch.from_numpy(self.mean), "m2": torch.from_numpy(self.m2)}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean[...] = np.asarray(state["mean"], dtype=np.float64)
        self.m2[...] = np.asarray(state["m2"], dtype=np.float64)


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
