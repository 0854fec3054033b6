"""Online (sample-by-sample) classifiers for stream-based active learning (`task.learner` of
`task=active`) and the test-then-train step that drives them.

Inputs are standardised by running statistics of every sample seen so far, labelled or not (inputs
are free; labels cost budget). That standardisation depends on no label and no decision, so it is
computed for the whole stream at once (`running_standardise`, a prefix scan) instead of one sample
at a time; what sample t sees is still only x_1..x_t.

Arithmetic is float64 numpy without autograd: a step is a few operations on vectors of a few dozen
numbers, where torch's per-call overhead would cost more than the arithmetic. The learner's weights
change only when a label is bought, so `Predictions` scores the samples ahead in blocks and
throws the block away after each update; each row is computed the same way whatever the block
(an elementwise product summed along the features), so a resumed run predicts bit for bit the same.
State goes to the checkpoint as tensors sharing the arrays' memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainer.registry import Registry

ONLINE_LEARNERS: Registry[type["OnlineLearner"]] = Registry("online learner", key="task.learner")


def running_standardise(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """z_t = (x_t − μ_t)/√(σ²_t + ε), μ_t and σ²_t (unbiased; 1 for t = 1) over x_1..x_t.
    The sums run over x − x_1, which keeps the variance's cancellation small."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x[:1]
    t = np.arange(1, len(x) + 1, dtype=np.float64)[:, None]
    s1, s2 = np.cumsum(shifted, 0), np.cumsum(shifted ** 2, 0)
    mean = s1 / t
    var = np.ones_like(x)
    var[1:] = np.maximum(s2[1:] - s1[1:] ** 2 / t[1:], 0.0) / (t[1:] - 1)
    return (shifted - mean) / np.sqrt(var + eps)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """p_k = e^{l_k − max l} / Σ_j e^{l_j − max l}, row by row."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def affine_rows(z: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """z W^T + b for rows z [n, d], each row summed on its own (no BLAS blocking across rows)."""
    return (z[:, None, :] * W[None]).sum(-1) + b


def softmax_regression_step(W: np.ndarray, b: np.ndarray, x: np.ndarray, p: np.ndarray, y: int,
                            lr: float, l2: float) -> None:
    """W ← W − η((p − e_y) xᵀ + λW);  b ← b − η(p − e_y)   (in place; the cross-entropy gradient)."""
    g = p.copy()
    g[y] -= 1.0
    if l2:
        W *= 1.0 - lr * l2
    W -= lr * np.outer(g, x)
    b -= lr * g


def _load(array: np.ndarray, value) -> None:
    array[...] = np.asarray(value, dtype=np.float64)


class OnlineLearner(Stateful):
    PARAMS: tuple[str, ...] = ()

    def __init__(self, dim: int, num_classes: int, lr: float, l2: float, seed: int = 0):
        self.num_classes, self.lr, self.l2 = num_classes, lr, l2

    def predict_rows(self, z: np.ndarray) -> np.ndarray:
        """Class probabilities [n, K] of standardised inputs [n, d]."""
        raise NotImplementedError

    def predict_proba(self, z: np.ndarray) -> np.ndarray:
        return self.predict_rows(z[None])[0]

    def learn(self, z: np.ndarray, p: np.ndarray, y: int) -> None:
        """One SGD step on (z, y); p: the probabilities predicted for z by the current weights."""
        raise NotImplementedError

    def state_dict(self):
        return {k: torch.from_numpy(getattr(self, k)) for k in self.PARAMS}

    def load_state_dict(self, state):
        for k in self.PARAMS:
            _load(getattr(self, k), state[k])


@ONLINE_LEARNERS.register("logistic")
class SoftmaxRegression(OnlineLearner):
    """Multinomial logistic regression trained by per-sample SGD (`task.lr`, `task.l2`)."""

    PARAMS = ("W", "b")

    def __init__(self, dim: int, num_classes: int, lr: float, l2: float, seed: int = 0):
        super().__init__(dim, num_classes, lr, l2, seed)
        self.W = np.zeros((num_classes, dim))
        self.b = np.zeros(num_classes)

    def predict_rows(self, z):
        return softmax_rows(affine_rows(z, self.W, self.b))

    def learn(self, z, p, y):
        softmax_regression_step(self.W, self.b, z, p, y, self.lr, self.l2)


@ONLINE_LEARNERS.register("mlp")
class OnlineMLP(OnlineLearner):
    """One hidden ReLU layer of 32 units, per-sample SGD (`task.lr`, `task.l2`) on the cross-entropy."""

    HIDDEN = 32
    PARAMS = ("W1", "b1", "W2", "b2")

    def __init__(self, dim: int, num_classes: int, lr: float, l2: float, seed: int = 0):
        super().__init__(dim, num_classes, lr, l2, seed)
        g = torch.Generator().manual_seed(seed)
        self.W1 = (torch.randn(self.HIDDEN, dim, generator=g, dtype=torch.float64) / dim ** 0.5).numpy()
        self.b1 = np.zeros(self.HIDDEN)
        self.W2 = np.zeros((num_classes, self.HIDDEN))
        self.b2 = np.zeros(num_classes)

    def predict_rows(self, z):
        return softmax_rows(affine_rows(np.maximum(affine_rows(z, self.W1, self.b1), 0.0), self.W2, self.b2))

    def learn(self, z, p, y):
        a = np.maximum(affine_rows(z[None], self.W1, self.b1)[0], 0.0)
        g = p.copy()
        g[y] -= 1.0
        ga = (self.W2.T @ g) * (a > 0)
        softmax_regression_step(self.W2, self.b2, a, p, y, self.lr, self.l2)
        if self.l2:
            self.W1 *= 1.0 - self.lr * self.l2
        self.W1 -= self.lr * np.outer(ga, z)
        self.b1 -= self.lr * ga


class Predictions:
    """The learner's probabilities for samples i.., scored `block` at a time and dropped after each
    update (the weights moved)."""

    def __init__(self, learner: OnlineLearner, z: np.ndarray, block: int = 16):
        self.learner, self.z, self.block = learner, z, block
        self.start, self.stop, self.rows = 0, 0, None

    def __getitem__(self, i: int) -> np.ndarray:
        if not self.start <= i < self.stop:
            self.start, self.stop = i, min(i + self.block, len(self.z))
            self.rows = self.learner.predict_rows(self.z[self.start:self.stop])
        return self.rows[i - self.start]

    def invalidate(self) -> None:
        self.stop = 0


def prequential_step(learner: OnlineLearner, predictions: Predictions, strategy, prequential, i: int, y: int) -> bool:
    """Test sample i, then (if the strategy buys its label) train on it; returns whether it was labelled."""
    p = predictions[i]
    prequential.update(bool(p.argmax() == y))
    ask = strategy.query(p)
    if ask:
        learner.learn(predictions.z[i], p, y)
        predictions.invalidate()
    return ask
