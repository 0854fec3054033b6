"""Streams: seeded and deterministic, the scenario each promises, and Hawkes thinning against the
closed-form mean count of a stationary Hawkes process."""

import pytest
import torch

from continual.hawkes import HawkesRegime, simulate_hawkes
from continual.streams import GAUSSIAN_TOY_STD, KINDS, STREAMS, build_stream, stream_kind, tensors
from trainer.errors import ConfigError


def test_every_stream_is_registered_with_its_kind():
    stream_kind("hawkes_regimes")
    assert set(STREAMS.names()) == {"split_digits", "split_digits_task", "permuted_digits", "gaussian_toy", "phishing", "image_segments",
                                    "shuttle", "sea_drift", "agrawal_drift", "hawkes_regimes"}
    assert KINDS["split_digits"] == "experiences" and KINDS["phishing"] == "samples" and KINDS["hawkes_regimes"] == "events"
    with pytest.raises(ConfigError, match="task.stream='mnist'.*split_digits"):
        build_stream("mnist", 0)


def test_split_digits_is_class_incremental_and_seeded():
    a, b, c = build_stream("split_digits", 0), build_stream("split_digits", 0), build_stream("split_digits", 1)
    assert len(a) == 5 and a.num_classes == 10 and a.dim == 64
    for t, e in enumerate(a.experiences):
        x, y = tensors(e.train)
        xt, yt = tensors(e.test)
        assert set(y.tolist()) == set(yt.tolist()) == {2 * t, 2 * t + 1}
        assert 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, tensors(b.experiences[t].train)[0])
    assert not torch.equal(tensors(a.experiences[0].train)[0], tensors(c.experiences[0].train)[0])
    total = sum(len(e.train) + len(e.test) for e in a.experiences)
    assert total == 1797 and a.unlabelled.shape == (sum(len(e.train) for e in a.experiences), 64)


def test_permuted_digits_permutes_the_same_images():
    s = build_stream("permuted_digits", 0)
    x0, y0 = tensors(s.experiences[0].test)
    x1, y1 = tensors(s.experiences[1].test)
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)
    assert torch.equal(x0.sort(1).values, x1.sort(1).values)  # the same pixels, moved


def test_gaussian_toy_is_the_papers_setting():
    s = build_stream("gaussian_toy", 3)
    assert len(s) == 4 and s.num_classes == 8 and s.dim == 2
    x, y = tensors(s.experiences[0].train)
    assert len(y) == 200
    for c in (0, 1):
        spread = x[y == c].std(0)
        assert torch.allclose(spread, torch.full((2,), GAUSSIAN_TOY_STD), rtol=0.25)
    assert s.unlabelled.min() >= 0 and s.unlabelled.max() <= 1


def test_river_streams_in_order():
    s = build_stream("phishing", 0)
    x, y = tensors(s.data)
    assert x.shape == (1250, 9) and s.num_classes == 2 and torch.bincount(y).tolist() == [702, 548]
    drift = build_stream("sea_drift", 0)
    assert len(drift) == 5000 and drift.dim == 3
    assert torch.equal(tensors(drift.data)[0], tensors(build_stream("sea_drift", 0).data)[0])


def test_ogata_thinning_matches_the_stationary_mean_count():
    """E N(T) ≈ T·(I − α)⁻¹μ for T ≫ 1/β; a Poisson process (α = 0) gives μT."""
    g = torch.Generator().manual_seed(0)
    regime = HawkesRegime(mu=(0.5, 0.2), alpha=((0.3, 0.2), (0.1, 0.4)), beta=3.0)
    T, n = 200.0, 40
    counts = torch.zeros(2)
    for _ in range(n):
        times, types = simulate_hawkes(regime, T, g)
        assert times == sorted(times) and all(0 < t <= T for t in times)
        counts += torch.bincount(torch.tensor(types), minlength=2)
    rate = torch.linalg.solve(torch.eye(2) - torch.tensor(regime.alpha), torch.tensor(regime.mu))
    torch.testing.assert_close(counts / (n * T), rate, rtol=0.06, atol=0)
    poisson = HawkesRegime(mu=(1.0,), alpha=((0.0,),), beta=1.0)
    m = sum(len(simulate_hawkes(poisson, T, g)[0]) for _ in range(n)) / n
    assert abs(m - T) < 3 * (T / n) ** 0.5


def test_hawkes_stream_cycles_regimes_and_is_seeded():
    s = build_stream("hawkes_regimes", 0)
    assert [p.regime for p in s.periods] == list("ABCABC") and s.num_types == 3
    again = build_stream("hawkes_regimes", 0)
    assert s.periods[2].train[:]["times"] == again.periods[2].train[:]["times"]
    assert s.periods[0].train[:]["times"] != s.periods[3].train[:]["times"]  # the same regime, new draws
