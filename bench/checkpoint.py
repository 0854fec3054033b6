"""Checkpoint throughput against torch.save/torch.load, and how much of a save async hides.

Side by side in one run, same state (a llama_small model + AdamW state, ~300 MB), same disk, both
durable (Plait's DCP writer fsyncs; the baseline calls fsync). Prints one JSON line:
  save_ratio  = Plait save GB/s / (torch.save + fsync) GB/s     goal >= 0.8
  load_ratio  = Plait load GB/s (checksums verified) / torch.load GB/s   goal >= 0.8
  async_hidden = 1 - blocked(async) / blocked(sync): the share of a save's time the training loop
                 no longer waits for, one process training with one thread     goal >= 0.8
                 blocked = time the loop spends in save/poll/wait (medians over rounds)
  async_hidden_with_steps: the same with each mode's training-step slowdown against a loop
                 without saves added to both sides (on this shared VM that term is noise of
                 +-0.3 s either way, even for sync saves that leave nothing running)
  async_hidden_2ranks: the same on 2 gloo ranks (on 2 cores no core is free for the writers)

    .venv/bin/python bench/checkpoint.py [--model llama_small] [--dir runs/bench-ckpt] [--rounds 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer
from trainer.config import ModelConfig, OptimConfig
from trainer.models import build_model
from trainer.optim import build_optimizer
from trainer.checkpoint.state import ModelState, OptimizerState

SIZES = {
    "llama_small": dict(vocab_size=8192, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=1024),
}


def make_state(model_name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=model_name, **SIZES[model_name]))
    opt = build_optimizer([model], OptimConfig())
    train_step(model, opt, batch=2, seq=64)
    return model, opt


def train_step(model, opt, batch: int, seq: int) -> None:
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plait_save(model, opt, directory: Path) -> tuple[float, int]:
    shutil.rmtree(directory, ignore_errors=True)
    ck = Checkpointer(str(directory), keep_last=0)
    start = time.perf_counter()
    path = ck.save(1, {"model": ModelState([model]), "optimizer": OptimizerState([model], opt)})
    return time.perf_counter() - start, dir_bytes(path)


def plait_load(model, opt, directory: Path) -> float:
    ck = Checkpointer(str(directory))
    start = time.perf_counter()
    ck.load(ck.latest(), {"model": ModelState([model]), "optimizer": OptimizerState([model], opt)})
    return time.perf_counter() - start


def torch_save(model, opt, path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start, path.stat().st_size


def torch_load(model, opt, path: Path) -> float:
    start = time.perf_counter()
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return time.perf_counter() - start


def loop_time(model, opt, ck: Checkpointer, mode: str, steps: int, step0: int) -> tuple[list[float], float]:
    """(each training step's time, time blocked in save/poll/wait) of `steps` training steps with
    one save ("none", "sync" or "async") after the first."""
    comps = {"model": ModelState([model]), "optimizer": OptimizerState([model], opt)}
    step_times, blocked = [], 0.0
    for step in range(steps):
        t = time.perf_counter()
        train_step(model, opt, batch=4, seq=128)
        step_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        if step == 0 and mode != "none":
            ck.save(step0 + step, comps)
        ck.poll()
        blocked += time.perf_counter() - t
    t = time.perf_counter()
    ck.wait()
    return step_times, blocked + time.perf_counter() - t


def hidden_fraction(model, opt, directory: Path, steps: int, group=None, rounds: int = 3) -> dict:
    """What a save costs the loop: the time the loop is blocked in save/poll/wait, and how much
    slower its training steps ran than the same steps of the no-save loop; medians over rounds
    that run the three modes back to back. Each mode keeps one Checkpointer, as a run does, and
    everything runs once untimed first: what is measured is a run's steady state, not its first
    save's one-off set-up."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    modes = ("none", "sync", "async")
    cks = {m: Checkpointer(str(directory / m), keep_last=1, group=group, async_save=m == "async") for m in modes}
    for mode in modes:
        loop_time(model, opt, cks[mode], mode, steps, 0)
    step_times: dict[str, list[list[float]]] = {m: [] for m in modes}
    blocked: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes:
            times, held = loop_time(model, opt, cks[mode], mode, steps, 1 + r)
            step_times[mode].append(times)
            blocked[mode].append(held)
    for ck in cks.values():
        ck.close()
    med = statistics.median
    per_step = {m: [med(run[i] for run in v) for i in range(steps)] for m, v in step_times.items()}
    b = {m: med(v) for m, v in blocked.items()}
    slowdown = {m: sum(per_step[m]) - sum(per_step["none"]) for m in modes}
    exposed = {m: b[m] - b["none"] for m in ("sync", "async")}
    whole = {m: exposed[m] + slowdown[m] for m in ("sync", "async")}
    return {"hidden": max(0.0, 1 - exposed["async"] / exposed["sync"]),
            "hidden_with_steps": round(max(0.0, 1 - whole["async"] / whole["sync"]), 3),
            **{f"steps_{k}_s": round(sum(v), 3) for k, v in per_step.items()},
            **{f"blocked_{k}_s": round(v, 3) for k, v in b.items() if k != "none"},
            **{f"slowdown_{k}_s": round(slowdown[k], 3) for k in ("sync", "async")}}


def _rank(rank, port, model_name, directory, steps, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    model, opt = make_state(model_name)
    result = hidden_fraction(model, opt, Path(directory), steps, group=dist.new_group(backend="gloo"), rounds=3)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def two_rank_hidden(model_name: str, directory: Path, steps: int) -> dict:
    ctx = mp.get_context("fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, model_name, str(directory), steps, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=1200)
    for p in procs:
        p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama_small", choices=sorted(SIZES))
    ap.add_argument("--dir", default="runs/bench-checkpoint")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps in the async-hiding loop")
    ap.add_argument("--skip-ranks", action="store_true", help="skip the 2-rank async figure")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    model, opt = make_state(args.model)
    saves, loads, tsaves, tloads = [], [], [], []
    for _ in range(args.rounds):
        seconds, plait_bytes = plait_save(model, opt, root / "plait")
        saves.append(seconds)
        seconds, torch_bytes = torch_save(model, opt, root / "torch.pt")
        tsaves.append(seconds)
        loads.append(plait_load(model, opt, root / "plait"))
        tloads.append(torch_load(model, opt, root / "torch.pt"))
    gbps = lambda n, s: n / statistics.median(s) / 1e9  # noqa: E731
    result = {
        "bench": "checkpoint", "model": args.model, "bytes": plait_bytes, "torch_bytes": torch_bytes,
        "plait_save_GBps": round(gbps(plait_bytes, saves), 3), "torch_save_GBps": round(gbps(torch_bytes, tsaves), 3),
        "plait_load_GBps": round(gbps(plait_bytes, loads), 3), "torch_load_GBps": round(gbps(torch_bytes, tloads), 3),
    }
    result["save_ratio"] = round(result["plait_save_GBps"] / result["torch_save_GBps"], 3)
    result["load_ratio"] = round(result["plait_load_GBps"] / result["torch_load_GBps"], 3)
    single = hidden_fraction(model, opt, root / "loop", args.steps, rounds=args.rounds)
    result["async_hidden"] = round(single.pop("hidden"), 3)
    result["async_hidden_with_steps"] = single.pop("hidden_with_steps")
    result.update({f"single_{k}": v for k, v in single.items()})
    if not args.skip_ranks:
        ranks = two_rank_hidden(args.model, root / "loop2", args.steps)
        result["async_hidden_2ranks"] = round(ranks.pop("hidden"), 3)
        result.update({f"ranks2_{k}": v for k, v in ranks.items()})
    result["goals"] = {"save_ratio": ">= 0.8", "load_ratio": ">= 0.8", "async_hidden": ">= 0.8"}
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
