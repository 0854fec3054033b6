"""Slurm submission (`launcher=slurm`): a function run in every task of one sbatch job through
submitit, waited for without sacct, and a failed job reported with the rank to blame, its
traceback or last log lines, and srun's verdicts. Each task finds the others through
trainer/launch/slurm_env.py."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.config import ConfigError, LauncherConfig
from trainer.launch.slurm_env import RENDEZVOUS_VARS

# A failing rank takes the others down at once instead of leaving them blocked in a collective.
SRUN_ARGS = ("--kill-on-bad-exit=1",)
# sbatch options that submitit and this module set themselves; sbatch_extra may not override them.
MANAGED_OPTIONS = {"nodes", "ntasks", "ntasks_per_node", "output", "error", "job_name", "array"}
FINISHED_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
}
# submitit asks Slurm for SIGUSR2 this long before the time limit (preemption.py saves on it), but
# Slurm may send it up to 60 s early ("resolution of event handling", sbatch(1) --signal): under a
# 2-minute limit a 90 s warning can arrive while Python is still starting and kill the task.
SIGNAL_DELAY_S, SIGNAL_SLACK_S = 90, 60
RESULT_GRACE_S = 15.0  # after Slurm says the job ended, how long result files may lag (shared FS)


class SlurmError(RuntimeError):
    """Slurm is missing, refused the job, or the job failed; the message says which and where."""


class SlurmJobFailed(SlurmError):
    """The job ended without a result from every task; `job_id`, `state`, `logs` say where to look."""

    def __init__(self, message: str, job_id: str, state: str, logs: list[str]):
        super().__init__(message)
        self.job_id, self.state, self.logs = job_id, state, logs


# --------------------------------------------------------------------------- submission


def tasks_per_node(launcher: LauncherConfig, world_size: int) -> int:
    """launcher.tasks_per_node, or the world size spread evenly over launcher.nodes."""
    nodes = launcher.nodes
    if nodes < 1:
        raise ConfigError(f"launcher.nodes={nodes} must be >= 1")
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    if launcher.tasks_per_node:
        if launcher.tasks_per_node * nodes != world_size:
            raise ConfigError(
                f"launcher.nodes={nodes} x launcher.tasks_per_node={launcher.tasks_per_node} = "
                f"{nodes * launcher.tasks_per_node} tasks, but the run needs world size {world_size}; "
                "set launcher.tasks_per_node=0 to derive it"
            )
        return launcher.tasks_per_node
    if world_size % nodes:
        raise ConfigError(
            f"world size {world_size} does not split evenly over launcher.nodes={nodes}; "
            f"choose nodes dividing {world_size}, or a world size that is a multiple of {nodes}"
        )
    return world_size // nodes


def signal_delay_s(timeout_min: int) -> int:
    """Seconds of warning before the time limit: 90, shortened under short limits so that even
    60 s early the signal comes no sooner than 30 s into the job."""
    return max(1, min(SIGNAL_DELAY_S, timeout_min * 60 - SIGNAL_SLACK_S - 30))


def sbatch_parameters(launcher: LauncherConfig, job_name: str, world_size: int) -> dict[str, Any]:
    """submitit.SlurmExecutor parameters (sbatch's own names) for this launcher config."""
    # a false or null value leaves the option out (`exclusive: false`); true is a bare flag
    extra = {str(k): v for k, v in dict(launcher.sbatch_extra or {}).items()
             if v is not None and v is not False}
    clash = sorted(k for k in extra if k.replace("-", "_") in MANAGED_OPTIONS)
    if clash:
        raise ConfigError(
            f"launcher.sbatch_extra sets {', '.join(clash)}, which Plait sets itself; use "
            "launcher.nodes / launcher.tasks_per_node (names and log paths come from the run)"
        )
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": launcher.nodes,
        "ntasks_per_node": tasks_per_node(launcher, world_size),
        "cpus_per_task": launcher.cpus_per_task,
        "time": launcher.timeout_min,
        "signal_delay_s": signal_delay_s(launcher.timeout_min),
        "srun_args": list(SRUN_ARGS),
    }
    optional = {
        "gpus_per_node": launcher.gpus_per_node or None,
        "mem": f"{launcher.mem_gb}GB" if launcher.mem_gb else None,
        "partition": launcher.partition or None,
        "account": launcher.account or None,
        "qos": launcher.qos or None,
        "setup": [f"unset {' '.join(RENDEZVOUS_VARS)}", *launcher.setup],
        "additional_parameters": extra or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _submit_command(folder: str) -> str:
    # what submitit.SlurmExecutor runs in every task (its `_submitit_command_str`)
    folder = shlex.quote(str(Path(folder).expanduser().absolute()))
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {folder}"


def sbatch_script(launcher: LauncherConfig, folder: str, job_name: str, world_size: int) -> str:
    """The sbatch script `submit` would hand to sbatch (launcher.dry_run); needs no Slurm."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(launcher, job_name, world_size)
    return _make_sbatch_string(command=_submit_command(folder), folder=folder, **params)


def require_slurm() -> None:
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise SlurmError(
            f"launcher=slurm needs Slurm's client tools, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH: run on a login node of your cluster "
            "(or load its slurm module; Debian/Ubuntu: apt-get install slurm-client). "
            "launcher.dry_run=true prints the sbatch script without Slurm; "
            "`bash .ci/slurm.sh` starts a local two-node test cluster."
        )


def submit(launcher: LauncherConfig, fn: Callable, args: tuple, folder: str, job_name: str,
           world_size: int):
    """Submit `fn(*args)` to run in every task of one sbatch job; returns the submitit.Job.

    `fn` is pickled by reference: it must be a module-level function importable in the job (the
    job runs this interpreter, `sys.executable`). Inside, it calls `apply_slurm_env()` before
    `init_process_group`.
    """
    require_slurm()
    import submitit

    params = sbatch_parameters(launcher, job_name, world_size)
    executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(sys.executable))
    executor.update_parameters(**params)
    echoed = io.StringIO()  # submitit prints sbatch's stderr itself; say it once, in the error
    try:
        with contextlib.redirect_stderr(echoed):
            return executor.submit(fn, *args)
    except submitit.core.utils.FailedJobError as err:
        # sbatch refused the job (unknown partition, too many nodes, bad option): its own words
        raise SlurmError(f"sbatch did not accept the job:\n{str(err).strip()}") from None
    finally:
        if echoed.getvalue() and sys.exc_info()[0] is None:
            sys.stderr.write(echoed.getvalue())


# --------------------------------------------------------------------------- waiting


def job_state(job_id: str) -> tuple[str, str]:
    """(JobState, ExitCode) from slurmctld, which knows a job until MinJobAge after its end; then
    ('GONE', ''). ('UNKNOWN', '') when slurmctld does not answer. Works without accounting, unlike
    sacct, which submitit polls and which then reports UNKNOWN forever."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                              text=True, timeout=30)
    except (subprocess.SubprocessError, OSError):
        return "UNKNOWN", ""
    if "Invalid job id" in proc.stderr:
        return "GONE", ""
    state = re.search(r"\bJobState=(\S+)", proc.stdout)
    code = re.search(r"\bExitCode=(\S+)", proc.stdout)
    reason = re.search(r"\bReason=(\S+)", proc.stdout)
    text = state.group(1) if state else "UNKNOWN"
    if text == "PENDING" and reason and reason.group(1) != "None":
        text = f"PENDING ({reason.group(1)})"
    return text, code.group(1) if code else ""


def _has_result(paths) -> bool:
    """This job's result file for a task. One older than the job's own submission belongs to an
    earlier job with the same id (a test cluster restarted with fresh ids) and is ignored."""
    try:
        return paths.result_pickle.stat().st_mtime >= paths.submitted_pickle.stat().st_mtime
    except OSError:
        return False


def _is_error(paths) -> bool:
    from submitit.core.utils import pickle_load

    try:
        return _has_result(paths) and pickle_load(paths.result_pickle)[0] == "error"
    except Exception:  # still being written
        return False


def _srun_errors(batch_err: Path) -> tuple[list[str], Optional[int]]:
    """srun's per-task verdicts from the batch script's stderr (task 0's .err under submitit),
    and the first task that failed on its own rather than being terminated by srun."""
    verdicts, culprit = [], None
    for line in tail(batch_err, 200).splitlines():
        match = re.search(r"srun: error: \S+: tasks? (\d+)\S*: (.+)", line)
        if match:
            verdicts.append(line.strip())
            if culprit is None and "Terminated" not in match.group(2):
                culprit = int(match.group(1))
    return verdicts, culprit


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log ("" when it cannot be read)."""
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


class _Follower:
    """Prints what a log file gains between polls."""

    def __init__(self, path: Path, prefix: str, out=sys.stdout):
        self.path, self.prefix, self.out, self.offset = path, prefix, out, 0

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        complete = data.rfind(b"\n") + 1  # print whole lines only
        self.offset += complete
        for line in data[:complete].decode(errors="replace").splitlines():
            print(f"{self.prefix}{line}", file=self.out, flush=True)


def wait_and_report(job, stream: bool = True, timeout_s: Optional[float] = None,
                    poll_s: float = 1.0) -> list:
    """Wait for every task of `job`; return their results in rank order, or raise SlurmJobFailed
    with the job id, the failing rank's traceback, the tail of its logs and their paths.

    Completion is read from each task's result file and from `scontrol show job`, never from
    sacct, so it works on clusters without accounting. `stream` echoes rank 0's stdout.
    """
    from submitit.core.utils import pickle_load

    job_id = str(job.job_id)
    tasks = [job.task(t).paths for t in range(job.num_tasks)]
    follower = _Follower(tasks[0].stdout, f"[{job_id} rank 0] ") if stream else None
    start, last_state, ended_at = time.monotonic(), "", None
    state, exit_code, next_check = "UNKNOWN", "", 0.0
    try:
        while True:
            if follower:
                follower.poll()
            if all(_has_result(p) for p in tasks):
                break
            now = time.monotonic()
            if now >= next_check:
                state, exit_code = job_state(job_id)
                if state != last_state and stream:
                    print(f"plait: Slurm job {job_id}: {state}", flush=True)
                last_state = state
                # poll slurmctld every poll_s at first, backing off to 30 s on long jobs
                next_check = now + min(30.0, max(poll_s, (now - start) / 10))
            if state in FINISHED_STATES or state == "GONE":
                ended_at = ended_at or now
                # a rank's traceback is already there; otherwise give a shared FS time to catch up
                if any(_is_error(p) for p in tasks) or now - ended_at > RESULT_GRACE_S:
                    break
            if timeout_s is not None and now - start > timeout_s:
                raise SlurmJobFailed(
                    f"Slurm job {job_id} still {state} after {timeout_s:.0f}s of waiting; it keeps "
                    f"running (scancel {job_id} stops it). Logs: {tasks[0].stdout}",
                    job_id, state, [str(tasks[0].stdout), str(tasks[0].stderr)])
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"plait: stopped waiting; Slurm job {job_id} keeps running (scancel {job_id} stops it); "
              f"logs in {tasks[0].stdout.parent}", file=sys.stderr)
        raise
    if follower:
        follower.poll()

    outcomes = {}
    for rank, paths in enumerate(tasks):
        if _has_result(paths):
            outcomes[rank] = pickle_load(paths.result_pickle)
    if len(outcomes) == len(tasks) and all(o[0] == "success" for o in outcomes.values()):
        return [outcomes[rank][1] for rank in range(len(tasks))]

    if not exit_code:
        state, exit_code = job_state(job_id)
    errors = [rank for rank, o in sorted(outcomes.items()) if o[0] == "error"]
    missing = [rank for rank in range(len(tasks)) if rank not in outcomes]
    verdicts, culprit = _srun_errors(tasks[0].stderr)
    blame = errors[0] if errors else culprit if culprit in missing else missing[0]
    paths = tasks[blame]
    ended = f" (state {state}, exit code {exit_code})" if state in FINISHED_STATES else ""
    lines = [f"Slurm job {job_id} failed{ended}"]
    if errors:
        lines.append(f"rank(s) {errors} raised; rank {blame}'s traceback:")
        lines.append(outcomes[blame][1].rstrip())
    if missing:
        lines.append(f"rank(s) {missing} left no result (killed, crashed, cancelled or timed out; "
                     "with one failing rank srun stops the others)")
    if not errors:
        lines += verdicts
        for name in ("stderr", "stdout"):
            log = getattr(paths, name)
            last = tail(log)
            if last.strip():
                lines += [f"--- last lines of rank {blame}'s {name} ({log}):", last.rstrip()]
    logs = [str(p) for t in tasks for p in (t.stdout, t.stderr)]
    lines.append(f"logs: {paths.stdout.parent}/{job_id}_<rank>_log.{{out,err}}")
    raise SlurmJobFailed("\n".join(lines), job_id, state, logs)
