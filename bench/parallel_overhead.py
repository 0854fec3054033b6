"""Plait's 3D training step against the same layout written directly with torch's APIs.

Layout pp=2 x dp_shard=2 x tp=2 on 8 gloo ranks forked from this process, interleaved 1F1B with
2 chunks per pipeline rank (4 stages), the issue's headline layout. Plait's side is its real step:
`parallelize` + `build_optimizer` + `TrainLoop.train_step` (clip, AdamW, LR schedule). The
hand-written side is a short script below: `init_device_mesh`, `parallelize_module` with the same TP
plan, `fully_shard` per block and root, `PipelineStage` + `ScheduleInterleaved1F1B` under
`loss_parallel`, AdamW, a global-norm clip, LambdaLR. Same model (`build_model`, same seed), same
per-rank batch; the variants alternate in rounds (order reversed every round) so machine noise hits
all alike. One thread per rank. Prints one JSON line:

  plait_step_s        median over rounds of (slowest rank's end - first rank's start) / steps
  handwritten_step_s  the same for the hand-written script with fully_shard's defaults
  ratio               plait_step_s / handwritten_step_s       goal <= 1.05
  spread              per variant: [min, max] of the per-round step times
  loss_*              each variant's mean loss over all its steps (same work: they should agree)
  torchtitan_style_step_s / ratio_vs_torchtitan_style: the hand-written script with
                      reshard_after_forward=False, torchtitan's choice under pipelining (parameters
                      stay gathered across a step's microbatches); reported, not the goal

With 8 ranks on 2 cores a step is dominated by how long each rank waits for a core after a message
arrives, so absolute times mean little; the ratio of medians is the figure. `--layout 2 1 2` runs
pp x tp on 4 ranks without FSDP (then the two hand-written variants are one script: their gap is
the noise); `--layers 8` puts two blocks in each chunk.

    .venv/bin/python bench/parallel_overhead.py [--rounds 7] [--steps 3] [--layout 2 2 2] [--layers 4]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import validate
from trainer.launch.forked import run_ranks


def config(pp: int, dp_shard: int, tp: int, batch: int, seq: int, microbatches: int, layers: int = 4):
    return validate({
        "model": {"n_layers": layers, "max_seq_len": seq},
        "parallel": {"pp": pp, "dp_shard": dp_shard, "tp": tp, "virtual_stages": 2,
                     "schedule": "interleaved_1f1b", "microbatches": microbatches},
        "trainer": {"batch_size": batch}, "data": {"seq_len": seq},
    }, world_size=pp * dp_shard * tp)


def local_batch(cfg, dp_rank: int):
    """This data-parallel rank's share of one fixed global batch (tp and pp peers get the same)."""
    local = cfg.trainer.batch_size // cfg.parallel.dp_shard
    rows = torch.randint(0, cfg.model.vocab_size, (cfg.trainer.batch_size, cfg.data.seq_len + 1),
                         generator=torch.Generator().manual_seed(0))[dp_rank * local:(dp_rank + 1) * local]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def plait_step(cfg):
    """Plait's own composition and loop step, as `trainer.pretrain.run` builds them."""
    from parallel.mesh import build_mesh, dp_coords
    from parallel.parallelize import parallelize
    from parallel.tensor import tp_loss_context
    from trainer.loop import LoopParts, TrainLoop
    from trainer.models import build_model
    from trainer.models.loss import cross_entropy_loss
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.pretrain import parallel_dims
    from trainer.checkpoint.state import Progress

    dims = parallel_dims(cfg)
    mesh = build_mesh(dims, "cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    model, parts, pipeline = parallelize(model, mesh, cfg.parallel, cfg.trainer.precision,
                                         loss_fn=cross_entropy_loss)
    optimizer = build_optimizer(parts, cfg.optim)
    loop = TrainLoop(
        cfg,
        LoopParts(
            model=model, parts=parts, optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps),
            train=itertools.repeat(local_batch(cfg, dp_coords(mesh)[0])), make_val=lambda: iter(()),
            loss_fn=cross_entropy_loss, sample_fn=None, flops_per_token=1.0, peak_flops=1.0,
            dp_group=mesh["dp"].get_group(), checkpointer=None, components={}, pipeline=pipeline,
            pp_group=mesh["pp"].get_group(), loss_context=lambda: tp_loss_context(dims.tp > 1),
        ),
        torch.device("cpu"), Progress(), None, dims.world_size,
    )
    return lambda: loop.train_step()[0]


