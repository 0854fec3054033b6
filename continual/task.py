"""Task families `continual` (`task=continual`: a learner through a stream of experiences or event
periods) and `active` (`task=active`: stream-based active learning under a labelling budget).
Options in continual/config.py, runners continual/run.py and continual/run_active.py.

Light to import: the checks import the streams, learners and strategies only when they run. They
build the stream and the learner (a few seconds at most), so every bad combination (an unknown
name, a stream of the wrong kind for the learner or task, a budget outside (0, 1], a codebook
count that does not divide the encoder's output when chunking) is refused before anything runs.
"""

from __future__ import annotations

import inspect
from typing import Optional

from continual.config import ActiveConfig, ContinualConfig
from trainer.config import PlaitConfig
from trainer.errors import ConfigError
from trainer.task import TaskFamily


def one_process(name: str, launcher_world: Optional[int]) -> int:
    if launcher_world not in (None, 1):
        raise ConfigError(f"task={name} runs in one process but the launcher started {launcher_world} ranks; "
                          f"run seeds side by side instead: plait -m task={name} seed=0,1,2")
    return 1


def check_stream_kind(stream: str, allowed: tuple[str, ...], who: str) -> str:
    """The stream's kind, if it is one `who` takes; else a ConfigError naming the fitting streams."""
    from continual.streams import KINDS, stream_kind

    kind = stream_kind(stream)
    if kind not in allowed:
        fits = sorted(n for n, k in KINDS.items() if k in allowed)
        raise ConfigError(f"task.stream={stream!r} is a stream of {kind}, which {who} does not take; "
                          f"allowed: {', '.join(fits)}")
    return kind


def check_continual(cfg: PlaitConfig, launcher_world: Optional[int]) -> int:
    """Registered learner and stream of a kind the learner takes; the learner builds on that stream."""
    c: ContinualConfig = cfg.task
    world = one_process(c.name, launcher_world)
    from continual.learners import learner_kind

    kind = learner_kind(c.learner)
    check_stream_kind(c.stream, (kind,), f"task.learner={c.learner}")
    if c.prompt_top_n > c.prompt_pool_size:
        raise ConfigError(f"task.prompt_top_n={c.prompt_top_n} exceeds task.prompt_pool_size={c.prompt_pool_size}; "
                          f"allowed: 1..{c.prompt_pool_size}")
    if c.tpp_hidden % c.tpp_heads:
        raise ConfigError(f"task.tpp_hidden={c.tpp_hidden} does not divide by task.tpp_heads={c.tpp_heads}")
    from continual.run import build

    build(cfg)  # the bottleneck's own checks (codebooks against the encoder width, dim_keys, topk)
    return world


def strategy_kwargs(cls, c: ActiveConfig) -> dict:
    """The options of `task=active` that the strategy class takes (threshold only when set)."""
    offered = {"step": c.step, "delta": c.delta, "random_fraction": c.random_fraction}
    if c.threshold is not None:
        offered["threshold"] = c.threshold
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in offered.items() if k in params}


def check_active(cfg: PlaitConfig, launcher_world: Optional[int]) -> int:
    """Registered strategy and learner, a budget in (0, 1], a stream of samples."""
    c: ActiveConfig = cfg.task
    world = one_process(c.name, launcher_world)
    from continual.active import STRATEGIES, check_budget
    from continual.online import ONLINE_LEARNERS

    check_budget(c.budget)
    cls = STRATEGIES.get(c.strategy)
    ONLINE_LEARNERS.get(c.learner)
    check_stream_kind(c.stream, ("samples",), "task=active")
    cls(budget=c.budget, seed=cfg.seed, **strategy_kwargs(cls, c))
    return world


CONTINUAL = TaskFamily(name="continual", options=ContinualConfig, runners=("continual.run.run",), check=check_continual)
ACTIVE = TaskFamily(name="active", options=ActiveConfig, runners=("continual.run_active.run",), check=check_active)
