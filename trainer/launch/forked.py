"""Run a function on N local ranks forked from this process (tests, benchmarks, notebooks).

Forking from a parent that already imported torch brings a gloo group up in well under a second
(spawning would re-import torch in every rank); each rank uses one thread, since a fork after the
parent used its thread pool can hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from datetime import timedelta

import torch


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (`host` "": on every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
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
        # plain pickle copies tensors by value: the queue's own pickler would pass their storage as a
        # file descriptor served by this process, which may have exited before the parent reads it
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # report everything, SystemExit included
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, init_pg: bool = True, timeout: float = 1800.0) -> list:
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
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=0.1 if errors else 10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
