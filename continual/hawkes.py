"""Multivariate Hawkes event streams with regime shifts, simulated by Ogata's thinning (Ogata 1981),
for the streaming TPP learners (PromptTPP's protocol: train on period t, test on period t+1).

λ_k(t) = μ_k + Σ_{t_i < t} α[k, k_i] β e^{−β (t − t_i)}: the kernel integrates to α[k, k_i], so the
branching matrix is α and the process is stationary when its spectral radius is below 1.

A stream is a sequence of periods; each period draws its sequences from one regime (its μ, α, β),
and regimes recur (A, B, C, A, B, C), so a learner that forgets a regime pays when it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from continual.streams import register_stream


@dataclass(frozen=True)
class HawkesRegime:
    mu: tuple[float, ...]  # baseline rate per type
    alpha: tuple[tuple[float, ...], ...]  # alpha[k][j]: mass of type-k events an event of type j excites
    beta: float  # decay rate of the exponential kernel


def hawkes_intensity(mu: torch.Tensor, excitation: torch.Tensor) -> torch.Tensor:
    """λ_k(t) = μ_k + e_k(t),  e_k(t) = Σ_{t_i<t} α[k, k_i] β e^{−β(t − t_i)}."""
    return mu + excitation


def simulate_hawkes(regime: HawkesRegime, horizon: float, g: torch.Generator) -> tuple[list[float], list[int]]:
    """One sequence on [0, horizon] by Ogata's thinning: propose at the total intensity just after the
    current time (an upper bound, since the kernels only decay until the next event), accept with
    probability λ(t)/λ̄, draw the type from λ_k(t)/λ(t)."""
    mu = torch.tensor(regime.mu, dtype=torch.float64)
    alpha = torch.tensor(regime.alpha, dtype=torch.float64)
    e = torch.zeros_like(mu)
    t, times, types = 0.0, [], []
    while True:
        bound = float(hawkes_intensity(mu, e).sum())
        w = float(-torch.log1p(-torch.rand((), generator=g, dtype=torch.float64))) / bound
        t += w
        if t > horizon:
            return times, types
        e = e * torch.exp(torch.tensor(-regime.beta * w, dtype=torch.float64))
        lam = hawkes_intensity(mu, e)
        if float(torch.rand((), generator=g, dtype=torch.float64)) * bound <= float(lam.sum()):
            k = int(torch.multinomial(lam / lam.sum(), 1, generator=g))
            times.append(t)
            types.append(k)
            e = e + alpha[:, k] * regime.beta


# Three regimes over 3 event types, each with its own baseline, excitation pattern and time scale.
REGIMES = {
    "A": HawkesRegime(mu=(0.6, 0.1, 0.1), alpha=((0.1, 0.0, 0.0), (0.7, 0.1, 0.0), (0.0, 0.0, 0.1)), beta=2.0),
    "B": HawkesRegime(mu=(0.1, 0.1, 0.5), alpha=((0.1, 0.0, 0.0), (0.0, 0.2, 0.0), (0.0, 0.0, 0.75)), beta=5.0),
    "C": HawkesRegime(mu=(0.3, 0.3, 0.1), alpha=((0.1, 0.5, 0.0), (0.5, 0.1, 0.0), (0.0, 0.3, 0.1)), beta=0.8),
}


@dataclass
class Period:
    index: int
    regime: str
    train: object  # datasets.Dataset with columns times (list of float), types (list of int)
    test: object


@dataclass
class EventStream:
    name: str
    num_types: int
    horizon: float
    periods: list[Period]
    kind: str = field(default="events", init=False)

    def __len__(self) -> int:
        return len(self.periods)


def sequences(regime: HawkesRegime, n: int, horizon: float, g: torch.Generator):
    import datasets

    seqs = [simulate_hawkes(regime, horizon, g) for _ in range(n)]
    return datasets.Dataset.from_dict({"times": [s[0] for s in seqs], "types": [s[1] for s in seqs]})


def hawkes_stream(name: str, schedule: str, seed: int, train_sequences: int = 48, test_sequences: int = 24,
                  horizon: float = 20.0) -> EventStream:
    """Periods drawn from the regimes named by `schedule` (e.g. "ABCABC"), seeded."""
    g = torch.Generator().manual_seed(seed)
    periods = [Period(i, r, sequences(REGIMES[r], train_sequences, horizon, g),
                      sequences(REGIMES[r], test_sequences, horizon, g)) for i, r in enumerate(schedule)]
    return EventStream(name, 3, horizon, periods)


@register_stream("hawkes_regimes", "events")
def hawkes_regimes(seed: int) -> EventStream:
    """6 periods cycling through 3 Hawkes regimes (A, B, C, A, B, C), 48 training and 24 test
    sequences of 20 time units per period (about 15-40 events each)."""
    return hawkes_stream("hawkes_regimes", "ABCABC", seed)
