"""Stream-based active learning under a labelling budget: the query strategies of Žliobaitė et al.
2014 (Active Learning With Drifting Streaming Data, IEEE TNNLS), for any learner that outputs class
probabilities.

Each sample of the stream arrives once. The framework first checks the budget B ∈ (0, 1], the
fraction of the samples seen that may be labelled: with u labels spent over t samples seen, the
strategy is consulted only if one more label keeps u/t ≤ B (so the spent fraction never exceeds B,
and nothing is queried once it reaches B); the paper's b̂ < B check can overshoot by one label.
A strategy that is not consulted also does not move its threshold, as in the paper. The paper
also offers a windowed estimate of the spent fraction; Plait counts over the whole stream.

Strategies are registered by name in `STRATEGIES` (config key `task.strategy`) and are torch
`Stateful`s: threshold, labels spent, samples seen and RNG go through the checkpoint, so a stream
resumed mid-way makes bitwise the same decisions.
"""

from __future__ import annotations

import abc

from typing import Optional

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainer.errors import ConfigError
from trainer.registry import Registry

STRATEGIES: Registry[type["QueryStrategy"]] = Registry("query strategy", key="task.strategy")


def check_budget(budget: float, key: str = "task.budget") -> float:
    """B ∈ (0, 1]: the fraction of the stream that may be labelled."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ConfigError(f"{key}={budget!r} is out of range; allowed: a number in (0, 1] "
                          f"(the fraction of the stream's samples that may be labelled)")
    return float(budget)


def within_budget(spent: int, seen: int, budget: float) -> bool:
    """(u + 1) / t ≤ B   (u labels spent, t samples seen including this one)."""
    return spent + 1 <= budget * seen + 1e-9


def max_posterior(posterior) -> float:
    """P̂(ŷ | x) = max_k P̂(k | x)."""
    p = as_posterior(posterior)
    if p.size < 2:
        raise ValueError(f"a posterior holds one probability per class (at least 2), got {p.size}")
    return float(p.max())


def as_posterior(posterior) -> np.ndarray:
    """Class probabilities as a flat float64 array (from a list, an array or a tensor). numpy, not
    torch: a strategy is consulted once per sample, where torch's per-call overhead dominates."""
    if isinstance(posterior, torch.Tensor):
        posterior = posterior.detach().cpu().numpy()
    return np.asarray(posterior, dtype=np.float64).reshape(-1)


def random_rule(xi: float, budget: float) -> bool:
    """label iff ξ ≤ B, ξ ~ U[0, 1]."""
    return xi <= budget


def uncertainty_rule(p_max: float, threshold: float) -> bool:
    """label iff P̂(ŷ | x) < θ."""
    return p_max < threshold


def variable_threshold(threshold: float, queried: bool, step: float) -> float:
    """θ ← θ(1 − s) after a query, θ(1 + s) otherwise."""
    return threshold * (1.0 - step) if queried else threshold * (1.0 + step)


def randomized_threshold(threshold: float, eta: float) -> float:
    """θ_rand = θ·η,  η ~ N(1, δ)."""
    return threshold * eta


def selective_sampling_probability(p_max: float, b: float, num_classes: int) -> float:
    """P(label) = b / (b + |P̂(ŷ | x) − 1/K|)."""
    return b / (b + abs(p_max - 1.0 / num_classes))


class QueryStrategy(Stateful, abc.ABC):
    """Decides, sample by sample, whether to ask for the label; tracks the budget it spends."""

    def __init__(self, budget: float, seed: int = 0):
        self.budget = check_budget(budget)
        self.seen = 0
        self.spent = 0
        self.threshold = 0.0  # strategies without one leave it at 0
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, posterior) -> bool:
        """True: ask for this sample's label. `posterior`: the learner's class probabilities [K]."""
        self.seen += 1
        if not within_budget(self.spent, self.seen, self.budget):
            return False
        ask = self.decide(as_posterior(posterior))
        self.spent += int(ask)
        return ask

    @abc.abstractmethod
    def decide(self, posterior: np.ndarray) -> bool:
        """The strategy's own rule, consulted only within the budget."""

    @property
    def labels_fraction(self) -> float:
        """u / t: the fraction of the samples seen that were labelled."""
        return self.spent / self.seen if self.seen else 0.0

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def _normal(self, mean: float, std: float) -> float:
        return mean + std * float(torch.randn((), generator=self.generator, dtype=torch.float64))

    def state_dict(self) -> dict:
        return {"seen": torch.tensor(self.seen, dtype=torch.int64),
                "spent": torch.tensor(self.spent, dtype=torch.int64),
                "threshold": torch.tensor(self.threshold, dtype=torch.float64),
                "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.spent = int(state["spent"])
        self.threshold = float(state["threshold"])
        self.generator.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8).clone())


