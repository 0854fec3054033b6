"""Checkpointable pieces of a training run, each a torch `Stateful`.

Model and optimizer go through `torch.distributed.checkpoint.state_dict`, which speaks FQNs and
global DTensor shapes, so a checkpoint saved under one (pp, dp, tp) layout loads under another.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

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
    """torch (CPU and CUDA), numpy and Python RNG streams of this rank, stored under its rank.

    It fits whatever checkpoint it meets (`fit_checkpoint`), so a run resumes across devices and
    world sizes: a checkpoint saved on a CPU has no CUDA stream, and a GPU run loading it seeds its
    CUDA generator from the restored CPU stream (deterministically); a CUDA stream in a checkpoint
    loaded on a CPU is skipped; a rank the saving run did not have (another world size) reseeds
    all its streams from (seed, rank, step). Each says so in one line through `say`.
    """

    def __init__(self, rank: int, seed: int = 0, say: Optional[Callable[[str], None]] = None):
        self.rank, self.seed = rank, seed
        self.key = f"rank{rank}"
        self.say = say or _note
        self._seed_cuda = False  # the checkpoint has no CUDA stream for a run that uses one

    def state_dict(self) -> dict:
        streams = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if _cuda_in_use():
            streams["cuda"] = torch.cuda.get_rng_state()
        return {self.key: streams}

    def fit_checkpoint(self, template: dict, stored: set[str], manifest: dict) -> Optional[dict]:
        """What of `template` to load given the keys the checkpoint stores for this component;
        None when it holds no stream of this rank (reseeded here instead)."""
        if not any(k == self.key or k.startswith(f"{self.key}.") for k in stored):
            step = int(manifest.get("counters", {}).get("step", 0))
            self.reseed(step)
            saved = manifest.get("world_size", "another number of")
            self.say(f"rank {self.rank}: the checkpoint has no RNG stream for this rank (saved by {saved} "
                     f"rank(s)): reseeded from (seed {self.seed}, rank {self.rank}, step {step})")
            return None
        streams = dict(template[self.key])
        self._seed_cuda = "cuda" in streams and f"{self.key}.cuda" not in stored
        if self._seed_cuda:
            del streams["cuda"]
        return {self.key: streams}

    def load_state_dict(self, state: dict) -> None:
        streams = state[self.key]
        torch.set_rng_state(streams["torch"])
        np.random.set_state(streams["numpy"])
        random.setstate(streams["python"])
        if "cuda" in streams and torch.cuda.is_available():
            torch.cuda.set_rng_state(streams["cuda"])
        elif self._seed_cuda and _cuda_in_use():
            seed = _seed_from(streams["torch"])
            torch.cuda.manual_seed(seed)
            if self.rank == 0:  # every rank does the same; one line says it
                self.say(f"the checkpoint holds no CUDA RNG stream (saved without a GPU): CUDA generators "
                         f"seeded from each rank's restored CPU stream (rank 0: {seed})")
        self._seed_cuda = False

    def reseed(self, step: int) -> None:
        """Seed every stream of this rank from (seed, rank, step): the same on every resume."""
        seed = _seed_from(torch.tensor([self.seed, self.rank, step], dtype=torch.int64))
        torch.manual_seed(seed)  # also every CUDA device's generator
        np.random.seed(seed % 2**32)
        random.seed(seed)


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _seed_from(tensor: torch.Tensor) -> int:
    """A 63-bit seed that is a pure function of a tensor's bytes."""
    digest = hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _note(message: str) -> None:
    print(f"plait: note: {message}", file=sys.stderr, flush=True)


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
    """Counters of a run: optimizer steps, samples and tokens seen, and a family's own (`extra`:
    JSON values, e.g. a federated round or a continual experience index)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        # `extra` as one JSON string: DCP fills only the keys a fresh run's state already has,
        # and a fresh run does not know which counters a family adds
        return {**asdict(self), "extra": json.dumps(self.extra, sort_keys=True)}

    def fit_checkpoint(self, template: dict, stored: set[str], manifest: dict) -> dict:
        """Checkpoints written before `extra` was stored this way hold no `extra`: load the rest."""
        return template if "extra" in stored else {k: v for k, v in template.items() if k != "extra"}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, json.loads(value) if key == "extra" and isinstance(value, str) else value)
