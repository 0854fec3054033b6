"""The coefficient β of the KL-to-reference reward penalty: fixed, or adapted towards a target KL
(Ziegler et al. 2019, "Fine-tuning language models from human preferences"). A controller is a
Stateful: β changes during a run, so the checkpoint keeps it."""

from __future__ import annotations

from typing import Any

from trainer.errors import ConfigError
from trainer.registry import Registry

KL_CONTROLLERS: Registry[type] = Registry("KL controller", key="task.kl_ctrl")


@KL_CONTROLLERS.register("fixed")
class FixedKLController:
    """β_k = β_0."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ConfigError(f"task.kl_coef={kl_coef!r} is out of range; allowed: a number >= 0")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


@KL_CONTROLLERS.register("adaptive")
class AdaptiveKLController(FixedKLController):
    """β ← β·(1 + clip(KL/KL_target − 1, −0.2, 0.2)·n/H)  (n: samples since the last update, H: horizon)."""

    def __init__(self, kl_coef: float, target_kl: float, horizon: int):
        super().__init__(kl_coef)
        if target_kl <= 0:
            raise ConfigError(f"task.target_kl={target_kl!r} is out of range; allowed: a number > 0")
        if horizon <= 0:
            raise ConfigError(f"task.kl_horizon={horizon!r} is out of range; allowed: an integer > 0")
        self.target_kl = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target_kl - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value
