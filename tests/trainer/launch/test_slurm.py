"""trainer/launch/slurm.py: the sbatch script (no Slurm needed), and real jobs on the local two-node
cluster that `bash .ci/slurm.sh` starts (marked `slurm`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from plait_testing import needs_cluster
from trainer.config import ConfigError, LauncherConfig
from trainer.launch import slurm, slurm_env


# ----------------------------------------------------------------------------- job bodies
# Module-level, so submitit pickles them by reference; the job imports this module through the
# PYTHONPATH line that `_launcher` puts in the sbatch script.


def allreduce_rank(timeout_s: float) -> dict:
    """One rank of a gloo job: rendezvous from Slurm's environment, all_reduce rank+1."""
    rdzv = slurm_env.apply_slurm_env()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value.item(),
           "node": os.environ.get("SLURMD_NODENAME"), "rdzv": rdzv}
    dist.destroy_process_group()
    return out


def fail_on_rank_1(message: str) -> str:
    """Rank 1 raises; rank 0 sleeps as if blocked in a collective, until srun kills it."""
    if os.environ["SLURM_PROCID"] == "1":
        raise ValueError(message)
    time.sleep(300)
    return "rank 0 was not stopped"


def crash_on_rank_1() -> str:
    """Rank 1 dies without a Python exception (as on a segfault or the OOM killer)."""
    if os.environ["SLURM_PROCID"] == "1":
        print("plait-slurm-test: rank 1 about to die", file=sys.stderr, flush=True)
        os._exit(3)
    time.sleep(300)
    return "rank 0 was not stopped"


# ----------------------------------------------------------------------------- helpers

# root of this module's import name (tests/trainer for "test_slurm", the repo for "tests.trainer...")
IMPORT_ROOT = Path(__file__).resolve().parents[__name__.count(".")]
TESTS_ROOT = Path(__file__).resolve().parents[2]  # plait_testing.py


@pytest.fixture
def cancel_jobs():
    """Jobs to scancel at teardown, so a failed wait leaves nothing running on the cluster."""
    jobs = []
    yield jobs
    for job in jobs:
        subprocess.run(["scancel", str(job.job_id)], capture_output=True)


def _launcher(**overrides) -> LauncherConfig:
    cfg = LauncherConfig(name="slurm", timeout_min=5,
                         setup=[f"export PYTHONPATH={IMPORT_ROOT}:{TESTS_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"])
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# ----------------------------------------------------------------------------- pure


def test_sbatch_script_has_the_options(tmp_path):
    launcher = _launcher(nodes=2, partition="debug", account="proj", cpus_per_task=3, mem_gb=16,
                         timeout_min=30, sbatch_extra={"constraint": "a100", "exclusive": True},
                         setup=["module load cuda"])
    text = slurm.sbatch_script(launcher, str(tmp_path), "pretrain-llama_tiny", world_size=8)
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=debug",
                 "#SBATCH --account=proj", "#SBATCH --cpus-per-task=3", "#SBATCH --mem=16GB",
                 "#SBATCH --time=30", "#SBATCH --constraint=a100", "#SBATCH --exclusive",
                 "#SBATCH --job-name=pretrain-llama_tiny", "module load cuda"]:
        assert line in text.splitlines(), line
    assert "gpus-per-node" not in text and "--qos" not in text
    srun = next(line for line in text.splitlines() if line.startswith("srun"))
    assert "--kill-on-bad-exit=1" in srun and f"{sys.executable} -u -m submitit.core._submit" in srun
    assert "#SBATCH --ntasks-per-node=2" in slurm.sbatch_script(
        _launcher(nodes=2, gpus_per_node=2), str(tmp_path), "x", 4)


def test_short_time_limits_get_a_warning_that_cannot_land_at_start(tmp_path):
    # Slurm may send the warning up to 60 s early; it must still come >= 30 s after the start
    assert [slurm.signal_delay_s(m) for m in (1, 2, 3, 60)] == [1, 30, 90, 90]
    assert "#SBATCH --signal=USR2@30" in slurm.sbatch_script(
        _launcher(nodes=1, timeout_min=2), str(tmp_path), "x", 1).splitlines()


def test_sbatch_script_is_what_submitit_submits(tmp_path, monkeypatch):
    # pins the private `_make_sbatch_string` that the dry run uses to the executor's own text
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    launcher = _launcher(nodes=2, qos="high", sbatch_extra={"mail-type": "END"})
    executor = submitit.SlurmExecutor(folder=tmp_path)
    executor.update_parameters(**slurm.sbatch_parameters(launcher, "job", 4))
    expected = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert slurm.sbatch_script(launcher, str(tmp_path), "job", 4) == expected


