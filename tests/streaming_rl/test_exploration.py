"""The ε schedule and ε-greedy choice."""

import random

import pytest

from streaming_rl.exploration import epsilon_greedy, linear_epsilon


def test_linear_epsilon():
    total, fraction = 100_000, 0.05  # decays over 5,000 steps
    assert linear_epsilon(0, total, fraction) == 1.0
    assert linear_epsilon(2_500, total, fraction) == pytest.approx(0.01 + 0.99 * 0.5)
    assert linear_epsilon(5_000, total, fraction) == pytest.approx(0.01)
    assert linear_epsilon(90_000, total, fraction) == pytest.approx(0.01)
    assert linear_epsilon(10, 0, fraction) == 0.01


def test_epsilon_greedy_and_exploratory_flag():
    random.seed(0)
    assert epsilon_greedy([0.0, 2.0, 1.0], 0.0) == (1, False)
    picks = [epsilon_greedy([0.0, 2.0, 1.0], 1.0) for _ in range(3000)]
    counts = [sum(a == i for a, _ in picks) for i in range(3)]
    assert all(900 < c < 1100 for c in counts)
    assert all(flag == (a != 1) for a, flag in picks)
    # a tie with the greedy value is not exploratory
    assert all(not flag for _, flag in (epsilon_greedy([1.0, 1.0], 1.0) for _ in range(50)))
