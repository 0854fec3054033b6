"""`plait task=federated` end to end through the CLI: config refusals, a killed server that resumes,
and a Flower simulation (Ray) with faulty clients, equal to the in-process run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from trainer.config import validate_run
from trainer.errors import ConfigError

PLAIT = str(Path(sys.executable).with_name("plait"))
TINY = ["model.vocab_size=64", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_dim=64", "model.max_seq_len=16"]
SMALL = TINY + ["task.num_clients=3", "task.train_samples=240", "task.test_samples=96", "task.seq_len=12",
                "task.local_steps=3", "task.batch_choices=[8]", "task.rank_choices=[2,4]", "task.max_modules=2",
                "task.base_pretrain_steps=0", "logger.progress=false", "checkpoint.keep_last=0"]


def plait(run_dir, *overrides, check=True, timeout=240, **popen):
    cmd = [PLAIT, "task=federated", f"run_dir={run_dir}", *SMALL, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def state(run_dir, step, tmp_path):
    out = tmp_path / f"{Path(run_dir).name}.pt"
    dcp_to_torch_save(str(Path(run_dir) / "checkpoints" / f"step_{step:09d}"), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in flat(sd).items()}


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]), k


def config(**task):
    return {"task": {"_target_": "federated.run.run", "name": "federated", **task},
            "model": {"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                      "max_seq_len": 16}, "run_dir": "/tmp/unused"}


@pytest.mark.parametrize("task, message", [
    ({"strategy": "fedavg"}, "task.strategy='fedavg' is not a registered aggregation strategy"),
    ({"num_clients": 2, "clients": [{}, {}, {}]}, "task.clients has 3 profile(s) but task.num_clients=2"),
    ({"faults": ["crash:0:1"]}, "task.faults item 'crash:0:1'"),
    ({"bits": 3}, "task.bits=3 is not allowed"),
    ({"num_clients": 2, "clients": [{}, {"memory_mib": 0.01}]}, "client 1's memory budget"),
    ({"planner": "uniform", "target_modules": ["qkv"]}, "task.target_modules=['qkv'] matches no Linear"),
    ({"min_clients": 9}, "task.min_clients=9 exceeds task.num_clients=4"),
    ({"planner": "uniform", "strategy": "fedex", "num_clients": 2, "client_ranks": [2, 4]},
     "task.client_ranks=[2, 4] mixes ranks, which task.strategy='fedex' cannot aggregate"),
    ({"planner": "uniform", "num_clients": 2, "client_ranks": [2]}, "task.client_ranks=[2] needs one positive rank"),
])
def test_bad_config_is_refused_before_any_client_starts(task, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_run(config(train_samples=200, seq_len=12, **task), world_size=None)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    out = plait(tmp_path / "run", "task.strategy=fedavg", check=False)
    assert out.returncode == 2
    assert "plait: error: bad config: task.strategy='fedavg' is not a registered aggregation strategy" in out.stderr


@pytest.mark.slow
def test_killed_server_resumes_with_identical_results(tmp_path):
    """SIGKILL the server (task.mode=local) once round 2 is saved; resume; compare with an uninterrupted run."""
    args = ["task.mode=local", "task.rounds=4", "task.strategy=fedex", "task.planner=uniform", "task.rank=2",
            "task.target_modules=[wq,w2]", "task.batch_size=8", "task.bits=8", "task.plots=false"]
    plait(tmp_path / "whole", *args)
    proc = plait(tmp_path / "cut", *args, popen=True)
    deadline = time.time() + 200
    while not (tmp_path / "cut" / "checkpoints" / "step_000000002").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = plait(tmp_path / "cut", *args, "checkpoint.resume=latest")
    assert "resumed from" in out.stdout
    a, b = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    keys = ("accuracy", "train_loss", "aggregation_error", "bytes_up", "bytes_down")
    last = {r["step"]: [r[k] for k in keys] for r in b}  # a round logged twice (killed before its save): the rerun
    assert [[r[k] for k in keys] for r in a] == [last[r["step"]] for r in a]
    same(state(tmp_path / "whole", 4, tmp_path), state(tmp_path / "cut", 4, tmp_path))


@pytest.mark.slow
def test_simulation_drops_faulty_clients_and_equals_the_local_run(tmp_path):
    """Flower simulation (Ray): client 0 raises in round 2 and client 2's process exits in round 3; both
    are dropped from those rounds, the run goes on (resumed in a second Flower run after round 2), and
    every round equals an uninterrupted task.mode=local run with client faults of the same effect."""
    first = plait(tmp_path / "sim", "task.mode=simulation", "task.rounds=2", "task.faults=[raise:0:2]",
                  "task.round_timeout_s=30")
    assert "client 0 dropped (raised RuntimeError: injected fault" in first.stdout
    # a second Flower run resumes Plait's server at round 2 (Flower's own start() would begin at 1)
    sim = plait(tmp_path / "sim", "task.mode=simulation", "task.rounds=3", "task.faults=[raise:0:2,exit:2:3]",
                "task.round_timeout_s=30", "task.plots=true", "checkpoint.resume=latest")
    assert "resumed from" in sim.stdout and "at round 2" in sim.stdout
    assert "client 2 dropped" in sim.stdout
    local = plait(tmp_path / "local", "task.mode=local", "task.rounds=3", "task.faults=[raise:0:2,raise:2:3]")
    a, b = rows(tmp_path / "sim"), rows(tmp_path / "local")
    assert [r["participants"] for r in a] == [3, 2, 2]
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert "client0/bytes_up" in a[0] and "client0/round_s" in a[0] and "client0/compute_s" in a[0]
    assert (tmp_path / "sim" / "accuracy.png").stat().st_size > 0 and (tmp_path / "sim" / "plan.png").exists()


def free_port(n: int = 1) -> int:
    """A base port with n free ports after it (SuperLink, then one per SuperNode)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_free(base + i) for i in range(n + 1)):
            return base
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_deploy_on_localhost_equals_local_and_drops_a_killed_supernode(tmp_path):
    """One SuperLink and two SuperNodes on localhost (`flwr run`, FLWR_HOME under the run dir). After
    round 1 SuperNode 1 is killed: it is dropped once the round times out, the run finishes with the
    other, and every round equals task.mode=local with client 1 failing in the same rounds."""
    port = free_port(3)
    args = ["task.num_clients=2", "task.rounds=2", "task.round_timeout_s=30", "task.plots=false"]
    proc = plait(tmp_path / "dep", "task.mode=deploy", f"task.superlink=127.0.0.1:{port}",
                 f"task.supernode_port={port + 1}", *args, popen=True)
    metrics = tmp_path / "dep" / "metrics.jsonl"
    deadline = time.time() + 200
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    pids = json.loads((tmp_path / "dep" / "flwr" / "pids.json").read_text())
    os.killpg(pids["supernode1"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, out[-3000:]
    a = rows(tmp_path / "dep")
    assert a[0]["participants"] == 2 and a[-1]["participants"] == 1
    assert "client 1 dropped" in out
    failed = [f"raise:1:{r['step']}" for r in a if r["participants"] == 1]
    plait(tmp_path / "local", "task.mode=local", *args, f"task.faults=[{','.join(failed)}]")
    b = rows(tmp_path / "local")
    for key in ("accuracy", "train_loss", "bytes_up", "bytes_down", "participants"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert f'address = "127.0.0.1:{port}"' in (tmp_path / "dep" / "flwr" / "flwr_home" / "config.toml").read_text()
