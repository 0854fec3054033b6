"""Task family `federated` (FedPipe-style federated LoRA on Flower): `task=federated`, options in
federated/config.py, runner federated/run.py. Light to import: no Flower, Ray, peft or SciPy until
a check or the run needs them."""

from __future__ import annotations

from typing import Optional

from federated.config import FederatedConfig
from trainer.config import PlaitConfig
from trainer.errors import ConfigError
from trainer.task import TaskFamily

FAULT_KINDS = ("raise", "exit", "hang")


def check(cfg: PlaitConfig, launcher_world: Optional[int]) -> int:
    """One process (it starts Ray or Flower itself), or under task.mode=deploy one task per node of a
    Slurm job (federated/cluster.py); a registered strategy; client profiles, data,
    modules and faults that fit; a plan that fits every client's budgets (the planner runs here)."""
    c: FederatedConfig = cfg.task
    world = 1
    several = (cfg.launcher.name == "slurm" and cfg.launcher.nodes > 1) or (launcher_world or 1) > 1
    if several and c.mode != "deploy":
        raise ConfigError(f"task=federated starts its own clients, here task.mode={c.mode} on one machine, but the "
                          f"launcher asks for {launcher_world or cfg.launcher.nodes} tasks; start it once (plait "
                          "task=federated ..., srun -n 1), or use task.mode=deploy with launcher=slurm "
                          "launcher.nodes=N (a SuperLink on the first node, SuperNodes on every node)")
    if several:
        from trainer.launch.nodes import one_task_per_node

        world = one_task_per_node(cfg, launcher_world, "Flower SuperNodes")
        if not c.spawn_local:
            raise ConfigError(f"task.spawn_local=false names a running SuperLink (task.superlink={c.superlink}), "
                              f"but a job of {world} nodes starts its own across them; drop one of them")
    from federated.aggregation import STRATEGIES

    STRATEGIES.get(c.strategy)
    if c.clients and len(c.clients) != c.num_clients:
        raise ConfigError(f"task.clients has {len(c.clients)} profile(s) but task.num_clients={c.num_clients}; "
                          f"give one per client or none")
    if c.min_clients > c.num_clients:
        raise ConfigError(f"task.min_clients={c.min_clients} exceeds task.num_clients={c.num_clients}")
    for name, values, allowed in (("rank_choices", c.rank_choices, None), ("batch_choices", c.batch_choices, None),
                                  ("bits_choices", c.bits_choices, (4, 8, 32))):
        if not values or any(v < 1 for v in values) or (allowed and any(v not in allowed for v in values)):
            raise ConfigError(f"task.{name}={list(values)} must be a non-empty list of "
                              + (f"values in {allowed}" if allowed else "positive integers"))
    for item in c.faults:
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in FAULT_KINDS or not all(p.isdigit() for p in parts[1:]) \
                or int(parts[1]) >= c.num_clients:
            raise ConfigError(f"task.faults item {item!r} is not <kind>:<client>:<round> with kind one of "
                              f"{', '.join(FAULT_KINDS)} and client < task.num_clients={c.num_clients}")
        if c.mode == "local" and parts[0] != "raise":
            raise ConfigError(f"task.faults={item!r}: task.mode=local runs clients in this process; only "
                              f"'raise' faults apply (exit and hang need task.mode=simulation or deploy)")
    from federated.data import TaskSpec

    TaskSpec(c.num_classes, c.seq_len, cfg.model.vocab_size, c.keyword_prob).check()
    if c.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"task.seq_len={c.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    from federated.run import make_plan

    make_plan(cfg, lambda s: None)  # data partitions, target modules, the planner's feasibility
    return world


FAMILY = TaskFamily(name="federated", options=FederatedConfig, runners=("federated.run.run",),
                    reads=("model",), check=check)
