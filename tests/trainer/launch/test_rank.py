"""trainer/launch/rank.py: the entry point of every rank. Bad input found inside a rank (while
validating, choosing the device, or in the task) is one `plait: error:` line and exit 2, never a
traceback; a preempted run exits 75; accelerate's choices are validated like the command line's."""

from __future__ import annotations

import contextlib
import io

import pytest
from omegaconf import OmegaConf

import trainer.pretrain
from trainer.checkpoint import CheckpointError
from trainer.errors import EXIT_BAD_INPUT, ConfigError
from trainer.launch import distributed
from trainer.launch.accelerate import accelerate_overrides
from trainer.launch.preemption import EXIT_REQUEUE, Preempted
from trainer.launch.rank import run_rank
from trainer.task import resolve_target

# torch elastic's `record` enables faulthandler on sys.stderr, which these tests capture in a StringIO
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


@pytest.mark.parametrize("target, words", [
    ("run", ["not a module.function path"]),
    (".run", ["not a module.function path"]),
    ("trainer.no_such_module.run", ["cannot be imported", "trainer.no_such_module"]),
    ("trainer.pretrain.no_such_runner", ["cannot be imported", "no_such_runner"]),
    ("..pretrain.run", ["cannot be imported"]),
    ("trainer.launch.distributed.PG_TIMEOUT", ["is a timedelta, not a runner function"]),
])
def test_a_target_that_names_no_runner_is_a_config_error(target, words):
    with pytest.raises(ConfigError) as err:
        resolve_target(target)
    assert f"task._target_={target!r}" in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_target_resolves_to_its_runner():
    assert resolve_target("trainer.pretrain.run") is trainer.pretrain.run


def _exit_of_run_rank(cfg: dict) -> tuple:
    """run_rank's exit status and what it printed on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run_rank(cfg)
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue()


def _raises(error: BaseException):
    def runner(cfg, env):
        raise error
    return runner


def test_cuda_on_a_machine_without_it_is_one_line_and_exit_2(tiny_cfg, monkeypatch):
    monkeypatch.setattr(distributed, "cuda_available", lambda: False)
    code, err = _exit_of_run_rank(tiny_cfg("device=cuda"))
    assert code == EXIT_BAD_INPUT
    assert err.splitlines() == [
        "plait: error: bad config: device=cuda but CUDA is not available on this machine; allowed here: auto, cpu"]


def test_a_config_error_inside_the_task_names_each_rank_and_exits_2(tiny_cfg, run_ranks, monkeypatch):
    monkeypatch.setattr(trainer.pretrain, "run", _raises(ConfigError("task.widgets=3 must be even")))
    results = run_ranks(2, _exit_of_run_rank, tiny_cfg("parallel.dp_shard=2"), init_pg=False)
    assert results == [(EXIT_BAD_INPUT, f"plait: error: [rank {r}] bad config: task.widgets=3 must be even\n")
                       for r in range(2)]


def test_a_config_error_in_one_process_has_no_rank_prefix(tiny_cfg, monkeypatch):
    monkeypatch.setattr(trainer.pretrain, "run", _raises(ConfigError("data.source: too small for one batch")))
    assert _exit_of_run_rank(tiny_cfg()) == (
        EXIT_BAD_INPUT, "plait: error: bad config: data.source: too small for one batch\n")


def test_a_bad_checkpoint_exits_2(tiny_cfg, monkeypatch):
    monkeypatch.setattr(trainer.pretrain, "run", _raises(CheckpointError("step_000000004: plait.json is missing")))
    assert _exit_of_run_rank(tiny_cfg()) == (
        EXIT_BAD_INPUT, "plait: error: bad checkpoint: step_000000004: plait.json is missing\n")


def test_a_preempted_run_exits_75(tiny_cfg, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(trainer.pretrain, "run", _raises(Preempted(5, "SIGTERM")))
    code, err = _exit_of_run_rank(tiny_cfg())
    assert code == EXIT_REQUEUE
    assert err == f"plait: preempted by SIGTERM at step 5; checkpoint saved; exiting {EXIT_REQUEUE}\n"


def test_any_other_error_is_not_bad_input(tiny_cfg, monkeypatch):
    monkeypatch.setattr(trainer.pretrain, "run", _raises(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        run_rank(tiny_cfg())


def test_accelerate_bf16_cannot_bypass_the_zero3_refusal(tiny_cfg, monkeypatch):
    zero3 = tiny_cfg("parallel.dp_backend=deepspeed", "parallel.zero_stage=3")  # valid in fp32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    code, err = _exit_of_run_rank(zero3)
    assert code == EXIT_BAD_INPUT
    assert err.startswith("plait: error: bad config: trainer.precision=bf16 with parallel.dp_backend=deepspeed "
                          "parallel.zero_stage=3") and len(err.splitlines()) == 1


def test_accelerate_overrides_apply_to_a_copy(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    raw = {"device": "auto", "trainer": {"precision": "fp32", "max_steps": 3}}
    assert accelerate_overrides(raw) == {"device": "cpu", "trainer": {"precision": "bf16", "max_steps": 3}}
    assert raw == {"device": "auto", "trainer": {"precision": "fp32", "max_steps": 3}}
    # a choice the user made on the command line stays; a task without a trainer section gets none
    assert accelerate_overrides({"device": "cuda:1", "trainer": {"precision": "bf16"}})["device"] == "cuda:1"
    assert accelerate_overrides({"task": {"name": "x"}}) == {"task": {"name": "x"}, "device": "cpu"}
    # a DictConfig (the CLI's composed config) keeps its interpolations for validation to resolve
    composed = OmegaConf.create({"name": "${task.name}", "task": {"name": "t"}, "trainer": {"precision": "fp32"}})
    assert accelerate_overrides(composed) == {"name": "${task.name}", "task": {"name": "t"}, "device": "cpu",
                                              "trainer": {"precision": "bf16"}}


def test_accelerate_without_its_variables_changes_nothing(monkeypatch):
    for key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    raw = {"device": "auto", "trainer": {"precision": "fp32"}}
    assert accelerate_overrides(raw) == raw


def test_an_unsupported_accelerate_precision_is_said_once_and_ignored(monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    monkeypatch.delenv("RANK", raising=False)
    for _ in range(2):
        assert accelerate_overrides({"trainer": {"precision": "fp32"}}) == {"trainer": {"precision": "fp32"}}
    assert capsys.readouterr().err.splitlines() == [
        "plait: ACCELERATE_MIXED_PRECISION=fp8 is not supported; training in trainer.precision=fp32 "
        "(allowed: no, bf16)"]
