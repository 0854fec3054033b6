"""The language-model training loop: accumulate, clip, step, evaluate, sample, checkpoint, log."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from parallel.grad import clip_grad_norm
from parallel.pipeline import Pipeline
from parallel.tensor import plain_tensor
from trainer.boundary import StepBoundary
from trainer.checkpoint import Checkpointer
from trainer.config import PlaitConfig
from trainer.metrics import MetricLogger, memory_gib
from trainer.launch.preemption import PreemptionHandler
from trainer.checkpoint.state import Progress


@dataclass
class LoopParts:
    """What a task hands the loop; `model` is what forward runs (possibly wrapped by DDP), or None
    when a pipeline runs forward and backward instead."""

    model: Optional[nn.Module]
    parts: list[nn.Module]  # the unwrapped modules whose parameters this rank owns
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: Iterator  # yields (inputs, targets); Stateful
    make_val: Callable[[], Iterator]  # a fresh, deterministic held-out iterator
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sample_fn: Optional[Callable[[int], str]]  # step -> generated text (runs on every rank)
    flops_per_token: float
    peak_flops: float
    dp_group: Optional[dist.ProcessGroup]
    checkpointer: Optional[Checkpointer]
    components: dict  # name -> Stateful, what a checkpoint holds
    pipeline: Optional[Pipeline] = None  # pp > 1: runs each batch through the stages
    pp_group: Optional[dist.ProcessGroup] = None  # ranks holding the other stages of this pipeline
    # what the loss (forward and backward) runs under, e.g. loss_parallel() for vocabulary-sharded logits
    loss_context: Callable[[], ContextManager] = contextlib.nullcontext
    preemption: Optional[PreemptionHandler] = None
    # parallel.dp_backend=deepspeed: `model` is this engine; it runs backward, the gradient
    # reduction, accumulation, clipping, and the optimizer and LR-schedule steps
    engine: Optional[nn.Module] = None


class TrainLoop:
    def __init__(self, cfg: PlaitConfig, parts: LoopParts, device: torch.device, progress: Progress,
                 logger: MetricLogger, world_size: int):
        self.cfg, self.p, self.device = cfg, parts, device
        self.progress, self.logger, self.world_size = progress, logger, world_size
        self.params = [p for part in parts.parts for p in part.parameters()]
        self.dp_size = dist.get_world_size(parts.dp_group) if parts.dp_group is not None else 1
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if cfg.trainer.precision == "bf16" and not _fsdp_wrapped(parts.parts)
            else contextlib.nullcontext()
        )

    def _mean_over_dp(self, value: torch.Tensor) -> float:
        if self.p.pp_group is not None:  # only the last stage computed it; the others hold 0
            value = value.clone()
            dist.all_reduce(value, group=self.p.pp_group)
        if self.p.dp_group is not None:
            value = value.clone()
            dist.all_reduce(value, group=self.p.dp_group)
            value /= dist.get_world_size(self.p.dp_group)
        return value.item()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm, tokens)."""
        accum = self.cfg.trainer.grad_accum
        if self.p.engine is not None:
            return self._engine_step(accum)
        self.p.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(accum):
            inputs, targets = self._next_batch()
            tokens += inputs.numel()
            if self.p.pipeline is not None:  # forward and backward of every microbatch, scheduled
                with self.p.loss_context(), self.autocast:
                    total += self.p.pipeline.step(inputs, targets, loss_scale=1 / accum)
                continue
            with _no_sync(self.p.model, last=micro == accum - 1), self.p.loss_context():
                with self.autocast:
                    loss = self.p.loss_fn(self.p.model(inputs), targets) / accum
                loss.backward()
            total += plain_tensor(loss.detach())
        norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip, self.p.pp_group)
        self.p.optimizer.step()
        self.p.scheduler.step()
        return total, norm, tokens

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = next(self.p.train)
        return inputs.to(self.device), targets.to(self.device)

    def _engine_step(self, accum: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """train_step through a DeepSpeed engine: `step()` after each micro-batch only counts until
        the last one, where it clips, steps the optimizer and the LR schedule, and zeroes grads."""
        engine = self.p.engine
        total = torch.zeros((), device=self.device)
        tokens = 0
        for _ in range(accum):
            inputs, targets = self._next_batch()
            tokens += inputs.numel()
            with self.autocast:
                loss = self.p.loss_fn(engine(inputs), targets) / accum
            engine.backward(loss, scale_wrt_gas=False)  # already divided, as above
            engine.step()
            total += loss.detach()
        return total, torch.as_tensor(engine.get_global_grad_norm(), dtype=torch.float32), tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        for part in self.p.parts:
            part.eval()
        losses = []
        val = self.p.make_val()
        for _ in range(self.cfg.trainer.eval_batches):
            try:
                inputs, targets = next(val)
            except StopIteration:
                break
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.p.loss_context(), self.autocast:
                if self.p.pipeline is not None:
                    losses.append(self.p.pipeline.eval(inputs, targets))
                else:
                    losses.append(plain_tensor(self.p.loss_fn(self.p.model(inputs), targets)))
        for part in self.p.parts:
            part.train()
        if not losses:  # no held-out split (data.val_fraction=0)
            return float("nan")
        return self._mean_over_dp(torch.stack(losses).mean())

    def eval_and_sample(self) -> dict:
        loss = self.evaluate()
        out = {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}
        self.logger.text(f"step {self.progress.step:>6}  eval loss {loss:.4f}  ppl {out['eval/ppl']:.2f}")
        if self.p.sample_fn is not None:
            text = self.p.sample_fn(self.progress.step)
            self.logger.text("sample: " + repr(text))
        return out

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        history: dict = {}
        if self.progress.step == 0 and t.max_steps > 0:
            history = self.eval_and_sample()
            history["first_eval_loss"] = history["eval/loss"]
            self.logger.log(0, history)
        boundary = StepBoundary(
            self.p.checkpointer, self.p.components, every=cfg.checkpoint.every, last=t.max_steps,
            save_final=cfg.checkpoint.save_final, log=self.logger.text, preemption=self.p.preemption,
            counters=lambda: {"samples": self.progress.samples, "tokens": self.progress.tokens})
        try:
            self._steps(boundary, history)
        finally:
            boundary.close()
        return history

    def _steps(self, boundary: StepBoundary, history: dict) -> None:
        t = self.cfg.trainer
        window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
        while self.progress.step < t.max_steps:
            loss, norm, tokens = self.train_step()
            self.progress.step += 1
            self.progress.samples += t.batch_size
            global_tokens = tokens * self.dp_size
            self.progress.tokens += global_tokens
            window_tokens += global_tokens
            window_steps += 1
            self.logger.advance()
            step = self.progress.step
            metrics: dict = {}
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / elapsed
                metrics.update({
                    "loss": self._mean_over_dp(loss),
                    "grad_norm": norm.item(),
                    "lr": self.p.scheduler.get_last_lr()[0],
                    "tok/s": tok_s,
                    "step_time": elapsed / window_steps,
                    **({"mfu": self.p.flops_per_token * tok_s / (self.world_size * self.p.peak_flops)}
                       if self.p.peak_flops is not None else {}),  # None: unknown GPU, no made-up MFU
                    "memory_gib": memory_gib(self.device),
                    "tokens": self.progress.tokens,
                })
                window_tokens, window_steps = 0, 0
            if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
                metrics.update(self.eval_and_sample())
            if metrics:
                self.logger.log(step, metrics)
                history.update(metrics)
            boundary(step)
            if window_steps == 0:  # time the next window from here: eval and saves excluded
                window_start = time.perf_counter()


def _fsdp_wrapped(parts: list[nn.Module]) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for p in parts for m in p.modules())


def _no_sync(model: nn.Module, last: bool):
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()
