"""Which rank of a local launch failed first, and why, in words a user can act on.

torch's elastic agent reports the first failure it happens to *observe*: when one rank is killed
(the kernel's OOM killer sends SIGKILL), its peers fail their next collective milliseconds later
and the agent may name one of them, with a "connection reset by peer" traceback that hides the
cause. So the launcher watches every rank's end itself (`ExitWatch`) and blames the rank that
failed on its own (`root_cause`); `report` says which rank, how it ended and what to check.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer.atomic import write_text_atomic

# What stops a run from outside (the agent's own SIGTERM to the survivors, Ctrl-C, a hang-up):
# a rank that ended so did not fail on its own.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Ranks that end within this long of the first failure ended before the agent could stop them
# (it polls every 0.1 s, then waits a grace period before SIGKILL): they are the candidates.
REACTION_S = 1.0


@dataclass
class RankExit:
    local_rank: int
    pid: int
    exitcode: int  # negative: killed by that signal (multiprocessing's convention)
    error_file: str = ""  # torch elastic's per-rank error file ("" or absent: none written)
    seen_ns: int = 0  # wall-clock time (time.time_ns) the launcher saw the rank end

    @property
    def signal(self) -> Optional[signal.Signals]:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode)
        except ValueError:
            return None

    def error_data(self) -> Optional[Any]:
        """The JSON the rank recorded when it raised (torch elastic's `record`), or None."""
        try:
            return json.loads(Path(self.error_file).read_text()) if self.error_file else None
        except (OSError, ValueError):
            return None

    def error_ns(self) -> Optional[int]:
        """When the rank recorded its error (the file's mtime, ns), or None if it recorded none."""
        try:
            return os.stat(self.error_file).st_mtime_ns if self.error_file else None
        except OSError:
            return None


# --------------------------------------------------------------------------- reading records


def recorded_traceback(data: Any) -> Optional[str]:
    """The traceback in a torch elastic error record, whatever its shape: `{"message": {"message":
    str, "extraInfo": {"py_callstack": str}}}` (a Python exception), `{"message": str}` (a plain
    message; "<NONE>" when the rank wrote no file, as after a signal), a bare string, or None."""
    if isinstance(data, dict):
        data = data.get("message")
    if isinstance(data, dict):
        extra = data.get("extraInfo")
        stack = extra.get("py_callstack") if isinstance(extra, dict) else None
        data = stack if isinstance(stack, str) and stack.strip() else data.get("message")
    if isinstance(data, str) and data.strip() and data.strip() not in ("<NONE>", "<N/A>"):
        return data.rstrip()
    return None


def from_elastic(failures: dict) -> list[RankExit]:
    """The ranks torch elastic's ChildFailedError names (`err.failures`: global rank ->
    ProcessFailure), as RankExits; its `timestamp` (seconds) stands in for the time seen."""
    return [RankExit(local_rank=f.local_rank, pid=f.pid, exitcode=f.exitcode,
                     error_file=f.error_file if os.path.isfile(f.error_file) else "",
                     seen_ns=int(f.timestamp) * 10**9)
            for _, f in sorted(failures.items())]


# --------------------------------------------------------------------------- blame


def _on_its_own(e: RankExit) -> int:
    """0: killed by a signal no peer sends (SIGKILL, SIGSEGV, ...); 1: an error or exit code;
    2: stopped from outside."""
    if e.signal is None:
        return 1
    return 2 if e.signal in STOP_SIGNALS else 0


def root_cause(exits: list[RankExit]) -> RankExit:
    """The rank that failed on its own: among those that failed within REACTION_S of the first,
    one killed by a signal no peer sends (first seen), else the first to record an error, else
    the first seen to exit non-zero."""
    failed = [e for e in exits if e.exitcode != 0]
    if not failed:
        raise ValueError("no rank failed")
    first = min(e.seen_ns for e in failed)
    early = [e for e in failed if e.seen_ns - first <= REACTION_S * 1e9]
    return min(early, key=lambda e: (_on_its_own(e), e.error_ns() or e.seen_ns, e.local_rank))


def how_it_ended(e: RankExit) -> str:
    sig = e.signal
    if sig is not None:
        return f"was killed by {sig.name} (signal {int(sig)})"
    if e.exitcode < 0:
        return f"was killed by signal {-e.exitcode}"
    return f"failed with exit code {e.exitcode}"


def hint(e: RankExit) -> str:
    sig = e.signal
    if sig == signal.SIGKILL:
        return ("out of memory? The kernel's OOM killer ends a process with SIGKILL (`dmesg` or the "
                "job's memory limit says); a smaller batch or more sharding lowers the memory per rank")
    if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
        return "a crash in native code (a C++/CUDA extension or driver); its output above may say more"
    if sig in STOP_SIGNALS:
        return "it was stopped from outside (Ctrl-C, a scheduler, or `kill`)"
    return ""


def report(exits: list[RankExit]) -> str:
    """What a user reads when a local launch fails: the rank to blame, how it ended, what to
    check, its traceback if it recorded one, and how the others ended."""
    root = root_cause(exits)
    lines = [f"plait: error: rank {root.local_rank} (pid {root.pid}) {how_it_ended(root)}"
             + (f": {hint(root)}" if hint(root) else "")]
    if root.signal is None:
        trace = recorded_traceback(root.error_data())
        lines.append(f"rank {root.local_rank}'s traceback:\n{trace}" if trace else
                     f"(rank {root.local_rank} recorded no traceback; see its output above)")
    others = sorted((e for e in exits if e is not root and e.exitcode), key=lambda e: e.local_rank)
    if others:
        lines.append("after it: " + "; ".join(f"rank {e.local_rank} {how_it_ended(e)}" for e in others))
    return "\n".join(lines)


# --------------------------------------------------------------------------- watching


def announce(watch_dir: str, local_rank: int) -> None:
    """In a rank, first thing: tell the launcher's ExitWatch this process's pid and error file."""
    record = {"pid": os.getpid(), "error_file": os.environ.get("TORCHELASTIC_ERROR_FILE", "")}
    write_text_atomic(Path(watch_dir) / f"{local_rank}.json", json.dumps(record))  # never half a record


class ExitWatch:
    """The launcher's view of how each of its ranks ended, as the kernel reports it.

    Each rank `announce`s itself into `dir`; a thread per rank then blocks in
    `waitid(WEXITED | WNOWAIT)`, which returns when the rank ends but leaves its exit status for
    the agent to collect, so the agent works exactly as without the watch.
    """

    def __init__(self, poll_s: float = 0.02):
        self.dir = tempfile.mkdtemp(prefix="plait-ranks-")
        self.exits: dict[int, RankExit] = {}
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._scanner = threading.Thread(target=self._scan, name="plait-exit-watch", daemon=True)

    def __enter__(self) -> "ExitWatch":
        self._scanner.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._scanner.join(timeout=5)
        for path in Path(self.dir).glob("*"):
            path.unlink(missing_ok=True)
        os.rmdir(self.dir)

    def _scan(self) -> None:
        watched: set[str] = set()
        while True:
            stopping = self._stop.is_set()  # one last look after the launch returned
            for path in Path(self.dir).glob("*.json"):
                if path.name in watched:
                    continue
                watched.add(path.name)
                record = json.loads(path.read_text())
                threading.Thread(target=self._wait, args=(int(path.stem), record), daemon=True,
                                 name=f"plait-exit-watch-{path.stem}").start()
            if stopping:
                return
            self._stop.wait(self._poll_s)

    def _wait(self, local_rank: int, record: dict) -> None:
        try:
            info = os.waitid(os.P_PID, record["pid"], os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # the agent collected it first: its own record will say
            return
        seen = time.time_ns()
        if info is None:
            return
        killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
        exit_ = RankExit(local_rank=local_rank, pid=record["pid"],
                         exitcode=-info.si_status if killed else info.si_status,
                         error_file=record.get("error_file", ""), seen_ns=seen)
        with self._lock:
            self.exits[local_rank] = exit_

    def failures(self, elastic_failures: Optional[dict] = None) -> list[RankExit]:
        """Every rank seen to end, plus any that torch elastic names and the watch missed."""
        with self._lock:
            seen = dict(self.exits)
        for e in from_elastic(elastic_failures or {}):
            seen.setdefault(e.local_rank, e)
        return [seen[r] for r in sorted(seen)]
