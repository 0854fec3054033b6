"""Worker groups: one role's workers seen from the driver as one object whose registered methods
dispatch, run SPMD on every worker, and collect (rlhf/dispatch.py). `ray_group` runs each worker
in a Ray actor; `local` runs them in the driver process (a debugger steps through everything)."""

from rlhf.groups.base import Pending, WorkerFailure, WorkerGroup

__all__ = ["Pending", "WorkerFailure", "WorkerGroup"]
