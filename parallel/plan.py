"""What a model tells parallel/ about itself (torchtitan keeps these plans with the models): its
tensor-parallel plan and its stage structure. parallel/ applies whatever the model declares, so a
new head (a critic's value head), a new family or a peft-wrapped model needs no edit here.

A model class declares, as Plait's Llama does (trainer/models/llama.py):

    stage_structure = StageStructure(blocks="layers", first=("tok_embeddings",), last=("norm", "output"))

    def tp_plan(self, sequence_parallel: bool) -> TensorParallelPlan: ...
    def init_param(self, fqn: str, weight: torch.Tensor, generator: torch.Generator) -> None: ...
    def init_buffers(self) -> None: ...

`blocks` names an `nn.ModuleDict` keyed by the global block index: the unit the pipeline splits,
FSDP shards and activation checkpointing wraps. `first` / `last` are the modules only the first /
last pipeline chunk keeps (set to None elsewhere). The TP plan maps submodule names, relative to
the model (`root`) or to each block (`block`), to DTensor `ParallelStyle`s; root entries a pipeline
chunk does not hold are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class StageStructure:
    """Which module list the pipeline splits, and which modules only its ends keep."""

    blocks: str = "layers"
    first: tuple[str, ...] = ()
    last: tuple[str, ...] = ()


@dataclass
class TensorParallelPlan:
    """Submodule name -> ParallelStyle, on the model root and on every block."""

    root: dict[str, object] = field(default_factory=dict)
    block: dict[str, object] = field(default_factory=dict)


def plan_holder(model: nn.Module) -> nn.Module:
    """The module that declares the plan: the model, or the base model inside a peft wrapper
    (PeftModel / LoraModel), whose submodule names the plan uses."""
    inner = model  # unwrapped first: a PeftModel forwards unknown attributes to the base model
    while hasattr(inner, "get_base_model") and inner.get_base_model() is not inner:
        inner = inner.get_base_model()
    return inner


def is_wrapped(model: nn.Module) -> bool:
    """True when the plan's holder sits inside a wrapper (peft) rather than being the model."""
    return plan_holder(model) is not model


def structure_of(model: nn.Module) -> StageStructure:
    holder = plan_holder(model)
    structure: Optional[StageStructure] = getattr(holder, "stage_structure", None)
    if structure is None:
        raise TypeError(f"{type(holder).__qualname__} declares no `stage_structure` (parallel/plan.py): "
                        "parallel/ needs to know its block list to shard, split or checkpoint it")
    return structure


def blocks_of(model: nn.Module) -> nn.ModuleDict:
    """The model's block list (a ModuleDict keyed by global block index)."""
    blocks = getattr(plan_holder(model), structure_of(model).blocks)
    if not isinstance(blocks, nn.ModuleDict):
        raise TypeError(f"{type(plan_holder(model)).__qualname__}.{structure_of(model).blocks} must be an "
                        f"nn.ModuleDict keyed by block index, got {type(blocks).__qualname__}")
    return blocks


def tp_plan_of(model: nn.Module, sequence_parallel: bool) -> TensorParallelPlan:
    holder = plan_holder(model)
    if not hasattr(holder, "tp_plan"):
        raise TypeError(f"{type(holder).__qualname__} declares no `tp_plan(sequence_parallel)` "
                        "(parallel/plan.py): it cannot be tensor-parallelized")
    return holder.tp_plan(sequence_parallel)
