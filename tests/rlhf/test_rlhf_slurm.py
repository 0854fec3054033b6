"""RLHF on a Ray cluster inside a Slurm job (trainer/launch/ray_cluster.py): `launcher=slurm` on
the local two-node cluster starts a Ray head and a Ray worker node, the actor's workers span both
(training under tp=2, generating under tp=1 through the 3D-HybridEngine, across the nodes), the run
equals the same run on one local Ray, and every node's Ray is stopped at the end."""

import subprocess

import pytest

from plait_testing import needs_cluster, plait_process
from rlhf_harness import SMALL, metrics, ray_session, rlhf_config, run_in_process  # noqa: F401 (fixture)
from trainer.config import ConfigError

RUN = ["task=rlhf", "task.algorithm=grpo", "task.actor.tp=2", "task.rollout_tp=1", "task.iterations=2",
       "checkpoint.every=1"]
SLURM = ["launcher=slurm", "launcher.nodes=2", "launcher.timeout_min=10"]


def ray_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.mark.parametrize("overrides, words", [
    (["task.backend=local"], "needs task.backend=ray"),
    (["launcher.tasks_per_node=2"], "one task per node"),
    (["task.ray_address=10.0.0.1:6379"], "names an existing cluster"),
])
def test_a_multi_node_run_needs_ray_one_task_per_node_and_its_own_cluster(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        rlhf_config(tmp_path, *RUN[1:], *SLURM, *overrides)


def test_the_job_asks_for_one_task_per_node(tmp_path):
    proc = plait_process(*RUN, "launcher=slurm", "launcher.nodes=3", "launcher.dry_run=true", cwd=tmp_path, tiny=False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "#SBATCH --nodes=3" in out and "#SBATCH --ntasks-per-node=1" in out


def test_a_step_with_several_tasks_on_a_node_is_refused(tmp_path, monkeypatch):
    from trainer.config import validate_run

    cfg = rlhf_config(tmp_path, *RUN[1:])
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "1")
    with pytest.raises(ConfigError, match="srun --ntasks-per-node=1"):
        validate_run(cfg, 2)


@pytest.mark.slurm
@needs_cluster
@pytest.mark.timeout(400)
def test_grpo_on_a_two_node_ray_cluster_in_slurm_equals_one_local_ray(tmp_path, ray_session):
    before = ray_processes()  # this session's own Ray stays up
    proc = plait_process(*RUN, *SMALL, *SLURM, "name=job", cwd=tmp_path, tiny=False)
    out, err = proc.communicate(timeout=360)
    assert proc.returncode == 0, (out + err)[-3000:]
    assert "Ray cluster: 2 nodes" in out and "actor ×2 on 2 nodes" in out
    assert (tmp_path / "runs" / "job" / "checkpoints" / "step_000000002").is_dir()
    assert ray_processes() <= before, "a Ray node of the job outlived it"

    reference = tmp_path / "reference"
    run_in_process(rlhf_config(reference, *RUN[1:]))
    assert metrics(tmp_path / "runs" / "job") == metrics(reference)
