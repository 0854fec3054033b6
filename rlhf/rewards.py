"""Rule-based reward functions by name (`task.reward=exact_match`) or `module:function`.

A reward function takes one response: `fn(prompt: str, response: str, answer: str) -> float`
(the response's text up to its end token)."""

from __future__ import annotations

from typing import Callable

from rlhf.data.arithmetic import exact_match
from trainer.errors import ConfigError
from trainer.registry import Registry

RewardFn = Callable[[str, str, str], float]
REWARDS: Registry[RewardFn] = Registry("reward function", key="task.reward")


@REWARDS.register("exact_match")
def exact_match_reward(prompt: str, response: str, answer: str) -> float:
    """1 if the response is exactly the answer (spaces stripped), else 0."""
    return exact_match(response, answer)


@REWARDS.register("answer_prefix")
def answer_prefix_reward(prompt: str, response: str, answer: str) -> float:
    """The fraction of the answer's leading characters the response gets right (a denser signal)."""
    r = response.strip()
    right = next((i for i, (a, b) in enumerate(zip(r, answer)) if a != b), min(len(r), len(answer)))
    return right / max(len(answer), len(r), 1)


def resolve_reward(name: str) -> RewardFn:
    """A registered name, or `package.module:function`."""
    fn = REWARDS.resolve(name)
    if not callable(fn):
        raise ConfigError(f"task.reward={name!r} is not callable")
    return fn
