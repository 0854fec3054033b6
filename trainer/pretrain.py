"""Task `pretrain`: a Llama-style decoder trained on a text corpus, on any parallel layout.

The composing step only: mesh → model → parallelize → optimizer → data → checkpoint → loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from parallel.mesh import ParallelDims, build_mesh, dp_coords
from parallel.parallelize import parallelize
from parallel.tensor import FullLogits, tp_loss_context
from trainer.checkpoint import Checkpointer
from trainer.config import PlaitConfig, as_dict
from trainer.data import DataBundle, build_data
from trainer.launch.distributed import DistEnv
from trainer.loop import LoopParts, TrainLoop
from trainer.metrics import MetricLogger, peak_flops
from trainer.models import build_model
from trainer.models.llama import flops_per_token, generate, num_params
from trainer.models.loss import cross_entropy_loss
from trainer.optim import build_optimizer, build_scheduler
from trainer.launch.preemption import PreemptionHandler
from trainer.checkpoint.state import ModelState, OptimizerState, Progress, RNGState

DataFn = Callable[[PlaitConfig, DistEnv, int, int], tuple[DataBundle, str, int]]


def parallel_dims(cfg: PlaitConfig) -> ParallelDims:
    p = cfg.parallel
    return ParallelDims(pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)


def make_sampler(cfg: PlaitConfig, model, tokenizer, device):
    """Sampling runs on every rank (sharded weights and logits are gathered collectively) with the
    same dedicated generator, so ranks stay in lockstep and the global RNG is untouched."""
    if cfg.parallel.pp > 1:  # generation through pipeline stages is not implemented
        return None
    if cfg.parallel.tp > 1:
        model = FullLogits(model, pad_to=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
    prompt = torch.tensor([tokenizer.encode(cfg.trainer.sample_prompt).ids], device=device)

    def sample(step: int) -> str:
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        model.eval()
        out = generate(model, prompt, cfg.trainer.sample_tokens, temperature=0.8, top_k=40, generator=gen)
        model.train()
        return tokenizer.decode(out[0].tolist())

    return sample if cfg.trainer.sample_tokens > 0 else None


def corpus_data(cfg: PlaitConfig, env: DistEnv, dp_rank: int, dp_size: int) -> tuple[DataBundle, str, int]:
    """Pretraining's data: the corpus packed into sequences of data.seq_len (trainer/data)."""
    data = build_data(
        cfg.data, cfg.model.vocab_size,
        batch_size=cfg.trainer.batch_size // (dp_size * cfg.trainer.grad_accum),
        dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed, is_main=env.is_main,
        barrier=dist.barrier if dist.is_initialized() else None,
    )
    tokens = "streamed" if data.num_tokens is None else f"{data.num_tokens:,} tokens"
    return data, f"data {cfg.data.source}: {tokens}", cfg.data.seq_len


