"""Checkpointable pieces of a training run, each a torch `Stateful`.

Model and optimizer go through `torch.distributed.checkpoint.state_dict`, which speaks FQNs and
global DTensor shapes, so a checkpoint saved under one (pp, dp, tp) layout loads under another.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from parallel.optim_state import param_groups_from_json, param_groups_to_json


class ModelState(Stateful):
    """Weights of all model parts (several when a pipeline rank holds virtual stages)."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict:
        out = {}
        for part in self.parts:
            out.update(get_model_state_dict(part))
        return out

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(strict=False))


# Tensors keyed by parameter FQN, hyperparameters per group (parallel/optim_state.py): reshards,
# and pipeline ranks never collide.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
FLAT_LOAD = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


def group_of_fqn(part: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Which optimizer param group holds each of `part`'s parameters, by the FQNs DCP uses."""
    index = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    return {fqn: index[id(p)] for name, p in part.named_parameters() if id(p) in index
            for fqn in _get_fqns(part, name)}


class OptimizerState(Stateful):
    """Optimizer state keyed by parameter FQN (not by position), so it reshards with the model."""

    def __init__(self, parts: list[nn.Module], optimizer: torch.optim.Optimizer):
        self.parts = parts
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        out: dict = {}
        for part in self.parts:
            flat = get_optimizer_state_dict(part, self.optimizer, options=FLAT)
            out.update((k, v) for k, v in flat.items() if k.startswith("state."))
        out["param_groups"] = param_groups_to_json(self.optimizer.param_groups)
        return out

    def load_state_dict(self, state: dict) -> None:
        groups = param_groups_from_json(state["param_groups"])
        tensors = {k: v for k, v in state.items() if k.startswith("state.")}
        for part in self.parts:
            flat = dict(tensors)
            for fqn, g in group_of_fqn(part, self.optimizer).items():
                flat.update((f"param_groups.{fqn}.{k}", v) for k, v in groups[g].items())
            set_optimizer_state_dict(part, self.optimizer, flat, options=FLAT_LOAD)


class RNGState(Stateful):
    """torch (CPU and CUDA), numpy and Python RNG streams of this rank, stored under its rank."""

    def __init__(self, rank: int):
        self.key = f"rank{rank}"

    def state_dict(self) -> dict:
        streams = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            streams["cuda"] = torch.cuda.get_rng_state()
        return {self.key: streams}

    def load_state_dict(self, state: dict) -> None:
        streams = state[self.key]
        torch.set_rng_state(streams["torch"])
        np.random.set_state(streams["numpy"])
        random.setstate(streams["python"])
        if "cuda" in streams and torch.cuda.is_available():
            torch.cuda.set_rng_state(streams["cuda"])


class TensorDict(Stateful):
    """A plain {name: tensor} dict as a checkpoint component (imports, exports)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return self.tensors

    def load_state_dict(self, state: dict) -> None:
        self.tensors.update(state)


@dataclass
class Progress(Stateful):
    """Counters of a run: optimizer steps, samples and tokens seen."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
