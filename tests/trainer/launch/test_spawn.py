"""trainer/launch/spawn.py and failures.py: Plait's own local ranks, and when one fails, the rank
to blame, how it ended and what to check, never a crash of the report itself. A rank killed by a
signal (the kernel's OOM killer sends SIGKILL) is named with the signal and "out of memory?"."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import time

import psutil
import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

import trainer.pretrain
from plait_testing import plait_process
from trainer.errors import EXIT_BAD_INPUT, ConfigError
from trainer.launch.failures import (REACTION_S, ExitWatch, RankExit, announce, from_elastic, recorded_traceback,
                                     report, root_cause)
from trainer.launch.spawn import EXIT_RANK_FAILED, spawn_local

S = 10**9  # ns
TRACE = "Traceback (most recent call last):\n  File \"x.py\", line 1\nZeroDivisionError: boom"


# --------------------------------------------------------------------------- the error record's shapes


@pytest.mark.parametrize("data, trace", [
    ({"message": {"message": "ZeroDivisionError: boom", "extraInfo": {"py_callstack": TRACE, "timestamp": "1"}}},
     TRACE),  # a Python exception, as `record` writes it
    ({"message": {"message": "ZeroDivisionError: boom", "extraInfo": {"timestamp": "1"}}}, "ZeroDivisionError: boom"),
    ({"message": {"message": "boom"}}, "boom"),
    ({"message": {"extraInfo": "not a dict"}}, None),
    ({"message": "a plain message", "timestamp": 3}, "a plain message"),
    ({"message": "<NONE>"}, None),  # what torch elastic holds for a rank that wrote no file (a signal)
    ({"message": {"message": "<N/A>", "extraInfo": {"py_callstack": "  "}}}, None),
    ({}, None), ("a bare string", "a bare string"), (None, None), ([1, 2], None),
])
def test_every_shape_of_an_error_record_reads_without_crashing(data, trace):
    assert recorded_traceback(data) == trace


def test_elastic_failures_of_every_kind_become_a_report(tmp_path):
    """torch's own ProcessFailure: a signal (no error file: its message is the string "<NONE>",
    which crashed the old report) and a recorded exception."""
    error_file = tmp_path / "error.json"
    error_file.write_text(json.dumps({"message": {"message": "boom", "extraInfo": {"py_callstack": TRACE,
                                                                                  "timestamp": "1"}}}))
    killed = ProcessFailure(local_rank=1, pid=4242, exitcode=-9, error_file=str(tmp_path / "none.json"))
    raised = ProcessFailure(local_rank=0, pid=4241, exitcode=1, error_file=str(error_file))
    assert isinstance(killed.error_file_data["message"], str)
    text = report(from_elastic({1: killed}))
    assert text.startswith("plait: error: rank 1 (pid 4242) was killed by SIGKILL (signal 9): out of memory?")
    text = report(from_elastic({0: raised}))
    assert text.startswith("plait: error: rank 0 (pid 4241) failed with exit code 1\nrank 0's traceback:\n" + TRACE)


# --------------------------------------------------------------------------- blame


def _error_file(tmp_path, name: str, at_ns: int) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"message": {"message": name, "extraInfo": {"py_callstack": f"Traceback: {name}"}}}))
    os.utime(path, ns=(at_ns, at_ns))
    return str(path)


def test_a_killed_rank_is_blamed_not_the_peer_whose_collective_then_failed(tmp_path):
    t = time.time_ns()
    peer = RankExit(0, 100, 1, _error_file(tmp_path, "connection reset by peer", t - S // 100), seen_ns=t)
    killed = RankExit(1, 101, -signal.SIGKILL, seen_ns=t + S // 100)  # seen later, but it started it
    assert root_cause([peer, killed]) is killed
    text = report([peer, killed])
    assert "rank 1 (pid 101) was killed by SIGKILL (signal 9): out of memory?" in text
    assert "after it: rank 0 failed with exit code 1" in text and "connection reset" not in text


def test_ranks_the_launcher_stopped_are_not_blamed(tmp_path):
    t = time.time_ns()
    crashed = RankExit(1, 101, 1, _error_file(tmp_path, "ValueError", t), seen_ns=t)
    stopped = RankExit(0, 100, -signal.SIGTERM, seen_ns=t + S // 10)
    escalated = RankExit(2, 102, -signal.SIGKILL, seen_ns=t + 30 * S)  # the agent's SIGKILL after its grace
    assert root_cause([stopped, escalated, crashed]) is crashed
    assert REACTION_S < 30


def test_of_two_errors_the_first_recorded_is_blamed(tmp_path):
    t = time.time_ns()
    first = RankExit(1, 101, 1, _error_file(tmp_path, "first", t), seen_ns=t + S // 10)
    second = RankExit(0, 100, 1, _error_file(tmp_path, "second", t + S // 20), seen_ns=t)
    assert root_cause([second, first]) is first
    assert "rank 1's traceback:\nTraceback: first" in report([second, first])


def test_native_crashes_and_unrecorded_exits_are_said_as_such():
    assert "a crash in native code" in report([RankExit(0, 7, -signal.SIGSEGV, seen_ns=1)])
    assert "recorded no traceback" in report([RankExit(0, 7, 3, seen_ns=1)])
    with pytest.raises(ValueError):
        root_cause([RankExit(0, 7, 0, seen_ns=1)])


# --------------------------------------------------------------------------- watching the ranks' ends


def _announce_then(watch_dir: str, how: str) -> None:
    announce(watch_dir, 0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


@pytest.mark.parametrize("how, exitcode", [("kill", -signal.SIGKILL), ("exit", 3)])
def test_the_watch_sees_how_a_rank_ended_and_leaves_its_status_to_the_agent(how, exitcode):
    with ExitWatch() as watch:
        proc = mp.get_context("fork").Process(target=_announce_then, args=(watch.dir, how))
        proc.start()
        deadline = time.monotonic() + 60
        while 0 not in watch.exits and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.join()
    assert proc.exitcode == exitcode  # multiprocessing (the agent) still collects the status
    seen = watch.exits[0]
    assert (seen.local_rank, seen.pid, seen.exitcode) == (0, proc.pid, exitcode)
    assert not os.path.exists(watch.dir)


# --------------------------------------------------------------------------- spawn_local end to end


def _failing_on_rank_1(error: BaseException):
    def run(cfg, env):
        if env.rank == 1:
            raise error
        import torch.distributed as dist

        dist.barrier()  # rank 0 waits in a collective for the rank that fails
    return run


def test_a_rank_that_raises_is_blamed_with_its_traceback(tiny_cfg, monkeypatch, capfd):
    monkeypatch.setattr(trainer.pretrain, "run", _failing_on_rank_1(ZeroDivisionError("a bug on rank 1")))
    with pytest.raises(SystemExit) as stop:
        spawn_local(2, tiny_cfg("parallel.dp_shard=2"))
    assert stop.value.code == EXIT_RANK_FAILED
    err = capfd.readouterr().err
    assert re.search(r"plait: error: rank 1 \(pid \d+\) failed with exit code 1\nrank 1's traceback:\n"
                     r"Traceback \(most recent call last\):\n", err), err
    assert "ZeroDivisionError: a bug on rank 1" in err and err.count("Traceback") == 1, err


def test_bad_input_found_inside_a_rank_exits_2(tiny_cfg, monkeypatch, capfd):
    monkeypatch.setattr(trainer.pretrain, "run", _failing_on_rank_1(ConfigError("task.widgets=3 must be even")))
    with pytest.raises(SystemExit) as stop:
        spawn_local(2, tiny_cfg("parallel.dp_shard=2"))
    assert stop.value.code == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert "plait: error: [rank 1] bad config: task.widgets=3 must be even" in err and "Traceback" not in err, err


def _rank_pids(launcher: psutil.Process, world: int, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = launcher.children()
        if len(ranks) == world:
            return ranks
        time.sleep(0.1)
    raise AssertionError(f"the launcher has {len(launcher.children())} children, not {world} ranks")


def _wait_for_a_step(proc, metrics, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and '"loss"' in metrics.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first step:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no step logged")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_rank_killed_by_sigkill_is_named_with_the_signal_and_memory(tmp_path, victim):
    proc = plait_process("parallel.dp_shard=2", "trainer.max_steps=100000", "name=killed", cwd=tmp_path)
    try:
        _wait_for_a_step(proc, tmp_path / "runs" / "killed" / "metrics.jsonl")
        ranks = sorted(_rank_pids(psutil.Process(proc.pid), 2), key=lambda p: p.pid)
        killed = ranks[victim]
        killed.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert re.search(rf"plait: error: rank [01] \(pid {killed.pid}\) was killed by SIGKILL \(signal 9\): "
                     "out of memory\\?", err), err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # neither the launcher's nor the agent's, nor the peer's


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_exits_2_from_spawned_ranks_without_a_traceback(tmp_path):
    proc = plait_process("parallel.dp_shard=2", "trainer.max_steps=2", "device=cuda", cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("plait: error:")]
    assert errors and all("device=cuda but CUDA is not available" in line for line in errors), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