def test_task_layout_errors(tmp_path):
    with pytest.raises(ConfigError, match="launcher.nodes=2"):
        slurm.sbatch_script(_launcher(nodes=2), str(tmp_path), "x", world_size=3)
    with pytest.raises(ConfigError, match="tasks_per_node=3"):
        slurm.sbatch_script(_launcher(nodes=2, tasks_per_node=3), str(tmp_path), "x", world_size=4)
    with pytest.raises(ConfigError, match="sbatch_extra sets ntasks-per-node"):
        slurm.sbatch_script(_launcher(sbatch_extra={"ntasks-per-node": 2}), str(tmp_path), "x", 1)


def test_submit_without_slurm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.SlurmError, match="dry_run=true"):
        slurm.submit(_launcher(), allreduce_rank, (1.0,), str(tmp_path), "x", 1)


def test_result_older_than_the_submission_is_ignored(tmp_path):
    # a test cluster restarted with fresh job ids: job 7's folder may hold an earlier job 7's files
    from submitit.core.utils import JobPaths

    paths = JobPaths(tmp_path, job_id="7", task_id=0)
    paths.result_pickle.write_bytes(b"stale")
    paths.submitted_pickle.write_bytes(b"new")
    os.utime(paths.result_pickle, (time.time() - 60, time.time() - 60))
    assert not slurm._has_result(paths)
    os.utime(paths.result_pickle, None)
    assert slurm._has_result(paths)


# ----------------------------------------------------------------------------- real cluster


@pytest.mark.slurm
@needs_cluster
@pytest.mark.timeout(90)
def test_two_node_gloo_allreduce(tmp_path, cancel_jobs):
    job = slurm.submit(_launcher(nodes=2), allreduce_rank, (60.0,), str(tmp_path), "plait-test", 2)
    cancel_jobs.append(job)
    results = slurm.wait_and_report(job, timeout_s=80)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)  # (0+1) + (1+1)
    assert sorted(r["node"] for r in results) == ["n1", "n2"]  # one task on each "node"
    port = str(slurm_env.master_port(job.job_id))
    for r in results:
        assert r["rdzv"]["MASTER_ADDR"] == "127.0.0.1"  # n1's NodeAddr: n1 is not a DNS name
        assert r["rdzv"]["MASTER_PORT"] == port and r["rdzv"]["LOCAL_WORLD_SIZE"] == "1"


@pytest.mark.slurm
@needs_cluster
@pytest.mark.timeout(90)
def test_failing_rank_surfaces_its_traceback(tmp_path, cancel_jobs):
    start = time.monotonic()
    job = slurm.submit(_launcher(nodes=2), fail_on_rank_1,
                       ("plait-slurm-test deliberate failure",), str(tmp_path), "plait-fail", 2)
    cancel_jobs.append(job)
    with pytest.raises(slurm.SlurmJobFailed) as info:
        slurm.wait_and_report(job, timeout_s=80)
    message = str(info.value)
    assert f"Slurm job {job.job_id} failed" in message
    assert "ValueError: plait-slurm-test deliberate failure" in message
    assert "rank(s) [1] raised" in message
    assert info.value.state in ("FAILED", "CANCELLED", "GONE") and info.value.logs
    # srun's --kill-on-bad-exit stopped rank 0, which would have slept for 300 s
    assert time.monotonic() - start < 60


@pytest.mark.slurm
@needs_cluster
@pytest.mark.timeout(90)
def test_crashed_rank_is_reported_with_its_log(tmp_path, cancel_jobs, monkeypatch):
    monkeypatch.setattr(slurm, "RESULT_GRACE_S", 2.0)  # local disk: result files never lag
    job = slurm.submit(_launcher(nodes=2), crash_on_rank_1, (), str(tmp_path),
                       "plait-crash", 2)
    cancel_jobs.append(job)
    with pytest.raises(slurm.SlurmJobFailed) as info:
        slurm.wait_and_report(job, timeout_s=80)
    message = str(info.value)
    assert "rank(s) [0, 1] left no result" in message and "exit code" in message
    # srun's verdict names the rank that died, and that rank's own last words are shown
    assert "task 1: Exited with exit code 3" in message
    assert "plait-slurm-test: rank 1 about to die" in message
    assert info.value.state in ("FAILED", "CANCELLED")
