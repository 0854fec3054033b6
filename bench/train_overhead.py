"""Plait's single-process training step against a minimal hand-written PyTorch loop.

Same model, same batch, same optimizer and schedule; the two alternate in rounds so machine noise
hits both alike. Prints one JSON line; `ratio` = Plait step time / hand-written step time
(goal ≤ 1.05).

    .venv/bin/python bench/train_overhead.py [--steps 20] [--rounds 5] [--model llama_tiny]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F

from trainer.config import validate
from trainer.loop import LoopParts, TrainLoop
from trainer.metrics import MetricLogger
from trainer.models import build_model
from trainer.models.loss import cross_entropy_loss
from trainer.optim import build_optimizer, build_scheduler
from trainer.checkpoint.state import Progress


def plait_steps(cfg, batch, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer([model], cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    parts = LoopParts(
        model=model, parts=[model], optimizer=opt, scheduler=sched, train=itertools.repeat(batch),
        make_val=lambda: iter(()), loss_fn=cross_entropy_loss, sample_fn=None, flops_per_token=0,
        peak_flops=1, dp_group=None, checkpointer=None, components={},
    )
    log = MetricLogger("/tmp", cfg.logger, {}, 0, is_main=False)
    loop = TrainLoop(cfg, parts, torch.device("cpu"), Progress(), log, 1)
    loop.train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        loop.train_step()
    return (time.perf_counter() - start) / steps


def handwritten_steps(cfg, batch, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / o.warmup_steps))
    x, y = batch

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama_tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from hydra import compose, initialize_config_dir

    from trainer.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("plait", overrides=[f"model={args.model}", f"data.seq_len={args.seq}",
                                          f"trainer.batch_size={args.batch}", "run_dir=/tmp/plait-bench"])
    cfg = validate(raw)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=g)
    batch = (x[:, :-1].contiguous(), x[:, 1:].contiguous())
    plait, hand = [], []
    for _ in range(args.rounds):
        plait.append(plait_steps(cfg, batch, args.steps))
        hand.append(handwritten_steps(cfg, batch, args.steps))
    p, h = statistics.median(plait), statistics.median(hand)
    print(json.dumps({
        "bench": "train_overhead", "model": args.model, "batch": args.batch, "seq_len": args.seq,
        "threads": args.threads, "plait_step_s": round(p, 5), "handwritten_step_s": round(h, 5),
        "ratio": round(p / h, 4), "goal": "<= 1.05",
    }))


if __name__ == "__main__":
    main()
