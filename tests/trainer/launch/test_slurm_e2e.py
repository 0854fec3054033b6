"""`plait launcher=slurm` on the local two-node cluster: a 2-node pretrain job, and a preempted job
that Slurm requeues and that resumes exactly (marked `slurm`; `bash .ci/slurm.sh` starts it)."""

import json
import subprocess
import time

import pytest

from plait_testing import compose, logged as losses, needs_cluster, plait_process, run_ranks
from trainer.launch.rank import run_rank

SLURM = ["launcher=slurm", "launcher.nodes=2", "parallel.dp_shard=2", "launcher.timeout_min=10"]


def plait(*args, cwd):
    return plait_process(*args, cwd=cwd)


def local_reference(tmp_path, *args):
    """The same run on two forked local ranks: what the Slurm job must reproduce."""
    run = tmp_path / "local"
    run_ranks(2, run_rank, compose(["parallel.dp_shard=2", *args], run), init_pg=False)
    return losses(run)


def test_dry_run_prints_the_sbatch_script(tmp_path):
    proc = plait(*SLURM, "launcher.dry_run=true", "launcher.partition=debug", cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "#SBATCH --nodes=2" in out and "#SBATCH --partition=debug" in out and "srun" in out
    assert not (tmp_path / "runs" / "pretrain-llama_tiny" / "slurm").exists()


@pytest.mark.slurm
@needs_cluster
@pytest.mark.timeout(240)
def test_two_node_pretrain_job_trains_and_checkpoints(tmp_path):
    proc = plait(*SLURM, "trainer.max_steps=4", "name=job", cwd=tmp_path)
    out, err = proc.communicate(timeout=220)
    assert proc.returncode == 0, (out + err)[-3000:]
    run = tmp_path / "runs" / "job"
    manifest = json.loads((run / "checkpoints" / "step_000000004" / "plait.json").read_text())
    assert manifest["world_size"] == 2 and manifest["layout"]["dp_shard"] == 2
    assert losses(run) == local_reference(tmp_path, "trainer.max_steps=4")


@pytest.mark.slurm
@needs_cluster
@pytest.mark.timeout(400)
def test_preempted_job_is_requeued_and_resumes_exactly(tmp_path):
    steps = ["trainer.max_steps=40", "checkpoint.every=1000"]
    proc = plait(*SLURM, *steps, "name=pre", cwd=tmp_path)
    job = None
    for line in proc.stdout:
        if "submitted Slurm job" in line:
            job = line.split("Slurm job ")[1].split()[0]
        if "] step" in line and "loss" in line and int(line.split("] step")[1].split()[0]) >= 5:
            break
    assert job is not None
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # Slurm holds a requeued job for ~2 minutes (BeginTime); release it as an operator would.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        if "Restarts=1" in state and "JobState=PENDING" in state:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            break
        time.sleep(0.5)
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (rest + err)[-3000:]
    assert "resumed from" in rest
    run = tmp_path / "runs" / "pre"
    logs = "".join(p.read_text() for p in (run / "slurm").glob("*_0_log.err"))
    assert "preempted by SIGUSR1" in logs and "job requeued" in logs
    assert losses(run) == local_reference(tmp_path, *steps)
