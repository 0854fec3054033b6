"""trainer/launch/distributed.py: which launcher started a process (one answer to "am I an srun
task"), the device a rank gets, seeding, and a process group from plain arguments (as a Ray worker
or a Flower client brings one up)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from plait_testing import free_port
from trainer.errors import ConfigError
from trainer.launch import distributed
from trainer.launch.distributed import (detect_launcher, init_distributed, launcher_world_size, pick_device,
                                        seed_everything)
from trainer.launch.slurm_env import in_srun_task

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def bare_env():
    """No launcher's variables; whatever a test (or init_distributed) sets is undone afterwards."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key in LAUNCH_VARS or key.startswith("SLURM_"):
            del os.environ[key]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
        "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost"}
SBATCH = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_NODEID": "0",
          "SLURM_JOB_NODELIST": "localhost"}  # the batch script: Slurm's variables, no step yet


@pytest.mark.parametrize("env, srun_task, launcher, world", [
    ({}, False, None, None),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, False, "torchrun", 4),
    (SBATCH, False, None, None),
    (SRUN, True, "srun", 2),
    ({**SRUN, "SLURM_STEP_ID": "", "SLURM_STEPID": "3"}, True, "srun", 2),  # older Slurm's spelling
    ({**SRUN, "RANK": "3", "WORLD_SIZE": "8"}, True, "torchrun", 8),  # torchrun inside an srun task
    ({**SBATCH, "RANK": "0", "WORLD_SIZE": "1"}, False, "torchrun", 1),  # sbatch's shell exported them
], ids=["nothing", "torchrun", "sbatch script", "srun task", "srun task, SLURM_STEPID", "torchrun under srun",
        "sbatch with stale RANK"])
def test_one_answer_to_which_launcher_started_this_process(bare_env, env, srun_task, launcher, world):
    bare_env.update(env)
    assert in_srun_task() is srun_task
    assert in_srun_task(dict(env)) is srun_task  # the same answer from an environment passed in
    assert detect_launcher() == launcher
    assert launcher_world_size() == world


@pytest.mark.parametrize("name", ["gpu", "CPU", "cuda:x", "cuda:", "mps", "", "cuda:0,1"])
def test_an_unknown_device_is_a_config_error_naming_the_allowed_ones(name):
    with pytest.raises(ConfigError) as err:
        pick_device(name, 0)
    assert f"device={name!r}" in str(err.value) and "auto, cpu, cuda, cuda:N" in str(err.value)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_config_error(monkeypatch, name):
    monkeypatch.setattr(distributed, "cuda_available", lambda: False)
    with pytest.raises(ConfigError, match=f"device={name} but CUDA is not available.*allowed here: auto, cpu"):
        pick_device(name, 0)
    assert pick_device("auto", 1) == torch.device("cpu") and pick_device("cpu", 1) == torch.device("cpu")


def test_devices_on_a_machine_with_two_gpus(monkeypatch):
    monkeypatch.setattr(distributed, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", 1) == torch.device("cuda", 1)
    assert pick_device("cuda", 0) == torch.device("cuda", 0)
    assert pick_device("cuda:1", 0) == torch.device("cuda", 1)
    assert pick_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device=cuda:2: asks for CUDA device 2, but this machine has 2"):
        pick_device("cuda:2", 0)
    with pytest.raises(ConfigError, match=r"device=cuda: local rank 3 needs CUDA device 3"):
        pick_device("cuda", 3)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_repeats_every_generator():
    seed_everything(5)
    first = _draws()
    seed_everything(5)
    assert _draws() == first
    seed_everything(6)
    other = _draws()
    assert all(a != b for a, b in zip(first, other))
    seed_everything(2**40 + 5)  # numpy takes 32 bits: a large seed must still work
    assert len(_draws()) == 3


def _plain_arguments_group(port: int) -> tuple:
    # forked ranks get RANK etc. from run_ranks: take the rank, then leave no launcher variables
    rank = int(os.environ["RANK"])
    for key in LAUNCH_VARS:
        os.environ.pop(key, None)
    env = init_distributed(rank, 2, master_addr="127.0.0.1", master_port=port, device="cpu", local_rank=rank)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return env.rank, env.world_size, env.local_rank, env.device.type, dist.get_backend(), total.item()


def test_plain_arguments_form_a_gloo_group_without_launcher_variables(run_ranks):
    assert run_ranks(2, _plain_arguments_group, free_port(), init_pg=False) == [
        (0, 2, 0, "cpu", "gloo", 3.0), (1, 2, 1, "cpu", "gloo", 3.0)]


def test_one_process_started_by_nobody_has_no_group_and_exports_nothing(bare_env):
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.local_rank, env.device, env.is_main) == (0, 1, 0, torch.device("cpu"), True)
    assert not dist.is_initialized()
    assert detect_launcher() is None  # a later launch in this process still sees no launcher


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 2, "world_size": 2}, ["rank=2", "world_size=2"]),
    ({"rank": 0, "world_size": 0}, ["world_size=0"]),
    ({"rank": 1, "world_size": 2}, ["master_addr", "master_port"]),
    ({"rank": 1, "world_size": 2, "master_addr": "127.0.0.1"}, ["master_port"]),
])
def test_an_impossible_layout_is_refused_before_anything_starts(bare_env, kwargs, words):
    with pytest.raises(ValueError) as err:
        init_distributed(device="cpu", **kwargs)
    for word in words:
        assert word in str(err.value)
    assert "RANK" not in os.environ and not dist.is_initialized()
