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
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


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


# Flattened: every entry, hyperparameters included, keyed by parameter FQN. Grouped by position,
# pipeline ranks would each save "param_groups.0" for different parameters and DCP keeps one copy.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class OptimizerState(Stateful):
    """Optimizer state keyed by parameter FQN (not by position), so it reshards with the model."""

    def __init__(self, parts: list[nn.Module], optimizer: torch.optim.Optimizer):
        self.parts = parts
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        out: dict = {}
        for part in self.parts:
            out.update(get_optimizer_state_dict(part, self.optimizer, options=FLAT))
        return out

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            set_optimizer_state_dict(part, self.optimizer, state,
                                     options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False))


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
