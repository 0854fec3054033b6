"""trainer/launch/nodes.py: the controller-and-services pattern of a one-task-per-node job, on
forked gloo ranks: task 0's head address reaches every task, the default group is gone after it,
the service tasks wait (no collective) until the controller is done, and a dead service stops its
task's wait."""

import os
import time
from types import SimpleNamespace

import pytest

from trainer.launch.forked import run_ranks
from trainer.launch.nodes import (JOB_PORT_BASE, JOB_PORT_SPAN, job_port, release_services, share_head,
                                  wait_for_controller)


def test_the_job_port_sits_between_rays_worker_ports_and_the_ephemeral_range():
    ports = {job_port(p) for p in range(15000, 32000)}
    assert min(ports) == JOB_PORT_BASE > 19999 and max(ports) == JOB_PORT_BASE + JOB_PORT_SPAN - 1 < 32768


def _env():
    """The two fields the pattern reads of a task's DistEnv."""
    return SimpleNamespace(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def _controller_and_services(hold_s: float) -> dict:
    import torch.distributed as dist

    env = _env()
    started = []
    address, store = share_head(env, lambda: started.append(1) or "10.0.0.1:20001", "127.0.0.1")
    out = {"address": address, "group_gone": not dist.is_initialized(), "started_head": bool(started)}
    if env.rank == 0:
        time.sleep(hold_s)  # the controller's run
        release_services(store, env.world_size - 1)
        out["left"] = store.add("left", 0)
    else:
        begin = time.monotonic()
        wait_for_controller(store, lambda: None, every=0.05)
        out["waited_s"] = time.monotonic() - begin
    return out


def test_services_wait_for_the_controller_without_a_process_group():
    outs = run_ranks(3, _controller_and_services, 1.0)
    assert all(o["address"] == "10.0.0.1:20001" and o["group_gone"] for o in outs)
    assert [o["started_head"] for o in outs] == [True, False, False]  # only task 0 starts the head
    assert outs[0]["left"] == 2 and all(o["waited_s"] >= 0.5 for o in outs[1:])


def _dead_service() -> str:
    env = _env()
    _, store = share_head(env, lambda: "head", "127.0.0.1")
    if env.rank == 0:
        time.sleep(3)
        release_services(store, 1, timeout=1)
        return "controller"

    def check():
        raise RuntimeError("this task's service exited")
    with pytest.raises(RuntimeError, match="service exited"):
        wait_for_controller(store, check, every=0.05)
    return "stopped"


def test_a_dead_service_ends_its_tasks_wait():
    assert run_ranks(2, _dead_service) == ["controller", "stopped"]
