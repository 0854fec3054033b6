"""DeepSpeed ZeRO as a data-parallel backend (Rajbhandari et al., SC'20): stage 1 partitions the
optimizer state over the N_d data-parallel ranks, stage 2 the gradients too, stage 3 the
parameters too. The paper's memory per rank, mixed-precision Adam (K = 12): (2 + 2 + K)·Ψ
replicated; 4Ψ + KΨ/N_d at stage 1; 2Ψ + (2 + K)Ψ/N_d at stage 2; (2 + 2 + K)Ψ/N_d at stage 3.

The engine wraps Plait's own torch AdamW and LR schedule (no DeepSpeed-built optimizer, so no C++
op to compile), joins the process group that is already up, and keeps Plait's precision policy:
fp32 weights and gradient reduction, bf16 matmuls through torch autocast when asked (refused at
stage 3 by trainer/config.py: its gradients there differ from DDP's by ~1e-3).

Checkpoints stay in Plait's one format: `ZeroModelState` and `ZeroOptimizerState` hold full
tensors keyed by FQN, the same keys and shapes DCP's `get_model_state_dict` and flattened
`get_optimizer_state_dict` give for an unsharded model, so ZeRO checkpoints load under FSDP or in
one process and theirs load under ZeRO. Each rank gathers the whole state: a save needs a full
fp32 model and its Adam state in memory on every rank (DCP then writes each tensor once).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh

from parallel.activation_checkpoint import unwrapped_fqn
from parallel.optim_state import param_groups_from_json, param_groups_to_json

DEEPSPEED_DEFAULT_BUCKET = 500_000_000


def zero_bucket_elements(params: int) -> int:
    """Reduce/all-gather bucket = min(DeepSpeed's 5e8 default, max(1e6, P)): the default alone is a
    2 GB fp32 buffer per rank even for a tiny model."""
    return int(min(DEEPSPEED_DEFAULT_BUCKET, max(1_000_000, params)))

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

ZERO_STAGES = (1, 2, 3)


class DeepSpeedZero(NamedTuple):
    engine: "DeepSpeedEngine"  # forward, backward, accumulation, clipping, optimizer and LR steps
    model_state: Stateful  # full weights by FQN (gathered under ZeRO-3)
    optimizer_state: Stateful  # full optimizer state by FQN, flattened as DCP flattens it


def apply_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, dp_mesh: DeviceMesh, stage: int,
                    micro_batch_size: int, grad_accum: int, grad_clip: float,
                    bf16_autocast: bool = False) -> DeepSpeedZero:
    """Wrap `model`, `optimizer` (a torch optimizer, its param groups kept) and `scheduler` (stepped
    by the engine once per optimizer step) in a ZeRO-`stage` engine over `dp_mesh`, the 1-D mesh of
    every rank. `grad_clip` is the global L2 norm (0: off)."""
    import deepspeed

    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage {stage}; allowed: {', '.join(map(str, ZERO_STAGES))}")
    if dp_mesh.ndim != 1 or dp_mesh.size() != dist.get_world_size():
        # Without an `mpu`, DeepSpeed partitions over the default group: the mesh must be all of it.
        raise ValueError(f"DeepSpeed ZeRO partitions over every rank: the data-parallel mesh has "
                         f"{dp_mesh.size()} of {dist.get_world_size()} ranks")
    # Skip compiling DeepSpeed's shared-memory all-reduce op (~1 min on CPU; torch.distributed's
    # collectives do the same job). importlib, because `deepspeed.comm.torch` is also the name
    # `deepspeed.comm` gives the torch package.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would drown Plait's log

    bucket = zero_bucket_elements(sum(p.numel() for p in model.parameters()))
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "steps_per_print": 2**62,  # Plait logs; DeepSpeed's own progress lines are off
        # Plait's bf16 = fp32 master weights, bf16 matmuls, fp32 gradient reduction: torch autocast,
        # with no module's gradients communicated in bf16 (DeepSpeed's default would do Linears).
        "torch_autocast": {"enabled": bf16_autocast, "dtype": "bfloat16", "lower_precision_safe_modules": []},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=config, dist_init_required=False)
    return DeepSpeedZero(engine, ZeroModelState(engine), ZeroOptimizerState(engine))


def _gathered(engine: "DeepSpeedEngine", params: list[nn.Parameter], modifier_rank=None):
    """ZeRO-3: the full `params` inside the context (rank `modifier_rank`'s writes kept on exit)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank,
                                             enabled=engine.zero_optimization_stage() == 3)


class ZeroModelState(Stateful):
    """The engine's module weights by FQN, full tensors on every rank."""

    def __init__(self, engine: "DeepSpeedEngine"):
        self.engine = engine

    def state_dict(self) -> dict:
        module = self.engine.module
        with _gathered(self.engine, list(module.parameters())):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        module = self.engine.module
        # Every rank holds the same full values; under ZeRO-3 rank 0's are re-partitioned on exit.
        with _gathered(self.engine, list(module.parameters()), modifier_rank=0):
            module.load_state_dict(state)
        self.engine.optimizer.refresh_fp32_params()  # the optimizer's fp32 partitions from the weights


class ZeroOptimizerState(Stateful):
    """The optimizer state as trainer.state.OptimizerState writes it for an unsharded model:
    `state.<fqn>.<key>` (full tensors; `step` per parameter) and `param_groups` (parallel/optim_state.py)."""

    def __init__(self, engine: "DeepSpeedEngine"):
        self.engine = engine
        self.params = {unwrapped_fqn(n): p for n, p in engine.module.named_parameters()}
        self.optimizer = engine.optimizer.optimizer  # the torch optimizer inside ZeRO's wrapper

    def _materialize(self) -> None:
        """Create the state of ZeRO's flat fp32 partitions before the first step, as DCP does for a
        torch optimizer (so a resume has tensors to load into): one step on zero gradients at lr 0,
        which leaves the weights untouched. Then link each parameter's views into it, which
        `safe_{get,set}_full_optimizer_state` read (ZeRO-1/2; ZeRO-3 finds them by position)."""
        zero, optimizer = self.engine.optimizer, self.optimizer
        stage3 = self.engine.zero_optimization_stage() == 3
        if optimizer.state:
            if not stage3:
                # DeepSpeed 0.19.8 links after stepping the first group only, so later groups'
                # views stay empty: link again now that every group has state.
                zero._hp_optimizer_states_linked = False
                zero._lazy_init_hp_params_optimizer_state()
            return
        if stage3:  # ZeRO-3 hands its partitions to the torch optimizer only inside step()
            zero._set_fp32_optimizer_param_groups()
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
            for flat in group["params"]:
                flat.grad = torch.zeros_like(flat)
        optimizer.step()
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
            for flat in group["params"]:
                flat.grad = None
        if stage3:
            zero._clear_fp32_optimizer_param_groups()
        else:
            zero._lazy_init_hp_params_optimizer_state()

    def _state_keys(self) -> dict[str, bool]:
        """Per-parameter state keys -> whether partitioned like the parameter (Adam's moments) or
        one scalar for the whole partition (Adam's step)."""
        first = next(iter(self.optimizer.state.values()))
        return {k: torch.is_tensor(v) and v.dim() > 0 for k, v in first.items()}

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        self._materialize()
        out: dict = {}
        scalars = next(iter(self.optimizer.state.values()))
        for fqn, p in self.params.items():
            for key, partitioned in self._state_keys().items():
                value = safe_get_full_optimizer_state(p, key) if partitioned else scalars[key]
                out[f"state.{fqn}.{key}"] = value.detach().clone() if torch.is_tensor(value) else value
        out["param_groups"] = param_groups_to_json(self.optimizer.param_groups)
        return out

    def load_state_dict(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        self._materialize()
        keys = self._state_keys()
        for fqn, p in self.params.items():
            for key in (k for k, partitioned in keys.items() if partitioned):
                safe_set_full_optimizer_state(p, state[f"state.{fqn}.{key}"], key)
        first = next(iter(self.params))  # every parameter stepped together: any one's scalars do
        for partition in self.optimizer.state.values():
            for key in (k for k, partitioned in keys.items() if not partitioned):
                value = state[f"state.{first}.{key}"]
                partition[key] = value.detach().clone() if torch.is_tensor(value) else value
        for group, saved in zip(self.optimizer.param_groups, param_groups_from_json(state["param_groups"])):
            group.update({k: v for k, v in saved.items() if k in group})
