"""One step saved by several roles, each its own process group: one manifest, one `latest` that
moves only when every role is done, loadable under another split of ranks and in one process, and
atomic under SIGKILL of a role at any stage of its save."""

import multiprocessing as mp
import os
import signal
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from plait_testing import free_port
from trainer.checkpoint import Checkpointer, CheckpointError, read_manifest, verify
from trainer.checkpoint.state import Progress, TensorDict

ROLES = ("actor", "critic")


def full(role: str, step: int) -> dict[str, torch.Tensor]:
    """The tensors a role holds at a step (both roles call their component `model`)."""
    base = 100.0 * step
    if role == "actor":
        return {"w": torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4) + base, "b": torch.arange(3.0) + base}
    return {"v": torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6) - base}


def placed(tensors: dict, group, dim: int) -> dict:
    """Shard the 2-D tensors over `group` along `dim` (a group of one keeps them whole)."""
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    if group is None or dist.get_world_size(group) == 1:
        return {k: v.clone() for k, v in tensors.items()}
    mesh = DeviceMesh.from_group(group, "cpu")
    return {k: distribute_tensor(v, mesh, [Shard(dim)]) if v.dim() == 2 else v.clone() for k, v in tensors.items()}


def whole(tensors: dict) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in tensors.items()}


def components(role: str, step: int, group, dim: int = 0) -> dict:
    return {"model": TensorDict(placed(full(role, step), group, dim)), "progress": Progress(step=step)}


def _save_as_two_groups(directory, async_save):
    which = dist.get_rank() // 2
    role = ROLES[which]
    # the role's own group (its tensors are sharded over it), and one for the checkpoint's DCP
    # collectives, which an async save runs in the background
    train = [dist.new_group([0, 1]), dist.new_group([2, 3])][which]
    group = [dist.new_group([0, 1]), dist.new_group([2, 3])][which]
    ck = Checkpointer(directory, role=role, roles=ROLES, group=group, async_save=async_save, attempt="one",
                      meta={"task": "rlhf", "layout": {"dp_shard": 2}})
    for step in (1, 2):
        ck.save(step, components(role, step, train, dim=0 if role == "actor" else 1))
        ck.poll()
    ck.close()
    return ck.rank


def _load_as_2_1_1(directory):
    """Ranks {0, 1} load the critic sharded the other way, rank 2 the actor whole, rank 3 the critic."""
    groups = [dist.new_group([0, 1]), dist.new_group([2]), dist.new_group([3])]
    rank = dist.get_rank()
    group, role = {0: (groups[0], "critic"), 1: (groups[0], "critic"), 2: (groups[1], "actor"),
                   3: (groups[2], "critic")}[rank]
    ck = Checkpointer(directory, role=role, roles=ROLES, group=group)
    target = components(role, 0, group, dim=0)
    manifest = ck.load(ck.latest(), target)
    return role, whole(target["model"].tensors), target["progress"].step, manifest["counters"]["step"]


@pytest.mark.parametrize("async_save", [False, True])
def test_two_groups_save_one_step_that_loads_under_another_split_and_in_one_process(tmp_path, run_ranks,
                                                                                   async_save):
    assert run_ranks(4, _save_as_two_groups, str(tmp_path), async_save) == [0, 1, 0, 1]
    ck = Checkpointer(tmp_path)
    assert [p.name for p in ck.list()] == ["step_000000001", "step_000000002"]
    latest = ck.latest()
    assert latest.name == "step_000000002" and verify(latest) == []
    manifest = read_manifest(latest)
    assert sorted(manifest["roles"]) == ["actor", "critic"] and manifest["format_version"] == 2
    assert set(manifest["components"]) == {"actor/model", "actor/progress", "critic/model", "critic/progress"}
    assert manifest["components"]["critic/model"]["world_size"] == 2
    assert manifest["components"]["actor/model"]["layout"] == {"dp_shard": 2} and manifest["task"] == "rlhf"
    assert {n.split("/")[0] for n in manifest["files"]} == {"actor", "critic"}  # each role its own directory
    assert {n for n in manifest["files"] if n.endswith(".distcp")} >= {"actor/__0_0.distcp", "actor/__1_0.distcp",
                                                                        "critic/__0_0.distcp", "critic/__1_0.distcp"}
    for role, tensors, progress_step, step in run_ranks(4, _load_as_2_1_1, str(tmp_path)):
        assert progress_step == step == 2
        assert tensors.keys() == full(role, 2).keys()
        assert all(torch.equal(tensors[k], v) for k, v in full(role, 2).items()), role
    for role in ROLES:  # one process, no process group
        target = components(role, 0, None)
        Checkpointer(tmp_path).load(tmp_path, target, role=role)
        assert all(torch.equal(target["model"].tensors[k], v) for k, v in full(role, 2).items())
    with pytest.raises(CheckpointError, match="say which role"):
        Checkpointer(tmp_path).load(latest, components("actor", 0, None))
    with pytest.raises(CheckpointError, match="no role 'reward'; it holds roles actor, critic"):
        Checkpointer(tmp_path).load(latest, components("actor", 0, None), role="reward")


