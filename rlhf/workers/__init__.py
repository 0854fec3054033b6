"""The RLHF roles as worker classes (HybridFlow's nodes): each runs SPMD across its group's ranks
and declares on every method how the driver's input is split and the outputs gathered
(rlhf/dispatch.py). The same classes run in Ray actors (rlhf/groups/ray_group.py) or in the
driver process (rlhf/groups/local.py)."""

from rlhf.workers.actor import ActorWorker, ReferenceWorker
from rlhf.workers.base import Worker, WorkerSpec
from rlhf.workers.critic import CriticWorker
from rlhf.workers.reward_model import RewardModelWorker

WORKER_CLASSES = {"actor": ActorWorker, "reference": ReferenceWorker, "critic": CriticWorker,
                  "reward_model": RewardModelWorker}

__all__ = ["Worker", "WorkerSpec", "ActorWorker", "ReferenceWorker", "CriticWorker", "RewardModelWorker",
           "WORKER_CLASSES"]
