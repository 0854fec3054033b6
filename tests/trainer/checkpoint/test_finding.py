"""`checkpoint.resume` resolves the same way for runners and plait-ckpt: a step, a directory of
steps (its newest), and a requeued Slurm job's own newest step over a named older one."""

import pytest

from trainer.checkpoint import Checkpointer, CheckpointError, find_step
from trainer.checkpoint.state import Progress


@pytest.fixture
def run(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", keep_last=0)
    for step in (2, 4, 6):
        ck.save(step, {"progress": Progress(step)})
    return ck


def test_resume_a_directory_of_steps_is_its_newest(run, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert run.resolve(str(run.dir)) == run.dir / "step_000000006"
    assert find_step(run.dir) == run.dir / "step_000000006"
    other = Checkpointer(run.dir.parent / "elsewhere")
    assert other.resolve(str(run.dir)) == run.dir / "step_000000006"  # another run's directory too
    assert run.resolve(str(run.dir / "step_000000002")) == run.dir / "step_000000002"


def test_a_directory_of_only_interrupted_steps_is_refused(tmp_path):
    (tmp_path / "step_000000003").mkdir(parents=True)  # killed before its manifest
    (tmp_path / "step_000000003" / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="none of them complete"):
        Checkpointer(tmp_path / "new").resolve(str(tmp_path))


def test_a_requeued_job_resumes_from_its_own_newest_step_not_the_named_one(run, monkeypatch, capsys):
    named = str(run.dir / "step_000000002")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert run.resolve(named) == run.dir / "step_000000002"  # the first start takes what it is told
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run.resolve(named) == run.dir / "step_000000006"
    assert "requeued job" in capsys.readouterr().err
    assert run.resolve("none") == run.dir / "step_000000006"  # resume=none becomes auto


def test_a_requeued_job_keeps_a_named_step_newer_than_its_own(tmp_path, run, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    fine_tune = Checkpointer(tmp_path / "ft")
    assert fine_tune.resolve(str(run.dir / "step_000000004")) == run.dir / "step_000000004"  # none of its own
    fine_tune.save(3, {"progress": Progress(3)})
    assert fine_tune.resolve(str(run.dir / "step_000000004")) == run.dir / "step_000000004"  # its own is older
