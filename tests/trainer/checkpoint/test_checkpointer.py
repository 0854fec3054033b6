"""The checkpoint format's guarantees: atomic under SIGKILL, refused when damaged, async saves that
ignore later mutation, exact multi-rank resume, and resharding to a single process."""

import json
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from plait_testing import logged as losses
from trainer.checkpoint import MANIFEST, Checkpointer, CheckpointError, read_manifest, verify
from trainer.launch.rank import run_rank
from trainer.checkpoint.state import ModelState, OptimizerState, Progress


def model_at(step: int, width: int = 256) -> nn.Module:
    """A model whose weights say which step saved them."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(step)
    return m


def state(m, step=0):
    return {"model": ModelState([m]), "progress": Progress(step=step)}


def _saver(directory, ready):
    torch.set_num_threads(1)
    ck = Checkpointer(directory, keep_last=2)
    ck.save(1, state(model_at(1, 512), 1))
    ready.set()
    step = 2
    while True:
        ck.save(step, state(model_at(step, 512), step))
        step += 1


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    ctx = mp.get_context("fork")
    start = time.perf_counter()
    Checkpointer(tmp_path / "probe").save(1, state(model_at(1, 512)))
    save_s = time.perf_counter() - start
    for i, delay in enumerate([0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 1.7, 2.9]):
        directory = tmp_path / f"run{i}"
        ready = ctx.Event()
        child = ctx.Process(target=_saver, args=(directory, ready))
        child.start()
        assert ready.wait(60)
        time.sleep(delay * save_s)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        ck = Checkpointer(directory)
        latest = ck.latest()
        assert latest is not None
        for step_dir in ck.list():
            assert verify(step_dir) == [], step_dir
        step = read_manifest(latest)["counters"]["step"]
        fresh, progress = model_at(0, 512), Progress()
        ck.load(latest, {"model": ModelState([fresh]), "progress": progress})
        assert progress.step == step
        for a, b in zip(fresh.parameters(), model_at(step, 512).parameters()):
            assert torch.equal(a, b)


def test_a_crash_leftovers_go_at_the_first_save_and_old_checkpoints_in_the_background(tmp_path):
    (tmp_path / ".tmp-step_000000009").mkdir(parents=True)  # a save killed mid-write
    (tmp_path / ".trash-step_000000001-1").mkdir()  # a delete killed midway
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save(1, state(model_at(1), 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000001"]
    # from now on a .trash-* is the background deleter's: a save neither waits for it nor races it
    busy = tmp_path / ".trash-step_000000000-2"
    busy.mkdir()
    ck.save(2, state(model_at(2), 2))
    assert busy.exists()
    ck.close()  # the deleter finishes what it was given: step 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "latest", "step_000000002"]
    Checkpointer(tmp_path).save(3, state(model_at(3), 3))  # the next run sweeps it
    assert not busy.exists()


@pytest.fixture
def saved(tmp_path):
    ck = Checkpointer(tmp_path / "ckpt")
    return ck, ck.save(3, state(model_at(3), 3))


def _damage_largest_shard(path, how):
    shard = max((f for f in path.iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard.name


@pytest.mark.parametrize("how, words", [("truncate", ["truncated"]), ("flip", ["checksum mismatch"])])
def test_damaged_shard_is_refused_before_any_state_changes(saved, how, words):
    ck, path = saved
    name = _damage_largest_shard(path, how)
    target = model_at(0)
    before = [p.clone() for p in target.parameters()]
    with pytest.raises(CheckpointError) as err:
        ck.load(path, state(target))
    assert name in str(err.value) and all(w in str(err.value) for w in words)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))


def test_unknown_version_missing_manifest_and_wrong_shapes_are_refused(saved):
    ck, path = saved
    with pytest.raises(CheckpointError, match="does not fit this run's state"):
        ck.load(path, state(nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 256))))
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        ck.load(path, state(model_at(0)))
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not a complete Plait checkpoint"):
        ck.load(path, state(model_at(0)))
    with pytest.raises(CheckpointError, match="has no component"):
        Checkpointer(path.parent).load(Checkpointer(path.parent).save(4, state(model_at(4))),
                                       {"optimizer": OptimizerState([model_at(0)], torch.optim.SGD(model_at(0).parameters(), 0.1))})


def test_async_save_is_not_changed_by_later_mutation(tmp_path):
    ck = Checkpointer(tmp_path, async_save=True)
    m = model_at(5)
    path = ck.save(5, state(m, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-3.0)
    ck.wait()
    fresh = model_at(0)
    ck.load(path, state(fresh))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model_at(5).parameters()))
    assert ck.latest() == path


def _async_two_ranks(directory):
    group = dist.new_group(backend="gloo")
    ck = Checkpointer(directory, async_save=True, group=group)
    m = model_at(7)
    ck.save(7, state(m, 7))
    x = torch.ones(4)
    for _ in range(20):  # the training loop's collectives go on while the save is written
        dist.all_reduce(x)
        ck.poll()
    ck.wait()
    return ck.latest().name


def test_async_saves_reusing_staging_buffers_each_keep_their_own_state(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=0, async_save=True)
    m = model_at(1)
    expected = {}
    for step in (1, 2, 3):  # each save refills the previous one's staging buffers
        expected[step] = [p.detach().clone() for p in m.parameters()]
        ck.save(step, state(m, step))
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(-2.0).add_(1.0)
    ck.close()
    for step, params in expected.items():
        fresh = model_at(0)
        ck.load(tmp_path / f"step_{step:09d}", state(fresh))
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), params)), step


def test_async_save_on_two_ranks_uses_its_own_group(tmp_path, run_ranks):
    assert run_ranks(2, _async_two_ranks, str(tmp_path)) == ["step_000000007"] * 2
    fresh = model_at(0)
    Checkpointer(tmp_path).load(tmp_path / "step_000000007", state(fresh))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model_at(7).parameters()))


def test_two_rank_resume_is_bitwise_and_reshards_to_one_process(tiny_cfg, tmp_path, run_ranks):
    whole, part = tmp_path / "whole", tmp_path / "part"
    layout = ["parallel.dp_shard=2", "trainer.max_steps=4"]
    run_ranks(2, run_rank, tiny_cfg(*layout, run_dir=whole), init_pg=False)
    run_ranks(2, run_rank, tiny_cfg(*layout, "checkpoint.every=2", "checkpoint.save_final=false",
                                    run_dir=part), init_pg=False)
    (part / "metrics.jsonl").write_text("")
    step2 = part / "checkpoints" / "step_000000002"
    run_ranks(2, run_rank, tiny_cfg(*layout, f"checkpoint.resume={step2}", run_dir=part), init_pg=False)
    assert losses(part) == {3: losses(whole)[3], 4: losses(whole)[4]}
    # The same checkpoint, loaded by one process without a process group, continues too.
    single = tmp_path / "single"
    run_rank(tiny_cfg("trainer.max_steps=4", f"checkpoint.resume={step2}", run_dir=single))
    assert losses(single)[3] == pytest.approx(losses(whole)[3], rel=1e-5)


def _full_state(cfg_dict, step_dir, out=None):
    """Load model + optimizer from a checkpoint under this process's layout; full tensors, returned
    or (from ranks, big for a queue) saved to `out` by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from parallel.mesh import build_mesh
    from parallel.parallelize import parallelize
    from trainer.config import validate
    from trainer.models import build_model
    from trainer.optim import build_optimizer
    from trainer.pretrain import parallel_dims

    cfg = validate(cfg_dict)
    mesh = build_mesh(parallel_dims(cfg), "cpu")
    parts = parallelize(build_model(cfg.model), mesh, cfg.parallel)[1]
    opt = build_optimizer(parts, cfg.optim)
    Checkpointer(cfg.checkpoint.dir).load(step_dir, {"model": ModelState(parts), "optimizer": OptimizerState(parts, opt)})
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    result = get_model_state_dict(parts[0], options=full), get_optimizer_state_dict(parts[0], opt, options=full)
    if out is None:
        return result
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(result, out)


