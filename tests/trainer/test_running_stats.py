"""Welford running statistics against numpy, and their state round trip."""

import numpy as np
import torch

from trainer.running_stats import RunningMeanVar, welford_update, welford_variance


def test_welford_matches_numpy():
    xs = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 4))
    n, mean, m2 = 0, np.zeros(4), np.zeros(4)
    for x in xs:
        n = welford_update(n, mean, m2, x)
    np.testing.assert_allclose(mean, xs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(welford_variance(n, m2), xs.var(0, ddof=1), rtol=1e-10)


def test_variance_is_one_until_two_samples():
    stats = RunningMeanVar((3,))
    np.testing.assert_array_equal(stats.var, np.ones(3))
    stats.update(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(stats.var, np.ones(3))
    stats.update(np.array([3.0, 2.0, 1.0]))
    np.testing.assert_allclose(stats.var, [2.0, 0.0, 2.0])


def test_state_loads_in_place_and_continues_identically():
    xs = np.random.default_rng(1).normal(size=(20, 2))
    a, b = RunningMeanVar((2,)), RunningMeanVar((2,))
    for x in xs[:10]:
        a.update(x)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for x in xs[10:]:
        a.update(x)
        b.update(x)
    assert b.count == a.count == 20
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.var, b.var)
    state = a.state_dict()
    assert state["count"].dtype == torch.int64 and np.shares_memory(state["mean"].numpy(), a.mean)
