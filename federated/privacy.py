"""Differential privacy on a client's update in adapter space (the Gaussian mechanism of DP-FedAvg,
McMahan et al. 2018): clip the update's global L2 norm to C, then add N(0, (σ·C)²) to every
coordinate. Flower's DP wrappers clip `reply − global` array by array and need equal shapes; here
the update is the client's own factors, so clients of different ranks are privatised alike.

The noise comes from a seeded `torch.Generator` held in a `NoiseSource` (a `Stateful`): a resumed
client draws the same noise it would have drawn uninterrupted. Privacy accounting (ε for a given
δ and rounds, with dp-accounting) is the runner's: federated/run.py `dp_epsilon`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful

from federated.lora import Adapters, LoraPair


@dataclass(frozen=True)
class DPReport:
    """What one privatised update reports: its norm before clipping, whether it was clipped, C, σ, σ·C."""

    norm: float
    clipped: bool
    clip_norm: float
    noise_multiplier: float

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def metrics(self) -> dict[str, float]:
        return {"dp_update_norm": self.norm, "dp_clipped": float(self.clipped), "dp_clip_norm": self.clip_norm,
                "dp_noise_multiplier": self.noise_multiplier}


class NoiseSource(Stateful):
    """A seeded CPU `torch.Generator`; its state goes through the checkpoint."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))

    def state_dict(self) -> dict:
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["rng_state"])


def global_norm(update: Mapping[str, LoraPair]) -> float:
    """‖u‖₂ = √(Σ_m ‖A_m‖²_F + ‖B_m‖²_F)."""
    return float(torch.sqrt(sum((p.A.double() ** 2).sum() + (p.B.double() ** 2).sum() for p in update.values())))


def clip(update: Mapping[str, LoraPair], clip_norm: float) -> tuple[Adapters, float]:
    """u · min(1, C/‖u‖₂), and ‖u‖₂."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = global_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: LoraPair(p.A * factor, p.B * factor, p.scale) for name, p in update.items()}, norm


def add_noise(update: Mapping[str, LoraPair], std: float, generator: torch.Generator) -> Adapters:
    """u + z with z ~ N(0, std²) per coordinate, drawn module by module in sorted order (A, then B)."""
    if std < 0:
        raise ValueError(f"the noise std must be >= 0, got {std}")
    if std == 0:
        return dict(update)
    return {name: LoraPair(_noisy(update[name].A, std, generator), _noisy(update[name].B, std, generator),
                           update[name].scale)
            for name in sorted(update)}


def privatize(update: Mapping[str, LoraPair], clip_norm: float, noise_multiplier: float,
              generator: torch.Generator) -> tuple[Adapters, DPReport]:
    """ũ = u·min(1, C/‖u‖₂) + N(0, (σC)²·I): the Gaussian mechanism on one client's adapter update."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    clipped, norm = clip(update, clip_norm)
    noisy = add_noise(clipped, noise_multiplier * clip_norm, generator)
    return noisy, DPReport(norm, norm > clip_norm, float(clip_norm), float(noise_multiplier))


def _noisy(t: Tensor, std: float, generator: torch.Generator) -> Tensor:
    # drawn on the CPU in at least float32, so the same seed gives the same noise on any device or dtype
    dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    z = torch.randn(t.shape, generator=generator, dtype=dtype)
    return t + (std * z).to(device=t.device, dtype=t.dtype)