def test_every_model_and_optimizer_tensor_equal_across_layouts(tiny_cfg, tmp_path, run_ranks):
    run = tmp_path / "dp2"
    run_ranks(2, run_rank, tiny_cfg("parallel.dp_shard=2", "trainer.max_steps=2", run_dir=run), init_pg=False)
    step = run / "checkpoints" / "step_000000002"
    run_ranks(2, _full_state, tiny_cfg("parallel.dp_shard=2", run_dir=tmp_path / "a"), step, tmp_path / "a.pt")
    sharded = torch.load(tmp_path / "a.pt")
    single = _full_state(tiny_cfg(run_dir=tmp_path / "b"), step)
    model_a, optim_a = sharded
    model_b, optim_b = single
    assert model_a.keys() == model_b.keys() and len(model_a) > 10
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert optim_a["state"].keys() == optim_b["state"].keys()
    for fqn, entry in optim_a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, optim_b["state"][fqn][name]), (fqn, name)
    assert any(float(e["exp_avg"].abs().sum()) > 0 for e in optim_b["state"].values())


def test_a_one_process_checkpoint_resumes_on_two_ranks_reseeding_the_new_rank(tiny_cfg, tmp_path, run_ranks,
                                                                             capfd):
    one = tmp_path / "one"
    run_rank(tiny_cfg("trainer.max_steps=2", run_dir=one))
    step2 = one / "checkpoints" / "step_000000002"
    two = tmp_path / "two"
    run_ranks(2, run_rank, tiny_cfg("parallel.dp_shard=2", "trainer.max_steps=3", f"checkpoint.resume={step2}",
                                    run_dir=two), init_pg=False)
    err = capfd.readouterr().err
    assert "rank 1: the checkpoint has no RNG stream for this rank (saved by 1 rank(s))" in err
    assert "rank 0: the checkpoint has no RNG stream" not in err
    assert set(losses(two)) == {3}
