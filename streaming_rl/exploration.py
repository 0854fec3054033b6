"""ε-greedy exploration for Stream Q(λ) and SARSA(λ): ε decays linearly from ε₀ to ε₁ over
`fraction` × total steps, then stays at ε₁ (1.0 → 0.01; fraction 0.05 classic control and Atari,
0.2 MinAtar). Draws come from Python's `random`, whose state the checkpoint's RNG component holds."""

from __future__ import annotations

import random


def linear_epsilon(step: int, total_steps: int, fraction: float, start: float = 1.0, end: float = 0.01) -> float:
    """ε(t) = ε₁ + (ε₀ − ε₁)·max(0, 1 − t / (fraction·T))."""
    horizon = fraction * total_steps
    if horizon <= 0:
        return end
    return end + (start - end) * max(0.0, 1.0 - step / horizon)


def epsilon_greedy(q_values: list[float], epsilon: float) -> tuple[int, bool]:
    """(action, exploratory): a uniformly random action with probability ε, else the greedy one.
    An action is exploratory when its value is below the greedy value (ties are greedy)."""
    best = max(q_values)
    if random.random() < epsilon:
        action = random.randrange(len(q_values))
    else:
        action = q_values.index(best)
    return action, q_values[action] < best
