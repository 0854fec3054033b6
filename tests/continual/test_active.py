"""Stream-based query strategies: decision rules on hand-made posteriors, threshold updates, the
budget over a long stream, and bitwise-equal decisions after a state round trip mid-stream."""

import pytest
import torch

from continual.active import (STRATEGIES, FixedUncertainty, RandomizedVariableUncertainty, RandomStrategy,
                              SelectiveSampling, Split, VariableUncertainty, check_budget, max_posterior,
                              selective_sampling_probability, variable_threshold, within_budget)
from trainer.errors import ConfigError

CONFIDENT, UNSURE = [0.95, 0.05], [0.55, 0.45]


def _stream(n, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, num_classes, generator=g), dim=1)


def test_registry_names_and_unknown_strategy():
    assert STRATEGIES.names() == ["fixed_uncertainty", "random", "randomized_variable_uncertainty",
                                  "selective_sampling", "split", "variable_uncertainty"]
    with pytest.raises(ConfigError, match=r"task.strategy='entropy' is not a registered query strategy; allowed: fixed_unc"):
        STRATEGIES.get("entropy")


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.5, True, "0.2", None])
def test_budget_outside_zero_one_is_a_config_error(budget):
    with pytest.raises(ConfigError, match=r"task.budget=.* is out of range; allowed: a number in \(0, 1\]"):
        check_budget(budget)
    with pytest.raises(ConfigError, match="task.budget"):
        RandomStrategy(budget)


def test_budget_rule_and_pure_pieces():
    assert check_budget(1) == 1.0
    assert within_budget(0, 5, 0.2) and not within_budget(0, 4, 0.2) and not within_budget(1, 9, 0.2)
    assert max_posterior(torch.tensor([0.2, 0.7, 0.1])) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="at least 2"):
        max_posterior([1.0])
    assert variable_threshold(0.8, True, 0.5) == pytest.approx(0.4)
    assert variable_threshold(0.8, False, 0.5) == pytest.approx(1.2)
    assert selective_sampling_probability(0.5, 0.1, 2) == 1.0
    assert selective_sampling_probability(1.0, 0.1, 2) == pytest.approx(0.1 / 0.6)
    assert selective_sampling_probability(0.6, 0.2, 4) == pytest.approx(0.2 / (0.2 + 0.35))


def test_fixed_uncertainty_queries_below_the_threshold():
    s = FixedUncertainty(budget=1.0, threshold=0.7)
    assert [s.query(p) for p in (UNSURE, CONFIDENT, [0.69, 0.31], [0.7, 0.3])] == [True, False, True, False]
    assert s.threshold == 0.7 and (s.spent, s.seen) == (2, 4) and s.labels_fraction == 0.5


def test_variable_uncertainty_narrows_after_a_query_and_widens_otherwise():
    s = VariableUncertainty(budget=1.0, step=0.1)
    assert s.threshold == 1.0
    assert s.query(CONFIDENT) and s.threshold == pytest.approx(0.9)         # 0.95 < 1
    assert not s.query(CONFIDENT) and s.threshold == pytest.approx(0.99)    # 0.95 ≥ 0.9
    assert s.query(CONFIDENT) and s.threshold == pytest.approx(0.891)       # 0.95 < 0.99
    assert s.query(UNSURE) and s.threshold == pytest.approx(0.8019)


def test_a_strategy_not_consulted_keeps_its_threshold():
    s = VariableUncertainty(budget=0.25, step=0.1)
    assert [s.query(UNSURE) for _ in range(3)] == [False, False, False]  # 1/1..1/3 > B: not consulted
    assert s.threshold == 1.0
    assert s.query(UNSURE) and s.threshold == pytest.approx(0.9)  # 1/4 ≤ B


def test_randomized_variable_uncertainty_scales_theta_by_a_normal_draw():
    s = RandomizedVariableUncertainty(budget=1.0, step=0.05, delta=0.3, seed=7)
    g = torch.Generator().manual_seed(7)
    theta = 1.0
    for p in _stream(200, 2):
        eta = 1.0 + 0.3 * float(torch.randn((), generator=g, dtype=torch.float64))
        expected = float(p.max()) < theta * eta
        assert s.query(p) == expected
        theta = theta * (0.95 if expected else 1.05)
        assert s.threshold == theta
    assert 0 < s.spent < 200


def test_random_and_split_follow_their_draws():
    rnd = RandomStrategy(budget=0.5, seed=3)
    split = Split(budget=1.0, step=0.1, random_fraction=0.3, seed=4)
    g_rnd, g_split = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    u = lambda g: float(torch.rand((), generator=g, dtype=torch.float64))  # noqa: E731
    spent, theta, random_branch = 0, 1.0, 0
    for t, p in enumerate(_stream(400), start=1):
        expected = within_budget(spent, t, 0.5) and u(g_rnd) <= 0.5
        spent += expected
        assert rnd.query(p) == expected
        if u(g_split) < 0.3:
            random_branch += 1
            expected = u(g_split) <= 1.0
        else:
            expected = float(p.max()) < theta
            theta = theta * (0.9 if expected else 1.1)
        assert split.query(p) == expected and split.threshold == theta
    assert 0 < rnd.spent < 400 and 50 < random_branch < 200


def test_selective_sampling_labels_at_the_formula_rate():
    always = SelectiveSampling(budget=1.0, b=0.1)
    assert all(always.query([0.5, 0.5]) for _ in range(50))  # on the boundary: probability 1
    s = SelectiveSampling(budget=1.0, b=0.1, seed=1)
    n = 6000
    rate = sum(s.query([1.0, 0.0]) for _ in range(n)) / n
    assert rate == pytest.approx(0.1 / 0.6, abs=0.02)
    assert SelectiveSampling(budget=0.3).b == 0.3


@pytest.mark.parametrize("name", STRATEGIES.names())
@pytest.mark.parametrize("budget", [0.05, 0.3])
def test_the_budget_is_never_exceeded_over_a_long_stream(name, budget):
    s = STRATEGIES.get(name)(budget=budget, seed=11)
    for p in _stream(4000, seed=5):
        s.query(p)
        assert s.spent <= budget * s.seen + 1e-9
    assert s.seen == 4000 and s.spent > 0.3 * budget * 4000


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_decisions_are_bitwise_equal_after_a_state_round_trip(name):
    stream = _stream(600, seed=9)
    a = STRATEGIES.get(name)(budget=0.3, seed=21)
    for p in stream[:300]:
        a.query(p)
    b = STRATEGIES.get(name)(budget=0.3, seed=99)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    after_a = [a.query(p) for p in stream[300:]]
    after_b = [b.query(p) for p in stream[300:]]
    assert after_a == after_b and 0 < sum(after_a) < 300
    assert (a.seen, a.spent) == (b.seen, b.spent) and a.threshold == b.threshold
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_state_holds_tensors_only():
    state = VariableUncertainty(budget=0.2).state_dict()
    assert set(state) == {"seen", "spent", "threshold", "rng"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["threshold"].dtype == torch.float64
