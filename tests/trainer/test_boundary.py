"""trainer/boundary.py: the checkpoint cadence, save-then-stop on a preemption signal in one
process, and on forked gloo ranks every rank stopping at the same step whichever got the signal."""

import os
import signal

import pytest
import torch

from trainer.boundary import StepBoundary, StopAgreement
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import Progress, TensorDict
from trainer.launch.preemption import Preempted, PreemptionHandler


def steps_saved(directory) -> list[int]:
    return [int(p.name.split("_")[1]) for p in Checkpointer(str(directory)).list()]


def loop(boundary: StepBoundary, progress: Progress, weight: torch.Tensor, last: int, signal_at=None):
    """A stand-in training loop: each step adds 1 to the weight; a real SIGTERM at `signal_at`."""
    while progress.step < last:
        weight += 1
        progress.step += 1
        if progress.step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        boundary(progress.step)


def test_saves_every_n_steps_and_at_the_end(tmp_path):
    progress, weight = Progress(), torch.zeros(3)
    boundary = StepBoundary(Checkpointer(str(tmp_path), keep_last=0), {"w": TensorDict({"w": weight}),
                                                                        "progress": progress},
                            every=3, last=7, counters=lambda: {"samples": progress.step * 2}, log=lambda _: None)
    try:
        loop(boundary, progress, weight, 7)
    finally:
        boundary.close()
    assert steps_saved(tmp_path) == [3, 6, 7]
    assert boundary.due(9) and not boundary.due(8)
    no_final = StepBoundary(None, {}, every=0, last=7, save_final=False)
    assert not any(no_final.due(s) for s in range(1, 8))


def test_a_signal_saves_that_step_then_stops(tmp_path):
    progress, weight = Progress(), torch.zeros(2)
    before = signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler()
    boundary = StepBoundary(Checkpointer(str(tmp_path)), {"w": TensorDict({"w": weight}), "progress": progress},
                            every=100, last=1000, preemption=handler, log=lambda _: None)
    with pytest.raises(Preempted, match="preempted by SIGTERM at step 5"):
        try:
            loop(boundary, progress, weight, 1000, signal_at=5)
        finally:
            boundary.close()
    assert steps_saved(tmp_path) == [5]  # a single process stops at once
    restored = TensorDict({"w": torch.empty(2)})
    Checkpointer(str(tmp_path)).load(Checkpointer(str(tmp_path)).latest(), {"w": restored})
    assert restored.tensors["w"].tolist() == [5.0, 5.0]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_an_already_saved_step_is_not_saved_twice(tmp_path):
    saves = []

    class Recording(Checkpointer):
        def save(self, step, components, counters=None):
            saves.append(step)
            return super().save(step, components, counters)

    handler = PreemptionHandler()
    boundary = StepBoundary(Recording(str(tmp_path)), {"p": Progress()}, every=4, last=100,
                            preemption=handler, log=lambda _: None)
    handler.received = "SIGUSR1"
    with pytest.raises(Preempted):
        boundary(4)
    boundary.close()
    assert saves == [4]


def _ranks_stop_together(directory: str, signalled_rank: int, signal_at: int):
    import torch.distributed as dist

    progress, weight = Progress(), torch.zeros(2)
    handler = PreemptionHandler()
    boundary = StepBoundary(Checkpointer(directory), {"w": TensorDict({"w": weight}), "progress": progress},
                            every=1000, last=1000, preemption=handler, log=lambda _: None)
    assert dist.get_backend(boundary.stop.group) == "gloo"  # CPU flags never touch an NCCL group
    try:
        loop(boundary, progress, weight, 1000, signal_at=signal_at if dist.get_rank() == signalled_rank else None)
    except Preempted as stop:
        return stop.step, stop.signal_name
    finally:
        boundary.close()
    return None


def test_every_rank_stops_at_the_same_step(tmp_path, run_ranks):
    out = run_ranks(2, _ranks_stop_together, str(tmp_path), 1, 6)
    assert [step for step, _ in out] == [7, 7]  # the reduction started at step 6 is read at step 7
    assert out[1][1] == "SIGTERM" and out[0][1] == "a signal on another rank"
    assert steps_saved(tmp_path) == [7]


def test_one_process_agrees_without_collectives():
    handler = PreemptionHandler()
    try:
        agreement = StopAgreement(handler)
        assert agreement.group is None and agreement.agreed() is None
        handler.received = "SIGTERM"
        assert agreement.agreed() == "SIGTERM"
        assert StopAgreement(None).agreed() is None
    finally:
        handler.restore()
