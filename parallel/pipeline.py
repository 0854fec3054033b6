"""Pipeline parallelism: the layer stack cut into pp x virtual_stages chunks, run by a schedule of
`torch.distributed.pipelining`: GPipe (Huang et al. 2019), 1F1B (PipeDream-Flush, Narayanan et al.
2021) or interleaved 1F1B (Megatron-LM, Narayanan et al. SC'21: chunk i on pipeline rank i mod pp,
bubble (pp-1)/(v*m) of the step instead of (pp-1)/m for v chunks per rank and m microbatches).

Two steps, with the other techniques (TP, AC, FSDP) applied to each chunk in between:
`split_model` (a copy of what one chunk keeps, FQNs unchanged; which module list is split and
which modules the ends keep is the model's `stage_structure`) and `build_pipeline` (stages +
schedule).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from parallel.plan import blocks_of, is_wrapped, structure_of
from parallel.tensor import plain_tensor, shared_parameters

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
# Not offered: the zero-bubble schedules (ScheduleInterleavedZeroBubble, ZBV) give wrong gradients
# with FSDP2 on torch 2.13 (some ranks get none); LoopedBFS has no advantage over interleaved 1F1B.


def schedule_problem(schedule: str, pp: int, virtual_stages: int, microbatches: int,
                     n_layers: int) -> Optional[str]:
    """Why `schedule` cannot run this layout (torch 2.13's own requirements, checked before any
    rank starts: a bad split crashes one stage and leaves the others hanging), or None."""
    if schedule not in SCHEDULES:
        return f"schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}"
    chunks = pp * virtual_stages
    if chunks > n_layers:
        return (f"pp*virtual_stages={chunks} pipeline chunks but {n_layers} layers; each chunk needs at "
                "least one layer")
    if schedule == "interleaved_1f1b":
        if virtual_stages < 2:
            return "interleaved_1f1b needs virtual_stages >= 2 (with one stage per rank use 1f1b)"
        # ScheduleInterleaved1F1B runs microbatches in rounds of max(1, m // pp) (torch's flex-pp).
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            ok = [m for m in range(1, 4 * pp + 1) if m % max(1, m // pp) == 0]
            return (f"interleaved_1f1b runs microbatches in rounds of max(1, microbatches // pp) = {rounds}, "
                    f"and {microbatches} is not a multiple of that; allowed with pp={pp}: "
                    f"{', '.join(map(str, ok))}, ... (any multiple of pp)")
    elif virtual_stages != 1:
        return (f"{schedule} runs one stage per rank; with virtual_stages={virtual_stages} use "
                "interleaved_1f1b")
    elif schedule == "1f1b" and microbatches < pp:
        return f"1f1b needs microbatches >= pp (got microbatches={microbatches}, pp={pp})"
    return None


def stage_ids(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Megatron's interleaved assignment: pipeline rank r holds chunks r, r+pp, r+2pp, ..."""
    return [pp_rank + k * pp for k in range(virtual_stages)]


def layer_split(n_layers: int, n_chunks: int) -> list[range]:
    """Contiguous layer ranges, sizes differing by at most one (earlier chunks take the extra)."""
    base, extra = divmod(n_layers, n_chunks)
    bounds = [0]
    for i in range(n_chunks):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(n_chunks)]


def split_model(model: nn.Module, chunk: int, n_chunks: int) -> nn.Module:
    """Chunk `chunk` of `n_chunks`: a copy of `model` holding only that chunk's blocks, the first
    chunk also the model's `first` modules, the last its `last` ones (its `stage_structure`,
    parallel/plan.py); the others are set to None.

    Only what the chunk keeps is copied (the rest is left out of the copy, not copied and deleted),
    and a meta model copies no storage at all: parallelize splits the meta model, then each rank
    allocates its chunks alone. The block list is keyed by global block index, so parameter names
    (and with them checkpoint keys) are the same as in the whole model."""
    structure = structure_of(model)
    if is_wrapped(model):
        raise ValueError(f"a pipeline split of a wrapped model ({type(model).__qualname__}) is not supported: "
                         "split the model itself")
    if shared_parameters(model):
        raise ValueError(f"tied parameters {shared_parameters(model)} cannot be split across pipeline stages")
    blocks = blocks_of(model)
    keys = list(blocks.keys())
    keep = {keys[i] for i in layer_split(len(keys), n_chunks)[chunk]}
    left_out = [blocks[k] for k in keys if k not in keep]
    ends = {name: chunk == 0 for name in structure.first}
    ends.update({name: chunk == n_chunks - 1 for name in structure.last})
    left_out += [getattr(model, name) for name, kept in ends.items() if not kept and getattr(model, name) is not None]
    # deepcopy's memo maps each left-out module to None: it is neither copied nor referenced
    part = copy.deepcopy(model, memo={id(m): None for m in left_out})
    part_blocks = getattr(part, structure.blocks)
    for key in [k for k in keys if k not in keep]:
        del part_blocks[key]
    return part


