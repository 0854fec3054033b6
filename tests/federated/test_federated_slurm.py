"""`task.mode=deploy` across a Slurm job's nodes (federated/cluster.py): `launcher=slurm
launcher.nodes=2` on the local two-node cluster starts the SuperLink on the first node and a
SuperNode on each, the rounds equal the in-process run with the same seeds, and no Flower process
outlives the job. Bad multi-node configs are refused before anything starts."""

from __future__ import annotations

import subprocess

import pytest

from federated.cluster import clients_of
from plait_testing import needs_cluster, plait_process
from test_federated_run import SMALL, plait, rows
from trainer.config import validate_run
from trainer.errors import ConfigError

ARGS = ["task.num_clients=2", "task.rounds=2", "task.round_timeout_s=60", "task.plots=false"]
SLURM = ["launcher=slurm", "launcher.nodes=2", "launcher.timeout_min=10"]


def flower_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "flower-superlink|flower-supernode|flwr-serverapp|flwr-clientapp"],
                         capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_each_task_hosts_the_clients_congruent_to_its_rank():
    assert [clients_of(r, 2, 5) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert clients_of(2, 3, 2) == []  # more nodes than clients: a node may host none


def _compose(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from trainer.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("plait", overrides=["task=federated", f"run_dir={tmp_path}", *SMALL, *overrides])


@pytest.mark.parametrize("overrides, words", [
    (["task.mode=simulation"], "use task.mode=deploy with launcher=slurm"),
    (["task.mode=local"], "use task.mode=deploy with launcher=slurm"),
    (["task.mode=deploy", "task.spawn_local=false"], "starts its own across them"),
    (["task.mode=deploy", "launcher.tasks_per_node=2"], "one task per node"),
])
def test_a_multi_node_federation_needs_deploy_one_task_per_node_and_its_own_superlink(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        validate_run(_compose(tmp_path, *ARGS, *SLURM, *overrides), None)


def test_the_job_asks_for_one_task_per_node(tmp_path):
    assert validate_run(_compose(tmp_path, "task.mode=deploy", *ARGS, *SLURM), None)[1] == 2


@pytest.mark.slurm
@needs_cluster
@pytest.mark.timeout(400)
def test_deploy_across_two_slurm_nodes_equals_the_local_run(tmp_path):
    before = flower_processes()
    proc = plait_process("task=federated", "task.mode=deploy", *SMALL, *ARGS, *SLURM, "name=job", cwd=tmp_path,
                         tiny=False)
    out, err = proc.communicate(timeout=360)
    assert proc.returncode == 0, (out + err)[-3000:]
    assert "Flower SuperLink on" in out and "2 nodes host the SuperNodes of 2 clients" in out
    job = tmp_path / "runs" / "job"
    assert (job / "flwr" / "node-1" / "supernode1.log").exists()  # client 1's SuperNode ran on the second node
    assert flower_processes() <= before, "a Flower process of the job outlived it"
    plait(tmp_path / "local", "task.mode=local", *ARGS)
    a, b = rows(job), rows(tmp_path / "local")
    for key in ("accuracy", "train_loss", "bytes_up", "bytes_down", "participants"):
        assert [r[key] for r in a] == [r[key] for r in b], key
