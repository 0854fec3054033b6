"""Model registry: `cfg.model.name` ("llama_1b") selects a family ("llama") registered here by name.

`build_model` always builds on the meta device and then materialises and initialises, so a direct
build and a meta build + `to_empty` + `init_weights()` give the same weights under the same seed.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.models.llama import Llama, flops_per_token, generate, num_params
from trainer.models.loss import cross_entropy_loss

MODELS: dict[str, type[nn.Module]] = {"llama": Llama}

__all__ = ["MODELS", "Llama", "build_model", "cross_entropy_loss", "flops_per_token", "generate",
           "model_class", "num_params", "register_model"]


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_model("mamba")` makes configs named "mamba" or "mamba_*" build it."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model {name!r} is already registered as {MODELS[name].__qualname__}")
        MODELS[name] = cls
        return cls
    return wrap


def model_class(name: str) -> type[nn.Module]:
    """The registered family for `name`: an exact key, else the longest key `k` with name = k + "_<size>"."""
    if name in MODELS:
        return MODELS[name]
    matches = [k for k in MODELS if name.startswith(k + "_")]
    if not matches:
        raise ValueError(
            f"model.name={name!r} matches no registered model; allowed: one of "
            f"{', '.join(sorted(MODELS))}, optionally followed by _<size> (e.g. llama_1b)"
        )
    return MODELS[max(matches, key=len)]


def build_model(cfg: ModelConfig, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """The model for `cfg`, initialised on `device` (default CPU); device="meta" leaves it unmaterialised.

    The class must take the config as its only argument and define `init_weights()`.
    """
    cls = model_class(cfg.name)
    with torch.device("meta"):
        model = cls(cfg)
    device = torch.device("cpu" if device is None else device)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model
