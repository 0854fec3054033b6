"""federated/privacy.py: the clipping bound, the noise's statistics, seeded reproducibility and resume."""

from __future__ import annotations

import math

import pytest
import torch

from federated import privacy
from federated.lora import LoraPair


def update(scale_by: float = 1.0, seed: int = 0, ranks=(2, 8)):
    g = torch.Generator().manual_seed(seed)
    return {f"m{r}": LoraPair(scale_by * torch.randn(r, 16, generator=g, dtype=torch.float64),
                              scale_by * torch.randn(12, r, generator=g, dtype=torch.float64), 0.5)
            for r in ranks}


def flat(u):
    return torch.cat([torch.cat([u[n].A.flatten(), u[n].B.flatten()]) for n in sorted(u)])


def test_global_norm_is_over_every_factor():
    u = update()
    assert privacy.global_norm(u) == pytest.approx(float(torch.linalg.norm(flat(u))))


def test_clip_bounds_the_norm_and_keeps_the_direction():
    u = update(scale_by=10.0)
    clipped, norm = privacy.clip(u, 1.5)
    assert norm > 1.5
    assert privacy.global_norm(clipped) == pytest.approx(1.5, rel=1e-12)
    torch.testing.assert_close(flat(clipped) * (norm / 1.5), flat(u))
    assert clipped["m2"].scale == 0.5


def test_clip_leaves_a_small_update_alone():
    u = update(scale_by=1e-3)
    clipped, norm = privacy.clip(u, 1.0)
    assert norm < 1.0
    torch.testing.assert_close(flat(clipped), flat(u))
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        privacy.clip(u, 0.0)


def test_noise_has_mean_zero_and_std_sigma_times_C():
    n = 1_000_000
    zero = {"m": LoraPair(torch.zeros(1, n // 2, dtype=torch.float64), torch.zeros(n // 2, 1, dtype=torch.float64))}
    C, sigma = 2.0, 0.7
    noisy, report = privacy.privatize(zero, C, sigma, torch.Generator().manual_seed(3))
    z = flat(noisy)
    std = sigma * C
    assert report.noise_std == pytest.approx(std) and not report.clipped
    assert abs(float(z.mean())) < 5 * std / math.sqrt(n)
    assert float(z.std()) == pytest.approx(std, rel=5e-3)  # sample std's relative error ≈ 1/√(2n) = 0.07%
    within = float((z.abs() < std).double().mean())
    assert within == pytest.approx(0.6827, abs=3e-3)  # Gaussian, not just the right variance
    assert abs(float(torch.corrcoef(torch.stack([z[: n // 2], z[n // 2:]]))[0, 1])) < 5e-3  # A and B independent


def test_privatize_clips_then_adds_noise():
    u = update(scale_by=10.0)
    noisy, report = privacy.privatize(u, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert report.clipped and report.norm == pytest.approx(privacy.global_norm(u))
    assert privacy.global_norm(noisy) == pytest.approx(1.0, rel=1e-12)
    assert set(report.metrics()) == {"dp_update_norm", "dp_clipped", "dp_clip_norm", "dp_noise_multiplier"}
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        privacy.privatize(u, 1.0, -1.0, torch.Generator())


def test_same_seed_same_noise_other_seed_other_noise():
    u = update()
    a, _ = privacy.privatize(u, 1.0, 1.0, torch.Generator().manual_seed(7))
    b, _ = privacy.privatize(u, 1.0, 1.0, torch.Generator().manual_seed(7))
    c, _ = privacy.privatize(u, 1.0, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


def test_noise_source_resumes_the_same_noise():
    u = update()
    source = privacy.NoiseSource(seed=11)
    privacy.privatize(u, 1.0, 1.0, source.generator)  # round 1
    saved = source.state_dict()
    round2, _ = privacy.privatize(u, 1.0, 1.0, source.generator)
    resumed = privacy.NoiseSource(seed=0)
    resumed.load_state_dict(saved)
    again, _ = privacy.privatize(u, 1.0, 1.0, resumed.generator)
    assert torch.equal(flat(round2), flat(again))


def test_noise_keeps_a_low_precision_update_in_its_dtype():
    u = {"m": LoraPair(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(3, 2, dtype=torch.bfloat16))}
    noisy, _ = privacy.privatize(u, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert noisy["m"].A.dtype == torch.bfloat16 and bool((noisy["m"].A != 0).any())