class ChunksView(nn.Module):
    """This rank's pipeline chunks as one module with the whole model's FQNs (`layers.<i>...`,
    `tok_embeddings`, ...): what the optimizer and DCP's state-dict helpers take, since those map
    one module's parameter names onto one optimizer. It has no forward; the stages run the chunks."""

    def __init__(self, chunks: list[nn.Module]):
        super().__init__()
        object.__setattr__(self, "chunks", chunks)  # not registered: names would gain a prefix
        for chunk in chunks:
            for name, child in chunk.named_children():
                if isinstance(child, nn.ModuleDict):
                    if name not in self._modules:
                        self.add_module(name, nn.ModuleDict())
                    self._modules[name].update(child)
                elif name in self._modules:
                    raise ValueError(f"two pipeline chunks hold {name!r}")
                else:
                    self.add_module(name, child)

    def train(self, mode: bool = True) -> "ChunksView":
        super().train(mode)
        for chunk in self.chunks:
            chunk.train(mode)
        return self


@dataclass
class Pipeline:
    """This rank's stages and the named schedule that runs them; `step` is one forward+backward of
    a local batch, `eval` a forward-only pass, both returning the batch's mean loss on the rank
    holding the last stage and 0 elsewhere."""

    stages: list[PipelineStage]
    schedule_name: str
    microbatches: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    _loss_scale: float = 1.0

    def __post_init__(self):
        cls = SCHEDULES[self.schedule_name]
        if cls is not ScheduleInterleaved1F1B and len(self.stages) != 1:
            raise ValueError(f"schedule {self.schedule_name} runs one stage per rank, got {len(self.stages)}")
        # scale_grads=False: the schedule's own rescaling divides every .grad at the end of a step,
        # also what earlier grad_accum steps left there; microbatch_loss scales the loss instead.
        self.schedule = cls(self.stages if cls is ScheduleInterleaved1F1B else self.stages[0],
                            n_microbatches=self.microbatches, loss_fn=self.microbatch_loss, scale_grads=False)

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def microbatch_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A microbatch's share of the batch mean (times the step's loss scale)."""
        return self.loss_fn(output, target) * self._loss_scale

    def _run(self, run, inputs: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
        self._loss_scale = scale / self.microbatches
        args = (inputs,) if self.has_first else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": targets, "losses": losses} if self.has_last else {}
        run(*args, **kwargs)
        if not self.has_last:
            return torch.zeros((), device=inputs.device)
        return torch.stack([plain_tensor(loss.detach()) for loss in losses]).sum()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of all microbatches; gradients are of `loss_scale` x the batch's mean
        loss (accumulated into .grad), e.g. loss_scale = 1/grad_accum."""
        return self._run(lambda *a, **k: self.schedule.step(*a, return_outputs=False, **k),
                         inputs, targets, loss_scale)

    @torch.no_grad()
    def eval(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward only (the schedule's eval mode): the batch's mean loss."""
        return self._run(self.schedule.eval, inputs, targets, 1.0)


def build_pipeline(parts: list[nn.Module], chunk_ids: list[int], pp_mesh: DeviceMesh, schedule: str,
                   microbatches: int, loss_fn: Callable, device: torch.device) -> Pipeline:
    """Stages for this rank's chunks (already tensor- and data-parallelized) and the named
    schedule over them; stage i of pp * len(parts) talks to its neighbours over `pp_mesh`."""
    n_chunks = pp_mesh.size() * len(parts)
    stages = [PipelineStage(part, chunk, n_chunks, device, group=pp_mesh.get_group())
              for part, chunk in zip(parts, chunk_ids)]
    return Pipeline(stages, schedule, microbatches, loss_fn)
