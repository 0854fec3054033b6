"""What every role's worker shares: its process group and mesh, its model built on the meta device
and parallelized under the role's layout, its optimizer, and its part of the checkpoint."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from parallel.grad import clip_grad_norm
from parallel.mesh import ParallelDims, build_mesh
from parallel.parallelize import parallelize
from parallel.tensor import tp_loss_context
from rlhf.dispatch import Mode, WorkerInfo, register, worker_info
from rlhf.workers.objectives import StagedObjective
from rlhf.workers.offload import state_sizes
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.finding import find_step
from trainer.checkpoint.state import ModelState, OptimizerState, RNGState
from trainer.launch.distributed import init_distributed, pick_device
from trainer.models import build_model
from trainer.optim import build_optimizer


@dataclass
class WorkerSpec:
    """Everything a worker needs to build itself (picklable: Ray ships it to the actor)."""

    role: str
    rank: int
    world_size: int
    model: Any  # trainer.config.ModelConfig of this role's network
    layout: Any  # trainer.config.ParallelConfig of this role
    optim: Any  # trainer.config.OptimConfig, lr already the role's
    options: Any  # rlhf.config.RLHFOptions
    seed: int
    precision: str = "fp32"
    device: str = "auto"
    checkpoint_dir: str = ""
    keep_last: int = 3
    eos_id: int = 2  # the tokenizer's end token: a response stops after it
    micro_batches: int = 1  # forward/backward passes per worker per update (DeepSpeed's accumulation)
    pad_id: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0


def layout_dims(layout) -> ParallelDims:
    return ParallelDims(pp=layout.pp, dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp)


class Worker:
    """A role's worker: `init_model` (once, on every rank) then the role's registered methods."""

    trainable = True  # the reference and the reward model have no optimizer

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.role = spec.role
        self.mesh = None
        self.model: Optional[nn.Module] = None
        self.parts: list[nn.Module] = []
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.info: Optional[WorkerInfo] = None
        self.pipeline = None
        self.engine = None  # a DeepSpeed ZeRO engine (dp_backend=deepspeed), else None
        self._zero_states: tuple = ()
        self.objective = StagedObjective()  # what a pipeline's last stage computes, set per call
        self._ckpt_group = None
        self.offloader = None  # rlhf/workers/offload.py's, for a colocated role that gives way while idle

    # --- building ---------------------------------------------------------------------------------

    def _init_group(self) -> None:
        s = self.spec
        torch.set_num_threads(s.options.threads)
        if s.world_size > 1 and dist.is_initialized():  # a colocated role: this process's group is its group
            if dist.get_world_size() != s.world_size:
                raise ValueError(f"the {s.role} workers need {s.world_size} processes; the colocated group has "
                                 f"{dist.get_world_size()}")
            self.device = pick_device(s.device, 0 if torch.cuda.is_available() else s.rank)
        elif s.world_size > 1:
            os.environ.setdefault("LOCAL_WORLD_SIZE", str(s.world_size))
            env = init_distributed(s.rank, s.world_size, master_addr=s.master_addr, master_port=s.master_port,
                                   device=s.device, local_rank=0 if torch.cuda.is_available() else s.rank)
            self.device = env.device
        else:
            self.device = pick_device(s.device, 0)
        self.mesh = build_mesh(layout_dims(s.layout), self.device.type)
        # checkpoint collectives on their own gloo group (sharing the compute group can deadlock)
        self._ckpt_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.info = worker_info(self.mesh, s.rank)

    def build_network(self, model_cfg) -> Optional[nn.Module]:
        """A network under this role's layout, each rank initialising only its shards; under
        pipeline parallelism `self.pipeline` runs it (and the returned model is None)."""
        model, parts, pipeline = parallelize(build_model(model_cfg, device="meta"), self.mesh, self.spec.layout,
                                             self.spec.precision, loss_fn=self.objective, device=self.device,
                                             seed=self.spec.seed)
        self.parts, self.pipeline = parts, pipeline
        return model

    # --- running the network --------------------------------------------------------------------

    def set_train(self, mode: bool) -> None:
        for part in self.parts:
            part.train(mode)
        if self.model is not None:
            self.model.train(mode)

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline is None or self.pipeline.has_last

    def run_objective(self, tokens: torch.Tensor, packed: torch.Tensor, fn, train: bool) -> None:
        """fn(output, packed) on the network's output for `tokens` (on the last pipeline stage under
        pp, per pipeline microbatch); with `train`, backward of its sum. `packed` is per position
        of tokens[:, 1:] ([B, W-1, C])."""
        tokens, packed = tokens.to(self.device), packed.to(self.device)
        with tp_loss_context(self.spec.layout.tp > 1):  # vocab-parallel cross-entropy, backward included
            self._run_objective(tokens, packed, fn, train)

    def _run_objective(self, tokens: torch.Tensor, packed: torch.Tensor, fn, train: bool) -> None:
        if self.engine is not None and train:  # DeepSpeed counts micro-batches, steps at the last one
            loss = fn(self.engine(tokens), packed)
            self.engine.backward(loss, scale_wrt_gas=False)  # the objective is already the exact share
            self.engine.step()
            return
        if self.pipeline is None:
            with torch.set_grad_enabled(train):
                loss = fn(self.model(tokens), packed)
            if train:
                loss.backward()
            return
        # A pipeline's stages fix their buffers' shapes at the first call: every call runs the same
        # [rows, model.max_seq_len] (right padding is exact for a causal model; padded rows and
        # positions have a zero target mask, and callers read only their own rows and positions).
        m = self.pipeline.microbatches
        rows = -(-self.spec.options.responses_per_micro_batch // m) * m
        width = self.spec.model.max_seq_len
        tokens = torch.nn.functional.pad(tokens, (0, width - tokens.shape[1], 0, rows - tokens.shape[0]))
        packed = torch.nn.functional.pad(packed, (0, 0, 0, width - 1 - packed.shape[1], 0, rows - packed.shape[0]))
        self.objective.fn = fn
        if train:  # the pipeline scales each microbatch's loss by 1/m: m restores the sum
            self.pipeline.step(tokens, packed, loss_scale=m)
        else:
            self.pipeline.eval(tokens, packed)

    def optimizer_step(self) -> float:
        """Clip by the global norm (over pipeline stages too), step, zero; returns the norm.
        (A DeepSpeed engine has stepped at its last micro-batch: only its norm is read.)"""
        if self.engine is not None:
            return float(self.engine.get_global_grad_norm() or 0.0)
        params = [p for part in self.parts for p in part.parameters()]
        pp_group = self.mesh["pp"].get_group() if self.pipeline is not None else None
        norm = clip_grad_norm(params, self.spec.optim.grad_clip, pp_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @register(Mode.ONE_TO_ALL)
    def init_model(self, _: Any = None) -> WorkerInfo:
        """Join the role's process group, build the network and optimizer; returns where this rank sits."""
        self._init_group()
        self.model = self.build_network(self.spec.model)
        self.load_initial_weights()
        if self.trainable:
            self.optimizer = build_optimizer(self.parts, self.spec.optim)
            if self.spec.layout.dp_backend == "deepspeed" and self.info.dp_size > 1:
                self._apply_deepspeed()
        else:
            for part in self.parts:
                part.requires_grad_(False)
        return self.info

    def _apply_deepspeed(self) -> None:
        """ZeRO over the role's data-parallel ranks (the whole group: no tp or pp with it)."""
        from parallel.deepspeed_zero import apply_deepspeed

        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        zero = apply_deepspeed(self.model, self.optimizer, scheduler, self.mesh["dp"], self.spec.layout.zero_stage,
                               micro_batch_size=self.spec.options.responses_per_micro_batch,
                               grad_accum=self.spec.micro_batches, grad_clip=self.spec.optim.grad_clip,
                               bf16_autocast=self.spec.precision == "bf16")
        self.engine, self.model = zero.engine, zero.engine  # forward (and generation) run through it
        self._zero_states = (zero.model_state, zero.optimizer_state)

    def load_initial_weights(self) -> None:
        """Weights from the role's `init_from` checkpoint (the "model" component), if one is set."""

    def load_model_component(self, path: str, parts: Optional[list[nn.Module]] = None) -> None:
        """The "model" component of a checkpoint (a step, or a run's checkpoint dir: its newest) into `parts`."""
        step = find_step(path)
        Checkpointer(str(step.parent), group=self._ckpt_group).load(step, {"model": ModelState(parts or self.parts)})

    # --- checkpoint -------------------------------------------------------------------------------

    def components(self) -> dict:
        out = {"model": ModelState(self.parts), "rng": RNGState(self.spec.rank, seed=self.spec.seed)}
        if self.engine is not None:  # full tensors by FQN: the same keys, so it reshards to FSDP and back
            out["model"], out["optimizer"] = self._zero_states
        elif self.optimizer is not None:
            out["optimizer"] = OptimizerState(self.parts, self.optimizer)
        return out

    def _checkpointer(self, roles: tuple[str, ...], attempt: str) -> Checkpointer:
        meta = {"task": "rlhf", "role": self.role, "world_size": self.spec.world_size,
                "layout": {k: getattr(self.spec.layout, k) for k in ("pp", "dp_replicate", "dp_shard", "tp")},
                "config": {"model": plain_dict(self.spec.model)}}  # what `plait-ckpt export --role` builds
        return Checkpointer(self.spec.checkpoint_dir, keep_last=self.spec.keep_last, meta=meta,
                            group=self._ckpt_group, role=self.role, roles=roles, attempt=attempt)

    @register(Mode.ONE_TO_ALL)
    def save(self, request: dict) -> str:
        """Save this role's part of checkpoint step `request["step"]` (all roles commit it together)."""
        ckpt = self._checkpointer(tuple(request["roles"]), request["attempt"])
        path = ckpt.save(request["step"], self.components(), counters=request.get("counters"))
        ckpt.close()
        return str(path)

    @register(Mode.ONE_TO_ALL)
    def load(self, path: str) -> None:
        """Restore this role's components from a (multi-role) checkpoint step, under any layout."""
        ckpt = Checkpointer(self.spec.checkpoint_dir, group=self._ckpt_group, role=self.role)
        ckpt.load(Path(path), self.components(), role=self.role)

    @register(Mode.ONE_TO_ALL)
    def resident_bytes(self, _: Any = None) -> dict[str, int]:
        """What this rank holds for its role: parameter, gradient and optimizer-state bytes (its
        shards), and what it has moved to host memory and back while idle."""
        params = [p for part in self.parts for p in part.parameters()] if self.engine is None \
            else list(self.engine.parameters())
        return {**state_sizes(params, self.optimizer),
                "offloaded": self.offloader.moved if self.offloader is not None else 0}

    @register(Mode.ONE_TO_ALL)
    def shutdown(self, _: Any = None) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def plain_dict(cfg) -> dict:
    """A dataclass or OmegaConf node as a plain dict (JSON for a manifest)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def replace(cfg, **changes):
    """A dataclass (or OmegaConf node) copy with some fields changed."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.replace(cfg, **changes)
    copy = cfg.copy()
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy
