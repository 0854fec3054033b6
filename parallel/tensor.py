"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) through DTensor plans, with optional
sequence parallelism for the norms (Korthikanti et al. 2022) and a vocabulary-parallel loss.

The plan is the model's (`tp_plan`, parallel/plan.py); this module applies it. Llama's
(trainer/models/llama.py): per block wq/wk/wv and w1/w3 column-parallel (each rank holds whole
heads / a slice of the hidden units), wo and w2 row-parallel (partial sums reduced once per
sub-layer): two all-reduces per block forward (reduce-scatter + all-gather under sequence
parallelism). The embedding is sharded over the vocabulary (row-wise), the output projection over
the vocabulary (column-wise), and the cross-entropy runs on vocabulary-sharded logits under
`loss_parallel()` so the full [B, T, vocab] logits are never gathered.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from parallel.plan import blocks_of, tp_plan_of


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` (or one pipeline chunk of it) over the 1-D `tp_mesh` by the plan the model
    declares (`tp_plan`, parallel/plan.py), in place: the root entries, then each block's.

    Parameters shared before (tied embeddings) are shared again after: each style distributes its
    own copy of a shared weight.
    """
    plan = tp_plan_of(model, sequence_parallel)
    ties = shared_parameters(model)
    root = {name: style for name, style in plan.root.items() if _holds(model, name)}
    if root:
        parallelize_module(model, tp_mesh, root)
    retie(model, ties)
    for block in blocks_of(model).values():
        parallelize_module(block, tp_mesh, plan.block)
    return model


def _holds(model: nn.Module, name: str) -> bool:
    """Whether `model` has the submodule `name` (a pipeline chunk sets the ends it lacks to None)."""
    module: object = model
    for part in name.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def shared_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of FQNs naming one Parameter (tied weights), largest group first."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def retie(model: nn.Module, ties: list[list[str]]) -> None:
    """Point every name of a tied group at the first name's (now distributed) parameter."""
    for first, *others in ties:
        param = model.get_parameter(first)
        for name in others:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, param)


def tp_loss_context(enabled: bool) -> ContextManager:
    """`loss_parallel()` when logits are vocabulary-sharded: cross-entropy (forward AND backward)
    then runs on the shards with two small all-reduces (max and sum-exp) instead of a gather."""
    return loss_parallel() if enabled else contextlib.nullcontext()


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value as a plain tensor (e.g. a replicated loss), else `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class FullLogits(nn.Module):
    """Runs `module` and gathers vocabulary-sharded logits whole on every rank: what sampling
    needs (training and evaluation never do). Keeps the model in `.module`, as DDP does.

    Under sequence parallelism the length must split evenly over the tp ranks: tokens are padded
    on the right to a multiple of `pad_to` and the padded positions' logits dropped, which is exact
    for a causal model (no position sees a later one)."""

    def __init__(self, module: nn.Module, pad_to: int = 1):
        super().__init__()
        self.module = module
        self.pad_to = pad_to

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        pad = -length % self.pad_to
        if pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad))
        return plain_tensor(self.module(tokens))[:, :length]
