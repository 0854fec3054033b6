"""Model registry: `cfg.model.name` ("llama_1b") selects a family ("llama") registered here by name.

`build_model` always builds on the meta device; unless asked for a meta model it then materialises
and initialises by parallel/init.py's rule (each parameter from a generator seeded by the seed and
its name), so a direct build and a meta build + `parallelize(..., seed=)` on any layout give the
same weights under the same seed.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from parallel.init import materialize
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.models.llama import Llama, flops_per_token, generate, num_params
from trainer.models.loss import cross_entropy_loss, value_loss
from trainer.models.value import LlamaValue
from trainer.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model", key="model.name")
MODELS.add("llama", Llama)
MODELS.add("llama_value", LlamaValue)

__all__ = ["MODELS", "Llama", "LlamaValue", "build_model", "cross_entropy_loss", "flops_per_token", "generate",
           "model_class", "num_params", "register_model", "value_loss"]


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_model("mamba")` makes configs named "mamba" or "mamba_*" build it."""
    return MODELS.register(name)


def model_class(name: str) -> type[nn.Module]:
    """The registered family for `name`: an exact key, else the longest key `k` with name = k + "_<size>"
    (`llama_1b` -> llama, `llama_value_1b` -> llama_value). Unknown: ConfigError naming model.name."""
    if name in MODELS:
        return MODELS[name]
    matches = [k for k in MODELS if name.startswith(k + "_")]
    if not matches:
        raise ConfigError(f"{MODELS.unknown(name)}, optionally followed by _<size> (e.g. llama_1b)")
    return MODELS[max(matches, key=len)]


def build_model(cfg: ModelConfig, device: Optional[Union[str, torch.device]] = None,
                seed: Optional[int] = None) -> nn.Module:
    """The model for `cfg` on `device` (default CPU), initialised from `seed` (None: one draw from
    torch's global generator, so `torch.manual_seed` before the call decides it); device="meta"
    leaves it unmaterialised, for `parallelize(..., device=, seed=)` to allocate each rank's shards.

    The class takes the config as its only argument and declares parallel/plan.py's methods
    (`init_param`, `init_buffers`; `stage_structure` and `tp_plan` to be split and sharded)."""
    cls = model_class(cfg.name)
    with torch.device("meta"):
        model = cls(cfg)
    device = torch.device("cpu" if device is None else device)
    if device.type != "meta":
        materialize(model, device, seed)
    return model