def handwritten_step(cfg, reshard_after_forward: bool = True):
    """The same layout in plain torch: what a user would write without Plait."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                                   parallelize_module)

    from trainer.models import build_model

    p, o = cfg.parallel, cfg.optim
    mesh = init_device_mesh("cpu", (p.pp, p.dp_shard, p.tp), mesh_dim_names=("pp", "dp_shard", "tp"))
    pp_rank, n_stages = mesh["pp"].get_local_rank(), p.pp * p.virtual_stages
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    per_stage = cfg.model.n_layers // n_stages
    parts, stages = [], []
    for stage_idx in range(pp_rank, n_stages, p.pp):  # Megatron's interleaved assignment
        part = copy.deepcopy(model)
        for i in range(cfg.model.n_layers):
            if i // per_stage != stage_idx:
                del part.layers[str(i)]
        if stage_idx != 0:
            part.tok_embeddings = None
        if stage_idx != n_stages - 1:
            part.norm, part.output = None, None
        tp = mesh["tp"]
        if part.tok_embeddings is not None:
            parallelize_module(part, tp, {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(),
                                                                            output_layouts=Replicate())})
        if part.output is not None:
            parallelize_module(part, tp, {"output": ColwiseParallel(output_layouts=Shard(-1),
                                                                    use_local_output=False)})
        for block in part.layers.values():
            parallelize_module(block, tp, {
                "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
            })
            if p.dp_shard > 1:
                fully_shard(block, mesh=mesh["dp_shard"], reshard_after_forward=reshard_after_forward)
        if p.dp_shard > 1:
            fully_shard(part, mesh=mesh["dp_shard"], reshard_after_forward=reshard_after_forward)
        parts.append(part)
        stages.append(PipelineStage(part, stage_idx, n_stages, torch.device("cpu"),
                                    group=mesh["pp"].get_group()))

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())

    schedule = ScheduleInterleaved1F1B(stages, n_microbatches=p.microbatches, loss_fn=loss_fn)
    params = [q for part in parts for q in part.parameters()]
    optimizer = torch.optim.AdamW([
        {"params": [q for q in params if q.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0},
    ], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / o.warmup_steps))
    by_mesh: dict = {}  # clip_grad_norm_ refuses DTensors on different meshes (FSDP-only vs FSDP x TP)
    for q in params:
        by_mesh.setdefault(q.device_mesh if isinstance(q, DTensor) else None, []).append(q)
    x, y = local_batch(cfg, mesh["dp_shard"].get_local_rank())
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = []
        with loss_parallel():
            schedule.step(*((x,) if first else ()), **({"target": y, "losses": losses} if last else {}))
        sq = torch.zeros(())
        for group in by_mesh.values():
            norm = torch.nn.utils.get_total_norm([q.grad for q in group if q.grad is not None])
            sq += (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
        dist.all_reduce(sq, group=mesh["pp"].get_group())
        norm = sq.sqrt()
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, o.grad_clip, norm)
        optimizer.step()
        scheduler.step()
        loss = torch.stack([q.full_tensor() if isinstance(q, DTensor) else q for q in losses]).mean() \
            if last else torch.zeros(())
        return loss.detach()

    return step


VARIANTS = {
    "plait": plait_step,
    "handwritten": handwritten_step,
    "torchtitan_style": lambda cfg: handwritten_step(cfg, reshard_after_forward=False),
}


def rank_bench(cfg, rounds: int, steps: int) -> dict:
    steppers = {name: build(cfg) for name, build in VARIANTS.items()}
    names = list(steppers)
    times: dict = {n: [] for n in names}
    losses: dict = {n: [] for n in names}
    for name in names:  # warm-up: the schedules' shape inference, lazy FSDP init
        steppers[name]()
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            dist.barrier()
            start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the ranks' processes
            for _ in range(steps):
                losses[name].append(steppers[name]().item())
            times[name].append((start, time.perf_counter()))
    return {"times": times, "losses": losses}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", type=int, nargs=3, default=[2, 2, 2], metavar=("PP", "DP_SHARD", "TP"))
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4, help="llama_tiny's 4, one per pipeline chunk")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pp, dp_shard, tp = args.layout
    cfg = config(pp, dp_shard, tp, args.batch, args.seq, args.microbatches, args.layers)
    ranks = run_ranks(pp * dp_shard * tp, rank_bench, cfg, args.rounds, args.steps)
    per_round = {
        name: [(max(r["times"][name][i][1] for r in ranks) - min(r["times"][name][i][0] for r in ranks))
               / args.steps for i in range(args.rounds)]
        for name in VARIANTS
    }
    med = {name: statistics.median(v) for name, v in per_round.items()}
    # the last pipeline stage's ranks hold the loss; the others report 0
    loss = {name: statistics.mean(max(r["losses"][name][i] for r in ranks)
                                  for i in range(len(ranks[0]["losses"][name]))) for name in VARIANTS}
    print(json.dumps({
        "bench": "parallel_overhead", "layout": {"pp": pp, "dp_shard": dp_shard, "tp": tp},
        "ranks": pp * dp_shard * tp, "schedule": "interleaved_1f1b", "virtual_stages": 2,
        "microbatches": args.microbatches, "model": cfg.model.name, "n_layers": cfg.model.n_layers,
        "dim": cfg.model.dim, "batch": args.batch, "seq_len": args.seq, "rounds": args.rounds,
        "steps": args.steps,
        "plait_step_s": round(med["plait"], 4), "handwritten_step_s": round(med["handwritten"], 4),
        "ratio": round(med["plait"] / med["handwritten"], 4), "goal": "<= 1.05",
        "torchtitan_style_step_s": round(med["torchtitan_style"], 4),
        "ratio_vs_torchtitan_style": round(med["plait"] / med["torchtitan_style"], 4),
        "spread": {name: [round(min(v), 4), round(max(v), 4)] for name, v in per_round.items()},
        **{f"loss_{name}": round(v, 6) for name, v in loss.items()},
    }))


if __name__ == "__main__":
    main()
