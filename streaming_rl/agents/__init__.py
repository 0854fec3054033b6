"""Stream-x learners, looked up by name from a registry (`task.agent`): `td` (prediction), `q`
(Watkins's Q(λ)), `sarsa` (SARSA(λ)), `ac` (actor-critic). Each learns from one transition at a
time and exposes its checkpointable parts through `components()`."""

from __future__ import annotations

from typing import Callable

from streaming_rl.agents.base import AgentSpec, StreamAgent

AGENTS: dict[str, type[StreamAgent]] = {}


def register_agent(name: str) -> Callable[[type[StreamAgent]], type[StreamAgent]]:
    def add(cls: type[StreamAgent]) -> type[StreamAgent]:
        if name in AGENTS:
            raise ValueError(f"agent {name!r} is registered twice ({AGENTS[name].__name__}, {cls.__name__})")
        AGENTS[name] = cls
        cls.name = name
        return cls

    return add


def build_agent(name: str, spec: AgentSpec) -> StreamAgent:
    if name not in AGENTS:
        raise KeyError(f"no agent {name!r}; registered: {', '.join(sorted(AGENTS))}")
    return AGENTS[name](spec)


from streaming_rl.agents import ac, q, sarsa, td  # noqa: E402,F401  (registration)

__all__ = ["AGENTS", "AgentSpec", "StreamAgent", "build_agent", "register_agent"]
