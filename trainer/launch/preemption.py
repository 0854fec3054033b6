"""Preemption: a signal (SIGTERM, SIGUSR1, or SIGUSR2 that submitit asks Slurm for) makes the run save
at the next step boundary and exit with EXIT_REQUEUE, after asking Slurm to requeue the job; the
requeued job (SLURM_RESTART_COUNT > 0) resumes from the latest checkpoint by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Optional


EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: "try again later"; clusters can set RequeueExit=75
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # USR2: submitit's warning, 90 s before the time limit


class Preempted(Exception):
    """Raised at a step boundary after the checkpoint of a preempted run is safely written."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted by {signal_name} at step {step}")
        self.step, self.signal_name = step, signal_name


class PreemptionHandler:
    """Records that a preemption signal arrived; the loop acts on it at the next step boundary, where
    the ranks agree on it (trainer/boundary.py)."""

    def __init__(self, signals: tuple[str, ...] = SIGNALS):
        self.received: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def requeue_slurm_job() -> bool:
    """Ask Slurm to requeue this job (rank 0 only); False when not under Slurm or refused."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job or int(os.environ.get("RANK", "0")) != 0:
        return False
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"plait: scontrol requeue {job} failed: {out.stderr.strip()}", file=sys.stderr)
    return out.returncode == 0


def requeued() -> bool:
    """This process belongs to a job Slurm has requeued (it should resume, not start over)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
