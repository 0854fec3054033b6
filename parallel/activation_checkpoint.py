"""Activation checkpointing per transformer block: keep a block's input, recompute its inside in
backward (Chen et al. 2016, memory O(layers) -> O(1) block), or recompute selectively (Korthikanti
et al. 2022): keep the matmul and collective outputs, recompute the cheap, memory-heavy rest
(norms, RoPE, SwiGLU's pointwise ops, the attention core).

Modes: "none" | "full" (every block) | "selective" (every block, op-level policy above).
Blocks are wrapped with torch's `checkpoint_wrapper`; state dicts (`state_dict()`, DCP's
`get_model_state_dict` / `get_optimizer_state_dict`) strip the wrapper's prefix, so checkpoint
keys are the unwrapped FQNs. `named_parameters()` names show it; `unwrapped_fqn` removes it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallel.plan import blocks_of

AC_MODES = ("none", "full", "selective")

_aten, _c10d = torch.ops.aten, torch.ops._c10d_functional
# Outputs kept by selective recomputation: the FLOP-heavy matmuls, and collectives (recomputing
# a tensor-parallel all-reduce in backward would cost a second round of communication).
_SAVE = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    _c10d.all_reduce.default, _c10d.reduce_scatter_tensor.default, _c10d.all_gather_into_tensor.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Wrap each block of the model's block list (its `stage_structure`) for recomputation, in place."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}; allowed: {', '.join(AC_MODES)}")
    if mode == "none":
        return model
    blocks = blocks_of(model)
    for key, block in blocks.items():
        if mode == "full":
            blocks[key] = checkpoint_wrapper(block)
        else:
            blocks[key] = checkpoint_wrapper(
                block, context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))
    return model


def unwrapped_fqn(name: str) -> str:
    """A parameter's name as the unwrapped model has it (what checkpoints store)."""
    return name.replace(_CHECKPOINT_PREFIX, "")
