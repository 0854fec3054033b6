"""Continual-learning metrics over the accuracy matrix R (Lopez-Paz & Ranzato 2017, GEM; Chaudhry
et al. 2018, RWalk) and prequential (test-then-train) accuracy (Gama et al. 2013).

R[i, j] is the accuracy on experience j after training through experience i. Experiences are
numbered 0..T−1 here (the papers count 1..T), so "final" is row T−1. A metric can be asked
"after" an earlier experience k: it then reads the square top-left block R[0..k, 0..k], which is
how the curves over the stream are drawn. Entries not measured are NaN; a metric that needs one
says which.

Forgetting has two definitions in use, and they differ:
- `forgetting` (Chaudhry et al. 2018): the best accuracy on j at any earlier step minus the final
  one, f_j = max_{l<k} R[l, j] − R[k, j]. This is Plait's forgetting.
- `forgetting_avalanche` (Avalanche's `ExperienceForgetting`): the accuracy right after training
  on j minus the final one, R[j, j] − R[k, j]. It is smaller when accuracy on j kept rising after
  j was trained, and it can be negative.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.distributed.checkpoint.stateful import Stateful


def as_matrix(R) -> torch.Tensor:
    """R as a float64 [T, T] tensor (a list of rows, a numpy array or a tensor)."""
    R = torch.as_tensor(R, dtype=torch.float64)
    if R.dim() != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"an accuracy matrix is square [T, T] with T ≥ 1, got shape {tuple(R.shape)}")
    return R


def _final(R, after: Optional[int]) -> tuple[torch.Tensor, int]:
    """(R, k): the matrix and the step the metric is read after (default: the last, T−1)."""
    R = as_matrix(R)
    T = R.shape[0]
    k = T - 1 if after is None else after
    if not 0 <= k < T:
        raise ValueError(f"after={after} is not an experience of a {T}×{T} accuracy matrix (0..{T - 1})")
    return R, k


def _need(values: torch.Tensor, what: str) -> torch.Tensor:
    if torch.isnan(values).any():
        raise ValueError(f"{what} has entries not measured (NaN): {values.tolist()}")
    return values


def average_accuracy(R, after: Optional[int] = None) -> float:
    """ACC = (1/(k+1)) Σ_{j≤k} R[k, j]   (k = T−1: the final row's mean)."""
    R, k = _final(R, after)
    return float(_need(R[k, : k + 1], f"row {k} of R").mean())


def backward_transfer(R, after: Optional[int] = None) -> float:
    """BWT = (1/k) Σ_{j<k} (R[k, j] − R[j, j])   (negative: forgetting; 0 for a single experience)."""
    R, k = _final(R, after)
    if k == 0:
        return 0.0
    j = torch.arange(k)
    return float(_need(R[k, :k] - R[j, j], f"row {k} or the diagonal of R").mean())


def forward_transfer(R, random_init, after: Optional[int] = None) -> float:
    """FWT = (1/k) Σ_{1≤j≤k} (R[j−1, j] − b[j])   (b[j]: accuracy on j of the model at random init)."""
    R, k = _final(R, after)
    b = torch.as_tensor(random_init, dtype=torch.float64)
    if b.shape != (R.shape[0],):
        raise ValueError(f"random_init holds one accuracy per experience ({R.shape[0]}), got shape {tuple(b.shape)}")
    if k == 0:
        return 0.0
    j = torch.arange(1, k + 1)
    return float(_need(R[j - 1, j] - b[j], "the superdiagonal of R or random_init").mean())


def forgetting_per_experience(R, after: Optional[int] = None) -> torch.Tensor:
    """f_j = max_{l<k} R[l, j] − R[k, j]  for j < k   (Chaudhry et al. 2018; unmeasured R[l, j] skipped)."""
    R, k = _final(R, after)
    if k == 0:
        return torch.zeros(0, dtype=torch.float64)
    earlier = R[:k, :k]
    measured = ~torch.isnan(earlier)
    if not measured.any(0).all():
        raise ValueError(f"forgetting needs an earlier accuracy for each experience before {k}; none "
                         f"measured for {(~measured.any(0)).nonzero().flatten().tolist()}")
    best = torch.where(measured, earlier, torch.tensor(-math.inf, dtype=torch.float64)).amax(0)
    return best - _need(R[k, :k], f"row {k} of R")


def forgetting(R, after: Optional[int] = None) -> float:
    """F = (1/k) Σ_{j<k} (max_{l<k} R[l, j] − R[k, j])   (Chaudhry et al. 2018; 0 for one experience)."""
    f = forgetting_per_experience(R, after)
    return float(f.mean()) if f.numel() else 0.0


def forgetting_avalanche(R, after: Optional[int] = None) -> float:
    """F_avalanche = (1/k) Σ_{j<k} (R[j, j] − R[k, j])   (Avalanche's definition; = −BWT)."""
    return -backward_transfer(R, after)


def prequential_update(correct_sum: float, count: float, correct: float, fading: float = 1.0) -> tuple[float, float]:
    """S ← c + α·S;  N ← 1 + α·N   (test-then-train tally; α = 1: plain mean, α < 1: fading factor)."""
    return correct + fading * correct_sum, 1.0 + fading * count


class AccuracyMatrix(Stateful):
    """The history of a continual run: R[i, j] (NaN until measured) and the random-init accuracies
    b[j] that forward transfer compares against."""

    def __init__(self, num_experiences: int):
        if num_experiences < 1:
            raise ValueError(f"num_experiences must be ≥ 1, got {num_experiences}")
        self.R = torch.full((num_experiences, num_experiences), math.nan, dtype=torch.float64)
        self.random_init = torch.full((num_experiences,), math.nan, dtype=torch.float64)

    @property
    def num_experiences(self) -> int:
        return self.R.shape[0]

    def _check(self, name: str, j: int) -> None:
        if not 0 <= j < self.num_experiences:
            raise IndexError(f"{name}={j} is not an experience (0..{self.num_experiences - 1})")

    def record(self, trained_through: int, experience: int, accuracy: float) -> None:
        """R[trained_through, experience] = accuracy."""
        self._check("trained_through", trained_through)
        self._check("experience", experience)
        self.R[trained_through, experience] = float(accuracy)

    def record_row(self, trained_through: int, accuracies) -> None:
        """R[trained_through, :] = accuracies (one per experience, evaluated after that step)."""
        self._check("trained_through", trained_through)
        row = torch.as_tensor(accuracies, dtype=torch.float64)
        if row.shape != (self.num_experiences,):
            raise ValueError(f"a row holds {self.num_experiences} accuracies, got shape {tuple(row.shape)}")
        self.R[trained_through] = row

    def record_random_init(self, experience: int, accuracy: float) -> None:
        """b[experience] = accuracy of the untrained model on that experience."""
        self._check("experience", experience)
        self.random_init[experience] = float(accuracy)

    def summary(self, after: Optional[int] = None) -> dict[str, float]:
        """ACC, BWT, forgetting (both definitions) and, when every b[j] is known, FWT."""
        out = {"acc": average_accuracy(self.R, after), "bwt": backward_transfer(self.R, after),
               "forgetting": forgetting(self.R, after), "forgetting_avalanche": forgetting_avalanche(self.R, after)}
        if not torch.isnan(self.random_init).any():
            out["fwt"] = forward_transfer(self.R, self.random_init, after)
        return out

    def state_dict(self) -> dict:
        return {"R": self.R, "random_init": self.random_init}

    def load_state_dict(self, state: dict) -> None:
        R = torch.as_tensor(state["R"], dtype=torch.float64)
        if R.shape != self.R.shape:
            raise ValueError(f"checkpointed accuracy matrix is {tuple(R.shape)}, this run has {tuple(self.R.shape)}")
        self.R.copy_(R)
        self.random_init.copy_(torch.as_tensor(state["random_init"], dtype=torch.float64))


class PrequentialAccuracy(Stateful):
    """Test-then-train accuracy over a stream: predict each sample, score it, then learn from it.
    `fading` α < 1 weighs recent samples more (Gama et al. 2013); α = 1 is the plain running mean."""

    def __init__(self, fading: float = 1.0):
        if not 0.0 < fading <= 1.0:
            raise ValueError(f"fading must be in (0, 1], got {fading}")
        self.fading = fading
        self.correct_sum = 0.0
        self.count = 0.0
        self.seen = 0

    def update(self, correct) -> None:
        """Score one prediction (True/1: right) or a batch of them, in stream order."""
        if isinstance(correct, (bool, int, float)):  # one sample: the per-sample hot path
            self.correct_sum, self.count = prequential_update(self.correct_sum, self.count, float(correct), self.fading)
            self.seen += 1
            return
        for c in torch.as_tensor(correct).reshape(-1).tolist():
            self.correct_sum, self.count = prequential_update(self.correct_sum, self.count, float(c), self.fading)
            self.seen += 1

    @property
    def accuracy(self) -> float:
        """S / N; NaN before the first sample."""
        return self.correct_sum / self.count if self.count else math.nan

    def state_dict(self) -> dict:
        return {"correct_sum": torch.tensor(self.correct_sum, dtype=torch.float64),
                "count": torch.tensor(self.count, dtype=torch.float64),
                "seen": torch.tensor(self.seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.correct_sum = float(state["correct_sum"])
        self.count = float(state["count"])
        self.seen = int(state["seen"])
