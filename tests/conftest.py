"""Shared test fixtures: forked gloo ranks, offline W&B/HF, a private cache directory."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: on 2 shared cores tiny models run faster, and forked ranks never inherit a busy pool.
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args, init_pg, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if init_pg:
            dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        queue.put((rank, True, fn(*args)))
    except BaseException:  # report everything, SystemExit included
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, init_pg: bool = True, timeout: float = 300.0) -> list:
    """Run fn(*args) on `world` forked gloo ranks; returns each rank's result, rank order.

    Forking from this already-imported parent brings a group up in well under a second (spawn
    would re-import torch in every rank)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, init_pg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:  # the others would wait in a collective until the timeout: stop them now
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=0.1 if errors else 10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


@pytest.fixture(name="run_ranks")
def run_ranks_fixture():
    return run_ranks


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tokenizer/token caches shared by the session's tests, never the user's ~/.cache."""
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path_factory.getbasetemp() / "plait-cache"))
