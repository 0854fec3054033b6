"""Which process group a checkpointer's own collectives run on, and its ranks within that group.

A Checkpointer's agreement steps (is the async save done everywhere, gather every rank's file
hashes, is any file damaged, barriers) move small CPU tensors and Python objects. Under NCCL those
raise (NCCL moves device tensors only), so they run on a gloo group over the same ranks: the given
group itself when it is gloo, else one created once per Checkpointer. With async saves DCP's own
collectives run in a background thread on the checkpointer's group, so agreement must use another
group: two threads issuing collectives on one group can interleave them across ranks.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist


def backend_of(group: Optional[dist.ProcessGroup]) -> str:
    return str(dist.get_backend(group)).lower()


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank in `group` (the default group for None); 0 without torch.distributed."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _spans_world(group: Optional[dist.ProcessGroup]) -> bool:
    return group is None or dist.get_world_size(group) == dist.get_world_size()


def agreement_group(group: Optional[dist.ProcessGroup], async_save: bool) -> Optional[dist.ProcessGroup]:
    """A gloo group over `group`'s ranks for CPU-tensor collectives and object gathers.

    Every rank of `group` must call this at the same point (it may create a group). Returns `group`
    itself when that is safe (gloo, and not also carrying a background save's collectives), the
    default group when that is gloo and `group` is a dedicated copy of it (what the training
    runners pass with async saves), and otherwise a new gloo group."""
    if not async_save and backend_of(group) == "gloo":
        return group
    if async_save and group is not None and _spans_world(group) and backend_of(None) == "gloo":
        return None  # the default group: only the main thread issues collectives on it
    if _spans_world(group):
        return dist.new_group(backend="gloo")
    return dist.new_group(ranks=dist.get_process_group_ranks(group), backend="gloo",
                          use_local_synchronization=True)
