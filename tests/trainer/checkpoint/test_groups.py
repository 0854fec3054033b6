"""A Checkpointer on a subgroup names, hashes and agrees by that group's ranks, and its own
collectives on CPU tensors never run on an NCCL group."""

import sys

import pytest
import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer, read_manifest, verify
from trainer.checkpoint.state import TensorDict

FULL = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)


def _sharded(full, group):
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    return distribute_tensor(full, DeviceMesh.from_group(group, "cpu"), [Shard(0)])


def _two_subgroups_save_apart(root, async_save):
    """Ranks {0, 1} and {2, 3} each save their own run into their own directory at once."""
    which = dist.get_rank() // 2
    # the run's own group, and one for the checkpoint's DCP collectives (a background save's)
    train = [dist.new_group([0, 1]), dist.new_group([2, 3])][which]
    group = [dist.new_group([0, 1]), dist.new_group([2, 3])][which]
    ck = Checkpointer(f"{root}/g{which}", group=group, async_save=async_save)
    ck.save(1, {"t": TensorDict({"w": _sharded(FULL + which, train)})})
    x = torch.ones(1)
    for _ in range(5):  # the run's collectives go on while the save is in flight
        dist.all_reduce(x, group=train)
        ck.poll()
    ck.close()
    return ck.rank, ck.latest().name


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpointers_on_two_subgroups_use_their_group_ranks(tmp_path, run_ranks, async_save):
    results = run_ranks(4, _two_subgroups_save_apart, str(tmp_path), async_save)
    assert results == [(0, "step_000000001"), (1, "step_000000001")] * 2
    for which in (0, 1):
        step = tmp_path / f"g{which}" / "step_000000001"
        files = read_manifest(step)["files"]
        # DCP names shards by group rank: each group's two ranks wrote __0_* and __1_*, both hashed
        assert {n.split("_")[2] for n in files if n.endswith(".distcp")} == {"0", "1"}
        assert verify(step) == []
        target = {"w": torch.zeros(8, 6)}
        Checkpointer(tmp_path / f"g{which}").load(step, {"t": TensorDict(target)})
        assert torch.equal(target["w"], FULL + which)


def _under_fake_nccl(directory, async_save, dcp_group_given):
    """To the checkpoint package the default group says it is NCCL (gloo underneath: no GPU here;
    torch's own code, which would then look for NCCL, is told the truth); every collective the
    package issues itself is recorded with the backend of its group."""
    real_backend = dist.get_backend

    def fake_backend(group=None):
        asked_by = sys._getframe(1).f_globals.get("__name__", "")
        default = group is None or group is dist.group.WORLD
        return "nccl" if default and asked_by.startswith("trainer.checkpoint") else real_backend(group)

    seen = []

    def recording(name, collective):
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("trainer.checkpoint"):
                group = kwargs.get("group")
                seen.append((name, "default (nccl)" if group in (None, dist.group.WORLD) else real_backend(group)))
            return collective(*args, **kwargs)
        return call

    dist.get_backend = fake_backend
    for name in ("all_reduce", "all_gather_object", "barrier"):
        setattr(dist, name, recording(name, getattr(dist, name)))
    group = dist.new_group(backend="gloo") if dcp_group_given else None
    ck = Checkpointer(directory, group=group, async_save=async_save)
    ck.save(1, {"t": TensorDict({"w": _sharded(FULL, dist.group.WORLD)})})
    for _ in range(3):
        ck.poll()
    ck.wait()
    target = _sharded(torch.zeros(8, 6), dist.group.WORLD)
    ck.load(ck.latest(), {"t": TensorDict({"w": target})})
    ck.close()
    return seen, bool(torch.equal(target.full_tensor(), FULL))


@pytest.mark.parametrize("async_save, dcp_group_given", [(False, False), (True, True), (True, False)])
def test_cpu_collectives_run_on_gloo_when_the_default_group_is_nccl(tmp_path, run_ranks, async_save,
                                                                    dcp_group_given):
    for seen, loaded in run_ranks(2, _under_fake_nccl, str(tmp_path), async_save, dcp_group_given):
        assert loaded
        names = {name for name, _ in seen}
        assert {"all_gather_object", "barrier", "all_reduce"} <= names  # hashes, barriers, poll/agree
        assert all(backend == "gloo" for _, backend in seen), seen
