"""Task family `stream` (stream-x): `task=stream_td|stream_q|stream_sarsa|stream_ac`, options in
streaming_rl/config.py, runner streaming_rl/run.py. Light to import: the checks import gymnasium
and the agents only when they run."""

from __future__ import annotations

from typing import Optional

from streaming_rl.config import StreamConfig
from trainer.config import PlaitConfig
from trainer.errors import ConfigError
from trainer.task import TaskFamily


def check(cfg: PlaitConfig, launcher_world: Optional[int]) -> int:
    """One process; a registered agent; an environment that exists and fits the options."""
    c: StreamConfig = cfg.task
    if launcher_world not in (None, 1):
        raise ConfigError(f"task={c.name} is a single-process streaming learner but the launcher started "
                          f"{launcher_world} ranks; run seeds side by side instead: plait -m task={c.name} "
                          "seed=0,1,2,3,4")
    from streaming_rl.agents import AGENTS
    from streaming_rl.envs import make_env
    from streaming_rl.run import time_limit_used

    AGENTS.get(c.agent)
    env = make_env(c.env, c.max_episode_steps)
    try:
        time_limit_used(c, env)
    finally:
        env.close()
    return 1


FAMILY = TaskFamily(name="stream", options=StreamConfig, runners=("streaming_rl.run.run",), check=check)
