"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) through DTensor plans, with optional
sequence parallelism for the norms (Korthikanti et al. 2022) and a vocabulary-parallel loss.

Per block: wq/wk/wv and w1/w3 are column-parallel (each rank holds whole heads / a slice of the
hidden units), wo and w2 row-parallel (partial sums reduced once per sub-layer): two all-reduces
per block forward (reduce-scatter + all-gather under sequence parallelism). The embedding is
sharded over the vocabulary (row-wise), the output projection over the vocabulary (column-wise),
and the cross-entropy runs on vocabulary-sharded logits under `loss_parallel()` so the full
[B, T, vocab] logits are never gathered.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` (a Llama or one pipeline chunk of it) over the 1-D `tp_mesh`, in place.

    Activations between blocks are plain tensors: replicated, or sharded on the sequence dim
    (dim 1) under `sequence_parallel`, so pipeline stages send them as they are. The logits are a
    DTensor sharded on the vocabulary: the loss runs under `tp_loss_context(True)`, and
    `FullLogits` gathers them where whole logits are needed (sampling).
    """
    between = Shard(1) if sequence_parallel else Replicate()
    tied = (model.tok_embeddings is not None and model.output is not None
            and model.output.weight is model.tok_embeddings.weight)
    root: dict[str, object] = {}
    if model.tok_embeddings is not None:
        root["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.norm is not None and sequence_parallel:
        root["norm"] = SequenceParallel()
    if model.output is not None:
        root["output"] = ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)
    if root:
        parallelize_module(model, tp_mesh, root)
    if tied:  # each style distributed its own copy of the shared weight: share the DTensor again
        model.output.weight = model.tok_embeddings.weight

    for block in model.layers.values():
        plan: dict[str, object] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=between),
            "feed_forward.w3": ColwiseParallel(),
        }
        if sequence_parallel:
            # norms run on a sequence shard; attention and MLP gather the whole sequence first
            plan.update({
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                desired_input_layouts=(Replicate(), None, None)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
    return model


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
