"""Online (sample-by-sample) classifiers for stream-based active learning (`task.learner` of
`task=active`): each gives class probabilities for one sample and learns from one labelled sample.

Inputs are standardised by Welford running statistics updated with every sample seen, labelled or
not (inputs are free; labels cost budget). Arithmetic is float64 and free of autograd: a step is a
handful of small tensor operations, so a stream of thousands of samples runs in well under a second.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainer.registry import Registry
from trainer.running_stats import RunningMeanVar

ONLINE_LEARNERS: Registry[type["OnlineLearner"]] = Registry("online learner", key="task.learner")


def softmax_regression_step(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, p: torch.Tensor, y: int,
                            lr: float, l2: float) -> None:
    """W ← W − η((p − e_y) xᵀ + λW);  b ← b − η(p − e_y)   (in place; the cross-entropy gradient)."""
    g = p.clone()
    g[y] -= 1.0
    W.mul_(1.0 - lr * l2).sub_(torch.outer(g, x), alpha=lr)
    b.sub_(g, alpha=lr)


class OnlineLearner(Stateful):
    def __init__(self, dim: int, num_classes: int, lr: float, l2: float, seed: int = 0):
        self.scaler = RunningMeanVar((dim,))
        self.num_classes, self.lr, self.l2 = num_classes, lr, l2

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Update the running statistics with x, then (x − μ)/σ."""
        xn = x.numpy()
        self.scaler.update(xn)
        return torch.from_numpy((xn - self.scaler.mean) / np.sqrt(self.scaler.var + 1e-8))

    def predict_proba(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def learn(self, z: torch.Tensor, p: torch.Tensor, y: int) -> None:
        raise NotImplementedError


@ONLINE_LEARNERS.register("logistic")
class SoftmaxRegression(OnlineLearner):
    """Multinomial logistic regression trained by per-sample SGD (`task.lr`, `task.l2`)."""

    def __init__(self, dim: int, num_classes: int, lr: float, l2: float, seed: int = 0):
        super().__init__(dim, num_classes, lr, l2, seed)
        self.W = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.b = torch.zeros(num_classes, dtype=torch.float64)

    def predict_proba(self, z):
        return torch.softmax(self.W @ z + self.b, 0)

    def learn(self, z, p, y):
        softmax_regression_step(self.W, self.b, z, p, y, self.lr, self.l2)

    def state_dict(self):
        return {"W": self.W, "b": self.b, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.W.copy_(state["W"])
        self.b.copy_(state["b"])
        self.scaler.load_state_dict(state["scaler"])


@ONLINE_LEARNERS.register("mlp")
class OnlineMLP(OnlineLearner):
    """One hidden ReLU layer of 32 units, per-sample SGD (`task.lr`) on the cross-entropy."""

    HIDDEN = 32

    def __init__(self, dim: int, num_classes: int, lr: float, l2: float, seed: int = 0):
        super().__init__(dim, num_classes, lr, l2, seed)
        g = torch.Generator().manual_seed(seed)
        self.W1 = torch.randn(self.HIDDEN, dim, generator=g, dtype=torch.float64) / dim ** 0.5
        self.b1 = torch.zeros(self.HIDDEN, dtype=torch.float64)
        self.W2 = torch.zeros(num_classes, self.HIDDEN, dtype=torch.float64)
        self.b2 = torch.zeros(num_classes, dtype=torch.float64)

    def predict_proba(self, z):
        self._hidden = torch.relu(self.W1 @ z + self.b1)
        return torch.softmax(self.W2 @ self._hidden + self.b2, 0)

    def learn(self, z, p, y):
        a = torch.relu(self.W1 @ z + self.b1)
        g = p.clone()
        g[y] -= 1.0
        ga = (self.W2.T @ g) * (a > 0)
        softmax_regression_step(self.W2, self.b2, a, p, y, self.lr, self.l2)
        self.W1.mul_(1.0 - self.lr * self.l2).sub_(torch.outer(ga, z), alpha=self.lr)
        self.b1.sub_(ga, alpha=self.lr)

    def state_dict(self):
        return {"W1": self.W1, "b1": self.b1, "W2": self.W2, "b2": self.b2, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        for k in ("W1", "b1", "W2", "b2"):
            getattr(self, k).copy_(state[k])
        self.scaler.load_state_dict(state["scaler"])
