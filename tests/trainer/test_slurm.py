"""trainer/slurm.py: node-list parsing, the rendezvous variables, the sbatch script (no Slurm needed),
and real jobs on the local two-node cluster that `bash .ci/slurm.sh` starts (marked `slurm`)."""

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
from trainer import slurm


# ----------------------------------------------------------------------------- job bodies
# Module-level, so submitit pickles them by reference; the job imports this module through the
# PYTHONPATH line that `_launcher` puts in the sbatch script.


def allreduce_rank(timeout_s: float) -> dict:
    """One rank of a gloo job: rendezvous from Slurm's environment, all_reduce rank+1."""
    rdzv = slurm.apply_slurm_env()
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
TESTS_ROOT = Path(__file__).resolve().parents[1]  # plait_testing.py


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


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("a1,b[3-5]", ["a1", "b3", "b4", "b5"]),
    ("gpu[008-010,12]", ["gpu008", "gpu009", "gpu010", "gpu12"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("x[1],y.dom[2-3]z", ["x1", "y.dom2z", "y.dom3z"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[[1]]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        slurm.expand_nodelist(bad)


def test_expand_tasks_per_node():
    assert slurm.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm.expand_tasks_per_node("4") == [4]


def _srun_env(**extra) -> dict:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "12345", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_STEP_NODELIST": "localhost,otherhost", "SLURM_JOB_NODELIST": "otherhost,localhost"}
    env.update(extra)
    return env


def test_rendezvous_from_srun_env():
    assert slurm.slurm_rendezvous(_srun_env()) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "localhost",  # the step's first node: rank 0 runs there
        "MASTER_PORT": str(15000 + 12345 % 17000),
    }
    assert slurm.slurm_rendezvous(_srun_env(MASTER_PORT="29500"))["MASTER_PORT"] == "29500"
    uneven = _srun_env(SLURM_STEP_TASKS_PER_NODE="3,1", SLURM_NODEID="0")
    assert slurm.slurm_rendezvous(uneven)["LOCAL_WORLD_SIZE"] == "3"


def test_rendezvous_none_outside_srun_task():
    assert slurm.slurm_rendezvous({}) is None
    # the batch script has SLURM_PROCID=0 and SLURM_NTASKS but no step: not a rank yet
    batch = {k: v for k, v in _srun_env(SLURM_PROCID="0").items() if k != "SLURM_STEP_ID"}
    assert slurm.slurm_rendezvous(batch) is None


def test_apply_slurm_env_keeps_torchrun_layout(monkeypatch):
    # a private copy: apply_slurm_env writes os.environ, and nothing may leak into later tests
    base = {k: v for k, v in os.environ.items() if k not in slurm.RENDEZVOUS_VARS}
    monkeypatch.setattr(os, "environ", {**base, **_srun_env()})
    assert slurm.apply_slurm_env()["RANK"] == "3"
    assert os.environ["WORLD_SIZE"] == "4" and os.environ["MASTER_ADDR"] == "localhost"

    # torchrun under srun: its RANK/WORLD_SIZE/... win, only the missing pieces come from Slurm
    monkeypatch.setattr(os, "environ", {**base, **_srun_env(), "RANK": "5", "WORLD_SIZE": "8",
                                        "MASTER_PORT": "29500"})
    applied = slurm.apply_slurm_env()
    assert (applied["RANK"], applied["WORLD_SIZE"], applied["MASTER_PORT"]) == ("5", "8", "29500")
    assert "LOCAL_RANK" not in os.environ and os.environ["MASTER_ADDR"] == "localhost"


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
def test_parser_agrees_with_scontrol():
    for nodelist in ["n[1-2]", "a1,b[3-5]", "gpu[008-010,12]", "rack[1-2]-n[1-2]"]:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True).stdout.split()
        assert slurm.expand_nodelist(nodelist) == out


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
    port = str(slurm.master_port(job.job_id))
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