# ---- SIGKILL of one role mid-save: each role is its own 2-rank world, forked here ----------------

def _role_rank(rank, port, directory, role, steps, attempt, hang_at, started, done, queue):
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        if hang_at is not None:  # this rank stops at that point of its last save, until killed
            import trainer.checkpoint.checkpointer as ck_mod

            real = {"writing": ck_mod.dcp.FileSystemWriter.write_data, "recording": ck_mod.write_part,
                    "publishing": ck_mod.try_commit}

            def hang(*args, **kwargs):
                if ck_mod_step[0] == steps[-1]:
                    started.set()
                    time.sleep(600)
                return real[hang_at](*args, **kwargs)

            if hang_at == "writing":
                ck_mod.dcp.FileSystemWriter.write_data = hang
            elif hang_at == "recording":
                ck_mod.write_part = hang
            else:
                import trainer.checkpoint.commit as commit_mod

                real["publishing"] = commit_mod.publish
                commit_mod.publish = hang
        ck_mod_step = [None]
        ck = Checkpointer(directory, role=role, roles=ROLES, attempt=attempt)
        for step in steps:
            ck_mod_step[0] = step
            if step == steps[-1] and done is not None:
                done.wait(60)  # the other role has finished this step: this one saves it last
            ck.save(step, components(role, step, dist.group.WORLD))
        queue.put((role, rank, True, None))
    except BaseException:
        queue.put((role, rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def start_role(ctx, directory, role, steps, attempt, queue, hang_at=None, started=None, done=None):
    port = free_port()
    procs = [ctx.Process(target=_role_rank, args=(r, port, str(directory), role, steps, attempt,
                                                  hang_at, started, done, queue)) for r in range(2)]
    for p in procs:
        p.start()
    return procs


def finish(procs, queue, n):
    results = [queue.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(30)
    failed = [r[3] for r in results if not r[2]]
    assert not failed, "\n".join(failed)


def assert_loads_step(directory, step):
    ck = Checkpointer(directory)
    assert ck.latest().name == f"step_{step:09d}" and verify(ck.latest()) == []
    for role in ROLES:
        target = components(role, 0, None)
        Checkpointer(directory).load(ck.latest(), target, role=role)
        assert target["progress"].step == step
        assert all(torch.equal(target["model"].tensors[k], v) for k, v in full(role, step).items()), role


@pytest.mark.parametrize("hang_at", ["writing", "recording", "publishing"])
def test_sigkill_of_one_role_mid_save_leaves_the_previous_step_loadable(tmp_path, hang_at):
    """The actor saves steps 1 and 2; the critic saves step 1, then, after the actor has finished
    step 2, is SIGKILLed while writing its shards, before recording that it is done, or (as the
    role that completes the step) after claiming the step but before publishing it."""
    ctx = mp.get_context("fork")
    queue, started, actor_done = ctx.Queue(), ctx.Event(), ctx.Event()
    actor = start_role(ctx, tmp_path, "actor", (1, 2), "first", queue)
    critic = start_role(ctx, tmp_path, "critic", (1, 2), "first", queue, hang_at, started, actor_done)
    finish(actor, queue, 2)
    actor_done.set()
    assert started.wait(120)
    for p in critic:
        os.kill(p.pid, signal.SIGKILL)
    for p in critic:
        p.join(30)
    assert_loads_step(tmp_path, 1)
    assert [p.name for p in Checkpointer(tmp_path).list()] == ["step_000000001"]
    # the next attempt of the run saves step 2 again, from both roles, and it completes
    queue = ctx.Queue()
    procs = start_role(ctx, tmp_path, "actor", (2,), "second", queue)
    procs += start_role(ctx, tmp_path, "critic", (2,), "second", queue)
    finish(procs, queue, 4)
    assert_loads_step(tmp_path, 2)


def test_a_record_left_by_a_crashed_attempt_never_completes_a_step(tmp_path):
    """Attempt one: the critic records step 2, the actor dies before it does. Attempt two: the
    actor saves step 2 first; the critic's old record must not complete it with old tensors."""
    ctx = mp.get_context("fork")
    queue, started = ctx.Queue(), ctx.Event()
    critic = start_role(ctx, tmp_path, "critic", (1, 2), "first", queue)
    actor = start_role(ctx, tmp_path, "actor", (1, 2), "first", queue, "recording", started)
    finish(critic, queue, 2)
    assert started.wait(120)
    for p in actor:
        os.kill(p.pid, signal.SIGKILL)
    for p in actor:
        p.join(30)
    assert (tmp_path / ".tmp-step_000000002" / "critic.part.json").exists()
    queue = ctx.Queue()
    finish(start_role(ctx, tmp_path, "actor", (2,), "second", queue), queue, 2)
    assert_loads_step(tmp_path, 1)  # the actor alone (with a stale critic record) completes nothing
    finish(start_role(ctx, tmp_path, "critic", (2,), "second", queue), queue, 2)
    assert_loads_step(tmp_path, 2)
