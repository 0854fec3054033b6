"""Stream-x learners, looked up by name from a registry (`task.agent`): `td` (prediction), `q`
(Watkins's Q(λ)), `sarsa` (SARSA(λ)), `ac` (actor-critic). Each learns from one transition at a
time and exposes its checkpointable parts through `components()`."""

from __future__ import annotations

from typing import Callable

from streaming_rl.agents.base import AgentSpec, StreamAgent
from trainer.registry import Registry

AGENTS: Registry[type[StreamAgent]] = Registry("stream agent", key="task.agent")


def register_agent(name: str) -> Callable[[type[StreamAgent]], type[StreamAgent]]:
    """`@register_agent("q")`: the class becomes `task.agent=q` (and knows its name)."""
    def add(cls: type[StreamAgent]) -> type[StreamAgent]:
        AGENTS.add(name, cls)
        cls.name = name
        return cls

    return add


def build_agent(name: str, spec: AgentSpec) -> StreamAgent:
    return AGENTS.get(name)(spec)


from streaming_rl.agents import ac, q, sarsa, td  # noqa: E402,F401  (registration)

__all__ = ["AGENTS", "AgentSpec", "StreamAgent", "build_agent", "register_agent"]
