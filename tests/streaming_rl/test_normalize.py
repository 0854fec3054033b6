"""Observation normalization and reward scaling against numpy and the closed forms."""

import numpy as np
import pytest
import torch

from streaming_rl.normalize import ObservationNormalizer, RewardScaler, normalize, return_trace, scale_reward


def test_observation_normalizer_updates_first_then_normalizes():
    norm = ObservationNormalizer((2,))
    xs = np.array([[1.0, 10.0], [3.0, 14.0], [8.0, -2.0]])
    outs = [norm(x) for x in xs]
    np.testing.assert_allclose(outs[0], [0.0, 0.0])  # μ = x, σ² = 1
    mean, var = xs.mean(0), xs.var(0, ddof=1)
    np.testing.assert_allclose(outs[-1], (xs[-1] - mean) / np.sqrt(var + 1e-8))
    np.testing.assert_allclose(normalize(xs[-1], mean, var), outs[-1])
    off = ObservationNormalizer((2,), enabled=False)
    np.testing.assert_array_equal(off(xs[0]), xs[0])


def test_reward_scaling_closed_form():
    gamma = 0.9
    rewards = [1.0, 0.5, -2.0, 3.0, 1.0, 1.0]
    dones = [False, False, True, False, False, True]
    scaler = RewardScaler(gamma)
    u, us, expected = 0.0, [], []
    for r, d in zip(rewards, dones):
        u = gamma * u * (1 - d) + r
        us.append(u)
        var = np.var(us, ddof=1) if len(us) >= 2 else 1.0
        expected.append(r / np.sqrt(var + 1e-8))
    got = [scaler(r, d) for r, d in zip(rewards, dones)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert return_trace(2.0, 1.0, 0.5, False) == 2.0 and return_trace(2.0, 1.0, 0.5, True) == 1.0
    assert scale_reward(3.0, 4.0) == pytest.approx(1.5)
    assert RewardScaler(gamma, enabled=False)(3.0, False) == 3.0


def test_state_roundtrip_continues_identically():
    a, b = RewardScaler(0.99), RewardScaler(0.99)
    for r in [1.0, 2.0, 0.0]:
        a(r, False)
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.state_dict().items()}
    b.load_state_dict(state)
    assert [a(r, d) for r, d in [(1.0, False), (5.0, True)]] == [b(r, d) for r, d in [(1.0, False), (5.0, True)]]
