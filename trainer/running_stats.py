"""Running statistics of a stream, one sample at a time (Welford 1962): what streaming learners
normalize observations with and continual learners track drift with. `RunningMeanVar` is a
`Stateful`, so its statistics go through the checkpoint with the learner that owns them."""

from __future__ import annotations

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful


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
