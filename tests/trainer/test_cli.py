"""The `plait` command as a user runs it: exit codes, messages, spawned ranks, sweeps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait_testing import TINY, plait_run

REPO = Path(__file__).resolve().parents[2]


def plait(*args, cwd, timeout=300):
    return plait_run(*args, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (["trainer.max_steps=abc"], ["trainer.max_steps", "abc"]),
    (["trainer.nope=1"], ["nope"]),
    (["model=llama_huge"], ["llama_huge", "llama_tiny"]),
    (["parallel.tp=3"], ["parallel.tp"]),
    (["parallel.dp_shard=2", "trainer.batch_size=7"], ["trainer.batch_size"]),
    (["data=local"], ["data.source"]),
    (["data.source=/does/not/exist.jsonl"], ["data.source", "no such file"]),
    (["checkpoint.resume=latest"], ["checkpoint.resume=latest"]),
    # every option of every task is checked before a rank is spawned or a job submitted
    (["launcher=slurm", "task=stream_q", "task.lr=-1"], ["task.lr=-1", "a number > 0"]),
    (["launcher=slurm", "launcher.dry_run=true", "task=stream_q", "task.sparsity=1.0"], ["task.sparsity", "[0, 1)"]),
    (["parallel.dp_shard=2", "model.name=mamba"], ["model.name='mamba'", "llama"]),
    (["parallel.dp_shard=2", "optim.lr=-1"], ["optim.lr=-1", "a number > 0"]),
    (["device=tpu"], ["device='tpu'", "auto, cpu, cuda, cuda:N"]),
    (["task._target_=nosuch.run"], ["task._target_='nosuch.run'", "cannot be imported"]),
    (["task=stream_q", "task.agent=ppo"], ["task.agent='ppo'", "ac, q, sarsa, td"]),
    (["task=stream_q", "task.env=Pendulum-v1"], ["task.agent=q needs discrete actions"]),
    (["task=stream_q", "trainer.max_steps=5"], ["trainer.max_steps=5", "not used by task=stream_q"]),
    (["+task.foo=1"], ["task.foo"]),
    # keys that moved into a task's options name their new key
    (["task=stream_ac", "env=Hopper-v5"], ["env= is now task.env="]),
    (["task=stream_ac", "trainer.total_steps=100"], ["trainer.total_steps= is now task.total_steps="]),
])
def test_bad_input_exits_2_with_the_key(tmp_path, args, words):
    stream = any(a.startswith("task=stream") for a in args)  # the tiny overrides are pretraining's
    out = plait_run(*args, cwd=tmp_path, timeout=120, tiny=not stream)
    assert out.returncode == 2, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "#SBATCH" not in out.stdout
    assert not list(tmp_path.glob("runs/*/checkpoints")) and not list(tmp_path.glob("runs/*/slurm"))


def test_spawned_ranks_train_and_a_second_run_refuses_to_clobber(tmp_path):
    out = plait("parallel.dp_shard=2", "trainer.max_steps=3", "name=dp2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "dp2"
    assert (run / "checkpoints" / "latest").exists() and (run / "config.yaml").exists()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    again = plait("parallel.dp_shard=2", "trainer.max_steps=3", "name=dp2", cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "checkpoint.resume=latest" in again.stderr
    more = plait("parallel.dp_shard=2", "trainer.max_steps=5", "name=dp2", "checkpoint.resume=latest", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stdout + more.stderr


def test_bad_data_found_inside_the_ranks_is_one_error_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field here"}\n')
    out = plait("parallel.dp_shard=2", f"data.source={bad}", "trainer.max_steps=2", cwd=tmp_path, timeout=180)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"plait: error: [rank 0] bad config: {bad}: no field 'text' (fields: body)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_multirun_sweep_gives_each_job_its_run_dir(tmp_path):
    out = plait("-m", "seed=0,1", "trainer.max_steps=2", "checkpoint.save_final=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    configs = sorted((tmp_path / "runs" / "multirun").glob("*/*/*/config.yaml"))
    seeds = sorted(int(p.read_text().split("\nseed: ")[1].split("\n")[0]) for p in configs)
    assert seeds == [0, 1]


def test_runs_unchanged_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trainer", *TINY, "parallel.dp_shard=-1", "trainer.max_steps=2", "name=tr"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 2 rank(s)" in out.stdout + out.stderr
    manifest = json.loads((tmp_path / "runs" / "tr" / "checkpoints" / "step_000000002" / "plait.json").read_text())
    assert manifest["world_size"] == 2 and manifest["layout"]["dp_shard"] == 2


def test_reads_the_choices_accelerate_launch_records(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    from plait_testing import compose
    from trainer.launch.rank import run_rank

    run_rank(compose(["trainer.max_steps=1"], tmp_path / "acc"))
    manifest = json.loads((tmp_path / "acc" / "checkpoints" / "step_000000001" / "plait.json").read_text())
    assert manifest["config"]["trainer"]["precision"] == "bf16" and manifest["config"]["device"] == "cpu"
