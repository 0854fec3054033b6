"""task=continual and task=active end to end: metrics, checkpoints, PNGs, refusals through the CLI
(exit 2, nothing written), and resume after a stop or a preemption bitwise equal to a run never
stopped."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import continual.run as continual_run
import continual.run_active as active_run
from trainer.checkpoint import Checkpointer
from trainer.config import validate
from trainer.launch.distributed import DistEnv, seed_everything
from trainer.launch.preemption import Preempted

ONE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def continual_config(run_dir, resume="none", every=1, **task):
    return validate({"task": {"_target_": "continual.run.run", "name": "continual", **task}, "seed": 0,
                     "run_dir": str(run_dir), "checkpoint": {"every": every, "resume": resume},
                     "logger": {"progress": False}})


def active_config(run_dir, resume="none", every=0, **task):
    return validate({"task": {"_target_": "continual.run_active.run", "name": "active", **task}, "seed": 0,
                     "run_dir": str(run_dir), "checkpoint": {"every": every, "resume": resume},
                     "logger": {"progress": False}})


def launch(module, cfg):
    seed_everything(cfg.seed)  # what trainer.launch.rank.run_rank does before calling the task
    return module.run(cfg, ONE)


def rows(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("time")
        out.append(r)
    return out


def final_state(run_dir, tmp_path):
    latest = Checkpointer(str(run_dir / "checkpoints")).latest()
    out = tmp_path / f"{run_dir.name}.pt"
    dcp_to_torch_save(str(latest), str(out))
    return torch.load(out, weights_only=False)


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a.nan_to_num(-7), b.nan_to_num(-7))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def assert_same(a, b):
    """Every component of two checkpoints equal, bit for bit (the progress counters aside)."""
    assert a.keys() == b.keys()
    for k in a:
        assert k == "progress" or same(a[k], b[k]), f"{k} differs"


class StopAt:
    """A preemption signal that arrives during boundary check number `cut`."""

    def __init__(self, cut):
        self.cut, self.checks = cut, 0

    @property
    def received(self):
        self.checks += 1
        return "SIGTERM" if self.checks >= self.cut else None

    def restore(self):
        pass


SMALL_DKVB = dict(learner="kv_bottleneck", stream="split_digits", epochs=2, num_codebooks=16,
                  key_value_pairs_per_codebook=32, key_init_epochs=2, encoder_dim=64)


@pytest.mark.parametrize("task", [
    SMALL_DKVB,
    dict(learner="replay", stream="split_digits", epochs=2, replay_capacity=50, hidden=32),
    dict(learner="ewc", stream="gaussian_toy", epochs=3, hidden=16),
    dict(learner="prompt_tpp", stream="hawkes_regimes", epochs=1, prompt_pool_size=4, prompt_top_n=2,
         prompt_length=2, tpp_hidden=8),
], ids=lambda t: t["learner"])
def test_continual_stopped_and_resumed_equals_uninterrupted(tmp_path, task):
    whole = tmp_path / "whole"
    full = launch(continual_run, continual_config(whole, **task))
    assert (whole / "continual.png").stat().st_size > 0 and full["experiences"] == len(full["R"])
    cut = tmp_path / "cut"
    part = launch(continual_run, continual_config(cut, stop_after=2, **task))
    assert part["experiences"] == 2 and not (cut / "continual.png").exists()
    again = launch(continual_run, continual_config(cut, resume="latest", **task))
    assert again["R"] == full["R"] and again["forgetting"] == full["forgetting"]
    assert rows(cut) == rows(whole)
    a, b = final_state(cut, tmp_path), final_state(whole, tmp_path)
    assert_same(a, b)
    assert {"learner", "history", "rng", "progress"} <= set(a)
    if task["learner"] == "kv_bottleneck":
        assert {"bottleneck.keys", "bottleneck.cluster_size", "bottleneck.embed_sum"} <= set(a["learner"]["module"])
    if task["learner"] == "prompt_tpp":
        assert "model.pool.prompts" in a["learner"]["module"] and "next_ll" in again


def test_next_period_protocol_reads_the_superdiagonal():
    from continual.metrics import AccuracyMatrix

    h, r, e = AccuracyMatrix(3), AccuracyMatrix(3), AccuracyMatrix(3)
    for m, base in ((h, -1.0), (r, 10.0), (e, 0.5)):
        m.record_row(0, [base, base + 0.1, base + 0.2])
        m.record_row(1, [base + 0.3, base + 0.4, base + 0.5])
    out = continual_run.next_period(h, r, e, 1)
    assert out == {"next_ll": -0.9, "next_rmse": 10.1, "next_type_error": 0.6}
    assert continual_run.next_period(h, r, e, 0) == {}


def test_task_incremental_stream_runs_with_the_experience_given(tmp_path):
    task = dict(learner="finetune", stream="split_digits_task", epochs=2, hidden=32)
    ti = launch(continual_run, continual_config(tmp_path / "ti", every=0, **task))
    ci = launch(continual_run, continual_config(tmp_path / "ci", every=0, **{**task, "stream": "split_digits"}))
    assert ti["acc"] > ci["acc"] + 0.3  # knowing the task undoes most of class-incremental forgetting


def test_continual_preempted_mid_stream_resumes_exactly(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    full = launch(continual_run, continual_config(whole, every=0, **SMALL_DKVB))
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        patch.setattr(continual_run, "PreemptionHandler", lambda: StopAt(3))
        launch(continual_run, continual_config(cut, every=0, **SMALL_DKVB))
    assert Checkpointer(str(cut / "checkpoints")).latest().name == "step_000000003"
    again = launch(continual_run, continual_config(cut, every=0, resume="latest", **SMALL_DKVB))
    assert again["R"] == full["R"] and rows(cut) == rows(whole)


def test_active_preempted_mid_stream_resumes_exactly(tmp_path, monkeypatch):
    task = dict(strategy="randomized_variable_uncertainty", budget=0.3, log_every=50)
    whole = tmp_path / "whole"
    full = launch(active_run, active_config(whole, **task))
    assert full["samples"] == 1250 and full["labels_fraction"] <= 0.3 and (whole / "active.png").exists()
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        patch.setattr(active_run, "PreemptionHandler", lambda: StopAt(437))
        launch(active_run, active_config(cut, **task))
    assert Checkpointer(str(cut / "checkpoints")).latest().name == "step_000000437"
    again = launch(active_run, active_config(cut, resume="latest", **task))
    assert again == {**full, "png": again["png"]} and rows(cut) == rows(whole)
    a, b = final_state(cut, tmp_path), final_state(whole, tmp_path)
    assert_same(a, b)
    assert {"learner", "strategy", "prequential", "curve", "rng"} <= set(a)


def plait(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trainer", *args, "logger.progress=false"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_input_exits_2_with_one_line_naming_the_key(tmp_path):
    """Through the CLI (a subprocess each): one `plait: error:` line, exit 2, nothing of the run written."""
    cases = [
        (["task=continual", "task.stream=cifar"], "task.stream='cifar' is not a registered stream"),
        (["task=active", "task.budget=1.2"], "task.budget=1.2 is out of range; allowed: a number in (0, 1]"),
        (["task=continual", "task.splitting=chunk", "task.num_codebooks=48", "task.dim_keys=null"],
         "task.num_codebooks=48 does not divide the encoder's output width 256"),
        (["task=active", "task.strategy=entropy"], "task.strategy='entropy' is not a registered query strategy"),
    ]
    for args, words in cases:
        out = plait(*args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr[-800:])
        errors = [line for line in out.stderr.splitlines() if line.startswith("plait: error:")]
        assert len(errors) == 1 and words in errors[0], (args, out.stderr[-800:])
    written = {p.name for p in tmp_path.rglob("*") if ".hydra" not in p.parts}  # Hydra's .hydra/ and cli.log aside
    assert not written & {"metrics.jsonl", "checkpoints", "config.yaml", "continual.png", "active.png"}


def test_every_refusal_names_its_key(tmp_path):
    """The same checks in process (what the CLI runs before any rank)."""
    from trainer.errors import ConfigError

    continual_cases = [
        (dict(learner="gem"), "task.learner='gem' is not a registered learner; allowed: ewc, finetune"),
        (dict(learner="prompt_tpp"), "task.stream='split_digits' is a stream of experiences, which "
                                     "task.learner=prompt_tpp does not take; allowed: hawkes_regimes"),
        (dict(encoder="resnet"), "task.encoder='resnet' is not a registered encoder"),
        (dict(splitting="chunk", dim_keys=3), "dim_keys=3 must equal dim_embed/num_codebooks=4"),
        (dict(learner="tpp", stream="hawkes_regimes", prompt_top_n=11), "task.prompt_top_n=11 exceeds"),
        (dict(splitting="pca"), "task.splitting='pca' is not allowed"),
    ]
    for task, words in continual_cases:
        with pytest.raises(ConfigError) as err:
            continual_config(tmp_path / "c", **task)
        assert words in str(err.value), str(err.value)
    active_cases = [
        (dict(budget=0.0), "task.budget=0.0 is out of range"),
        (dict(stream="split_digits"), "task.stream='split_digits' is a stream of experiences, which task=active"),
        (dict(learner="svm"), "task.learner='svm' is not a registered online learner; allowed: logistic, mlp"),
        (dict(strategy="split", random_fraction=1.0), "task.random_fraction=1.0 is out of range"),
    ]
    for task, words in active_cases:
        with pytest.raises(ConfigError) as err:
            active_config(tmp_path / "a", **task)
        assert words in str(err.value), str(err.value)
    assert not (tmp_path / "c").exists() and not (tmp_path / "a").exists()


@pytest.mark.slow
def test_cli_runs_both_tasks(tmp_path):
    out = plait("task=continual", "task.learner=kv_bottleneck", "task.stream=gaussian_toy", "task.encoder=identity",
                "task.num_codebooks=8", "task.key_value_pairs_per_codebook=64", "task.dim_keys=2", "task.epochs=5",
                cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = tmp_path / "runs" / "continual-kv_bottleneck-gaussian_toy"
    assert (run_dir / "continual.png").exists() and (run_dir / "checkpoints" / "step_000000004" / "plait.json").exists()
    last = rows(run_dir)[-1]
    assert last["step"] == 4 and last["acc"] > 0.9
    out = plait("task=active", "task.strategy=split", "task.budget=0.1", "task.stream=sea_drift", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = tmp_path / "runs" / "active-split-sea_drift"
    assert (run_dir / "active.png").exists() and "prequential accuracy" in out.stdout
    assert rows(run_dir)[-1]["labels_fraction"] <= 0.1