def run(cfg: PlaitConfig, env: DistEnv, data_fn: DataFn = corpus_data,
        finish: Optional[Callable[[torch.nn.Module, DataBundle], dict]] = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_loss) -> dict:
    """Train a decoder on `data_fn`'s batches (default: the pretraining corpus; task=sft passes its
    prompt/response pairs): `data_fn(cfg, env, dp_rank, dp_size) -> (DataBundle, description, seq_len)`.
    `finish(model, data)`, run on every rank after training, adds its metrics to the summary;
    `loss_fn(outputs, targets)` is the objective (task=rm: Bradley–Terry on a value head)."""
    dims = parallel_dims(cfg)
    mesh = build_mesh(dims, env.device.type)
    dp_rank, dp_size = dp_coords(mesh)
    log = MetricLogger(cfg.run_dir, cfg.logger, as_dict(cfg), cfg.trainer.max_steps, is_main=env.is_main)

    # built on the meta device: each rank allocates and initialises only its own shards
    model = build_model(cfg.model, device="meta")
    n_params = num_params(model)
    model, parts, pipeline = parallelize(model, mesh, cfg.parallel, cfg.trainer.precision,
                                         loss_fn=loss_fn, device=env.device, seed=cfg.seed)
    optimizer = build_optimizer(parts, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    model_state, optimizer_state = ModelState(parts), OptimizerState(parts, optimizer)
    engine = None
    if cfg.parallel.dp_backend == "deepspeed" and dims.dp > 1:  # ZeRO takes model and optimizer together
        from parallel.deepspeed_zero import apply_deepspeed

        engine, model_state, optimizer_state = apply_deepspeed(
            model, optimizer, scheduler, mesh["dp"], cfg.parallel.zero_stage,
            micro_batch_size=cfg.trainer.batch_size // (dims.dp * cfg.trainer.grad_accum),
            grad_accum=cfg.trainer.grad_accum, grad_clip=cfg.optim.grad_clip,
            bf16_autocast=cfg.trainer.precision == "bf16",
        )
        model = engine  # forward runs through it

    start = time.perf_counter()
    data, described, seq_len = data_fn(cfg, env, dp_rank, dp_size)
    log.text(
        f"plait: {cfg.model.name} ({n_params / 1e6:.2f}M params) on {env.world_size} rank(s) "
        f"[pp={dims.pp} dp_replicate={dims.dp_replicate} dp_shard={dims.dp_shard} tp={dims.tp}], "
        f"{env.device.type}; {described} (ready in {time.perf_counter() - start:.1f}s)"
    )

    if dims.pp > 1 and cfg.trainer.sample_tokens > 0:
        log.text("sampling skipped: generation through pipeline stages is not supported (parallel.pp > 1)")

    if env.is_main:  # beside the checkpoints, so an export can ship the tokenizer with the weights
        data.tokenizer.save(str(Path(cfg.run_dir) / "tokenizer.json"))
    progress = Progress()
    rng = RNGState(env.rank, seed=cfg.seed)
    components = {
        "model": model_state, "optimizer": optimizer_state,
        "lr_scheduler": scheduler, "data": data.train, "rng": rng, "progress": progress,
    }
    # Checkpoint collectives get their own group: sharing the training loop's can deadlock.
    group = dist.new_group(backend="gloo") if dist.is_initialized() else None
    checkpointer = Checkpointer(
        cfg.checkpoint.dir, cfg.checkpoint.keep_last, group=group, async_save=cfg.checkpoint.async_save,
        meta={"task": cfg.task.name, "config": as_dict(cfg), "world_size": env.world_size,
              "layout": {"pp": dims.pp, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard,
                         "tp": dims.tp}},
    )
    resume = checkpointer.resolve(cfg.checkpoint.resume)
    if resume is None and cfg.checkpoint.init_from:
        checkpointer.load(cfg.checkpoint.init_from, {"model": components["model"]})
        log.text(f"model weights from {cfg.checkpoint.init_from}")
    if resume is not None:
        manifest = checkpointer.load(resume, components)
        log.text(f"resumed from {resume} at step {manifest['counters']['step']}")
        log.advance(progress.step)

    loop = TrainLoop(
        cfg,
        LoopParts(
            model=model, parts=parts, optimizer=optimizer, scheduler=scheduler, train=data.train,
            make_val=data.val, loss_fn=loss_fn,
            sample_fn=make_sampler(cfg, parts[0], data.tokenizer, env.device),
            flops_per_token=flops_per_token(cfg.model, seq_len),
            peak_flops=peak_flops(env.device, cfg.trainer.peak_flops),
            dp_group=mesh["dp"].get_group() if mesh is not None else None,
            pipeline=pipeline, pp_group=mesh["pp"].get_group() if dims.pp > 1 else None,
            loss_context=lambda: tp_loss_context(dims.tp > 1),
            checkpointer=checkpointer, components=components, preemption=PreemptionHandler(), engine=engine,
        ),
        env.device, progress, log, env.world_size,
    )
    try:
        history = loop.fit()  # its step boundary restores the signal handlers
        if finish is not None and pipeline is None:
            history.update(finish(parts[0], data))
    finally:
        log.close()
    if env.is_main and "eval/loss" in history:
        first = history.get("first_eval_loss")
        print(f"plait: done at step {progress.step}: eval loss "
              f"{'' if first is None else f'{first:.4f} -> '}{history['eval/loss']:.4f}; run dir {cfg.run_dir}",
              flush=True)
    return history