@STRATEGIES.register("random")
class RandomStrategy(QueryStrategy):
    """Label each sample with probability B, whatever the learner thinks."""

    def decide(self, posterior: np.ndarray) -> bool:
        return random_rule(self._uniform(), self.budget)


@STRATEGIES.register("fixed_uncertainty")
class FixedUncertainty(QueryStrategy):
    """Label when the most likely class's posterior is below a fixed θ (Plait's default 0.9)."""

    def __init__(self, budget: float, threshold: float = 0.9, seed: int = 0):
        super().__init__(budget, seed)
        self.threshold = float(threshold)

    def decide(self, posterior: np.ndarray) -> bool:
        return uncertainty_rule(max_posterior(posterior), self.threshold)


@STRATEGIES.register("variable_uncertainty")
class VariableUncertainty(QueryStrategy):
    """Fixed uncertainty with a moving θ (from 1): narrowed by s after each query, widened by s
    otherwise, so the labels spread over time whatever the learner's confidence."""

    def __init__(self, budget: float, threshold: float = 1.0, step: float = 0.01, seed: int = 0):
        super().__init__(budget, seed)
        if not 0.0 < step <= 1.0:
            raise ConfigError(f"step={step} is out of range; allowed: a number in (0, 1]")
        self.threshold = float(threshold)
        self.step = step

    def decide(self, posterior: np.ndarray) -> bool:
        ask = uncertainty_rule(max_posterior(posterior), self.threshold)
        self.threshold = variable_threshold(self.threshold, ask, self.step)
        return ask


@STRATEGIES.register("randomized_variable_uncertainty")
class RandomizedVariableUncertainty(VariableUncertainty):
    """Variable uncertainty compared against θ·η, η ~ N(1, δ): now and then it labels a confident
    sample, which lets it notice a drift far from the decision boundary."""

    def __init__(self, budget: float, threshold: float = 1.0, step: float = 0.01, delta: float = 1.0, seed: int = 0):
        super().__init__(budget, threshold, step, seed)
        if delta <= 0:
            raise ConfigError(f"delta={delta} is out of range; allowed: a number > 0 (the std of η)")
        self.delta = delta

    def decide(self, posterior: np.ndarray) -> bool:
        theta = randomized_threshold(self.threshold, self._normal(1.0, self.delta))
        ask = uncertainty_rule(max_posterior(posterior), theta)
        self.threshold = variable_threshold(self.threshold, ask, self.step)
        return ask


@STRATEGIES.register("selective_sampling")
class SelectiveSampling(QueryStrategy):
    """Label with probability b/(b + |P̂ − 1/K|) (Cesa-Bianchi et al. 2006, as adapted by Žliobaitė
    et al.): likely near the boundary, never impossible. b defaults to B (Plait's choice)."""

    def __init__(self, budget: float, b: Optional[float] = None, seed: int = 0):
        super().__init__(budget, seed)
        self.b = self.budget if b is None else float(b)
        if self.b <= 0:
            raise ConfigError(f"b={b} is out of range; allowed: a number > 0")

    def decide(self, posterior: np.ndarray) -> bool:
        p = selective_sampling_probability(max_posterior(posterior), self.b, posterior.size)
        return self._uniform() < p


@STRATEGIES.register("split")
class Split(VariableUncertainty):
    """With probability ν the random strategy decides, otherwise variable uncertainty (whose θ
    moves only on its own share of the stream): part of the labels stay unbiased by the model."""

    def __init__(self, budget: float, threshold: float = 1.0, step: float = 0.01, random_fraction: float = 0.2,
                 seed: int = 0):
        super().__init__(budget, threshold, step, seed)
        if not 0.0 < random_fraction < 1.0:
            raise ConfigError(f"random_fraction={random_fraction} is out of range; allowed: a number in (0, 1)")
        self.random_fraction = random_fraction

    def decide(self, posterior: np.ndarray) -> bool:
        if self._uniform() < self.random_fraction:
            return random_rule(self._uniform(), self.budget)
        return super().decide(posterior)
