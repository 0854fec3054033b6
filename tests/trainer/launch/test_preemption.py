"""Preemption: a signal saves at the next step boundary, exits 75, and the resumed run continues
exactly where an uninterrupted one would be."""

import json
import signal

import pytest

from plait_testing import logged as losses, plait_process
from trainer.launch.preemption import EXIT_REQUEUE


def start(tmp_path, *args):
    return plait_process(*args, cwd=tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_exits_75_and_resume_is_exact(tmp_path, sig):
    steps = ["trainer.max_steps=60", "checkpoint.every=1000"]
    proc = start(tmp_path, *steps, "name=cut")
    for line in proc.stdout:
        if line.startswith("step") and "loss" in line and int(line.split()[1]) >= 5:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    assert "preempted by" in err and "checkpoint saved" in err
    cut = tmp_path / "runs" / "cut"
    latest = (cut / "checkpoints" / "latest").read_text().strip()
    saved = json.loads((cut / "checkpoints" / latest / "plait.json").read_text())
    k = saved["counters"]["step"]
    assert 5 <= k < 60
    before = losses(cut)
    assert max(before) == k  # stopped at the boundary it saved
    resumed = start(tmp_path, *steps, "name=cut", "checkpoint.resume=latest")
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()[-2000:]
    whole = start(tmp_path, *steps, "name=whole")
    assert whole.wait(timeout=180) == 0
    after, reference = losses(cut), losses(tmp_path / "runs" / "whole")
    assert sorted(after) == list(range(1, 61))
    assert after == reference


def test_cli_refuses_a_damaged_checkpoint_with_exit_2(tmp_path):
    ok = start(tmp_path, "trainer.max_steps=2", "name=a")
    assert ok.wait(timeout=120) == 0
    step = tmp_path / "runs" / "a" / "checkpoints" / "step_000000002"
    shard = max(step.glob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    bad = start(tmp_path, "trainer.max_steps=3", "name=a", "checkpoint.resume=latest")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2, err[-2000:]
    assert "bad checkpoint" in err and shard.name in err and "truncated" in err
