"""What happens between two steps of any loop: LM optimizer steps, environment steps of a
streaming learner, RLHF iterations, federated rounds, continual experiences.

At each boundary `StepBoundary(step)`: a checkpoint every `every` steps and at the last one, a
finished background save completed, and a preemption signal turned into save-then-stop at the same
step on every rank. `close()` at the end finishes a background save and restores signal handlers.

Agreeing on a stop costs no host sync of the training stream: the flag is a CPU tensor reduced on
a gloo group of its own, asynchronously; the reduction started at step s is read at step s+1, by
when it has long arrived. Every rank reads the same reduction at the same step, so all of them
stop at the same step, one step after the first signal (a single process stops at once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from trainer.checkpoint import Checkpointer
from trainer.launch.preemption import Preempted, PreemptionHandler

OTHER_RANK = "a signal on another rank"


class StopAgreement:
    """Whether any rank has received a preemption signal, agreed without blocking the loop."""

    def __init__(self, preemption: Optional[PreemptionHandler], group: Optional[dist.ProcessGroup] = None):
        self.preemption = preemption
        self.distributed = preemption is not None and dist.is_initialized() and dist.get_world_size() > 1
        # A group of its own: a reduction in flight must never interleave with another collective
        # (a background checkpoint's, the loop's), and gloo takes CPU tensors whatever the device.
        self.group = (group or dist.new_group(backend="gloo")) if self.distributed else None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._work: Optional[dist.Work] = None

    def agreed(self) -> Optional[str]:
        """The signal's name once every rank knows of one, else None (call once per step)."""
        if self.preemption is None:
            return None
        if not self.distributed:
            return self.preemption.received
        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._flag.item())
        self._flag.fill_(1 if self.preemption.received else 0)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if not stop:
            return None
        if self.preemption.received is None:
            self.preemption.received = OTHER_RANK
        return self.preemption.received

    def close(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None


class StepBoundary:
    """Checkpoint cadence, background-save completion and preemption of one loop.

    `counters()` gives the manifest's counters besides the step (samples, tokens, episodes, ...);
    `log` prints a line (the run's MetricLogger.text)."""

    def __init__(self, checkpointer: Optional[Checkpointer], components: dict[str, Stateful], *,
                 every: int, last: int, save_final: bool = True, counters: Callable[[], dict] = dict,
                 log: Callable[[str], None] = print, preemption: Optional[PreemptionHandler] = None,
                 saved_at: int = -1, stop_group: Optional[dist.ProcessGroup] = None):
        self.checkpointer, self.components = checkpointer, components
        self.every, self.last, self.save_final = every, last, save_final
        self.counters, self.log = counters, log
        self.preemption = preemption
        self.stop = StopAgreement(preemption, stop_group)
        self.saved_at = saved_at  # the step whose checkpoint exists (a resumed run's start)

    def due(self, step: int) -> bool:
        return bool((self.every and step % self.every == 0) or (step == self.last and self.save_final))

    def save(self, step: int) -> Optional[Path]:
        if self.checkpointer is None:
            return None
        path = self.checkpointer.save(step, self.components, counters=self.counters())
        self.saved_at = step
        background = " (writing in the background)" if self.checkpointer.async_save else ""
        self.log(f"checkpoint: {path}{background}")
        return path

    def __call__(self, step: int) -> bool:
        """At the boundary after `step`; returns whether it saved. Raises `Preempted` once the
        run's state at `step` is on disk, when a preemption signal has reached every rank."""
        saved = self.due(step)
        if saved:
            self.save(step)
        elif self.checkpointer is not None:
            self.checkpointer.poll()
        signal = self.stop.agreed()
        if signal is not None:
            if self.saved_at != step:
                self.save(step)
            if self.checkpointer is not None:
                self.checkpointer.wait()
            raise Preempted(step, signal)
        return saved

    def close(self) -> None:
        """The loop is over (or stopping): finish a background save, release signal handlers."""
        try:
            self.stop.close()
            if self.checkpointer is not None:
                self.checkpointer.close()
        finally:
            if self.preemption is not None:
                self.preemption.restore()
