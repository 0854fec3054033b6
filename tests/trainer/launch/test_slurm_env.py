"""trainer/launch/slurm_env.py: node-list parsing and the rendezvous variables from an srun task's
environment; the parser checked against `scontrol show hostnames` on the local cluster."""

from __future__ import annotations

import os
import subprocess

import pytest

from plait_testing import needs_cluster
from trainer.launch import slurm_env


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("a1,b[3-5]", ["a1", "b3", "b4", "b5"]),
    ("gpu[008-010,12]", ["gpu008", "gpu009", "gpu010", "gpu12"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("x[1],y.dom[2-3]z", ["x1", "y.dom2z", "y.dom3z"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert slurm_env.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[[1]]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        slurm_env.expand_nodelist(bad)


def test_expand_tasks_per_node():
    assert slurm_env.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm_env.expand_tasks_per_node("4") == [4]


def _srun_env(**extra) -> dict:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "12345", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_STEP_NODELIST": "localhost,otherhost", "SLURM_JOB_NODELIST": "otherhost,localhost"}
    env.update(extra)
    return env


def test_rendezvous_from_srun_env():
    assert slurm_env.slurm_rendezvous(_srun_env()) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "localhost",  # the step's first node: rank 0 runs there
        "MASTER_PORT": str(15000 + 12345 % 17000),
    }
    assert slurm_env.slurm_rendezvous(_srun_env(MASTER_PORT="29500"))["MASTER_PORT"] == "29500"
    uneven = _srun_env(SLURM_STEP_TASKS_PER_NODE="3,1", SLURM_NODEID="0")
    assert slurm_env.slurm_rendezvous(uneven)["LOCAL_WORLD_SIZE"] == "3"


def test_rendezvous_none_outside_srun_task():
    assert slurm_env.slurm_rendezvous({}) is None
    # the batch script has SLURM_PROCID=0 and SLURM_NTASKS but no step: not a rank yet
    batch = {k: v for k, v in _srun_env(SLURM_PROCID="0").items() if k != "SLURM_STEP_ID"}
    assert slurm_env.slurm_rendezvous(batch) is None


def test_apply_slurm_env_keeps_torchrun_layout(monkeypatch):
    # a private copy: apply_slurm_env writes os.environ, and nothing may leak into later tests
    base = {k: v for k, v in os.environ.items() if k not in slurm_env.RENDEZVOUS_VARS}
    monkeypatch.setattr(os, "environ", {**base, **_srun_env()})
    assert slurm_env.apply_slurm_env()["RANK"] == "3"
    assert os.environ["WORLD_SIZE"] == "4" and os.environ["MASTER_ADDR"] == "localhost"

    # torchrun under srun: its RANK/WORLD_SIZE/... win, only the missing pieces come from Slurm
    monkeypatch.setattr(os, "environ", {**base, **_srun_env(), "RANK": "5", "WORLD_SIZE": "8",
                                        "MASTER_PORT": "29500"})
    applied = slurm_env.apply_slurm_env()
    assert (applied["RANK"], applied["WORLD_SIZE"], applied["MASTER_PORT"]) == ("5", "8", "29500")
    assert "LOCAL_RANK" not in os.environ and os.environ["MASTER_ADDR"] == "localhost"


@pytest.mark.slurm
@needs_cluster
def test_parser_agrees_with_scontrol():
    for nodelist in ["n[1-2]", "a1,b[3-5]", "gpu[008-010,12]", "rack[1-2]-n[1-2]"]:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True).stdout.split()
        assert slurm_env.expand_nodelist(nodelist) == out
