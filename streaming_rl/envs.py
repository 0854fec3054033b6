"""Environments for streaming learners: creation by gymnasium id (classic control, MuJoCo, and
MinAtar when the GPL `minatar` extra is installed), and the environment's own state as a
`Stateful`, so a run stopped mid-episode resumes on exactly the same trajectory.

What "the state" is per family:
  classic control  `unwrapped.state` (+ `steps_beyond_terminated`, `last_u` where present)
  MuJoCo           `mj_getState(mjSTATE_INTEGRATION)`: time, qpos, qvel, act, warm-start, ctrl, ...
  MinAtar          the game object (its own RandomState included)
  every family     the env's `np_random` bit-generator state and TimeLimit's elapsed steps
"""

from __future__ import annotations

import difflib
import importlib.util
import pickle
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainer.errors import ConfigError

CLASSIC_ATTRS = ("state", "steps_beyond_terminated", "last_u")
EXAMPLES = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "Hopper-v5", "Walker2d-v5",
            "HalfCheetah-v5", "Ant-v5", "Humanoid-v5", "MinAtar/Breakout-v1 (with plait[minatar])")
MINATAR_PREFIX = "MinAtar/"


class EnvError(ConfigError):
    """An environment id or its spaces cannot be used; the message says what can."""


def minatar_available() -> bool:
    return importlib.util.find_spec("minatar") is not None


def register_optional_envs() -> None:
    """Register MinAtar's gymnasium ids if the (GPL) `minatar` package is installed."""
    if minatar_available() and not any(k.startswith(MINATAR_PREFIX) for k in gym.registry):
        import minatar.gym

        minatar.gym.register_envs()


def check_env_id(env_id: str, key: str = "task.env") -> None:
    """Refuse an unknown id with the nearest registered ones and a few that work."""
    register_optional_envs()
    if env_id in gym.registry:
        return
    if env_id.startswith(MINATAR_PREFIX) and not minatar_available():
        raise EnvError(f"{key}={env_id!r} needs the MinAtar package, a GPL-licensed extra: "
                       "pip install 'plait[minatar]'")
    near = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise EnvError(f"{key}={env_id!r} is not a registered gymnasium environment{hint}; allowed: any "
                   f"registered id, e.g. {', '.join(EXAMPLES)}")


def family(env: gym.Env) -> str:
    """`mujoco`, `classic_control`, `minatar` or `other` (which resumes at a fresh episode)."""
    unwrapped = env.unwrapped
    module = type(unwrapped).__module__
    if module.startswith("gymnasium.envs.mujoco"):
        return "mujoco"
    if module.startswith("gymnasium.envs.classic_control"):
        return "classic_control"
    if module.startswith("minatar"):
        return "minatar"
    return "other"


def make_env(env_id: str, max_episode_steps: int = 0) -> gym.Env:
    """`gym.make(env_id)`, with the time limit replaced when `max_episode_steps` > 0."""
    check_env_id(env_id)
    kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps > 0 else {}
    return gym.make(env_id, **kwargs)


def _time_limit(env: gym.Env) -> Optional[gym.wrappers.TimeLimit]:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return env
        env = env.env
    return None


class EnvState(Stateful):
    """The environment's full state; `exact` is False for families whose state is unknown here."""

    def __init__(self, env: gym.Env):
        self.env = env
        self.family = family(env)
        self.exact = self.family != "other"
        self._limit = _time_limit(env)
        if self.family == "mujoco":
            import mujoco

            self._mujoco = mujoco
            self._spec = mujoco.mjtState.mjSTATE_INTEGRATION
            self._size = mujoco.mj_stateSize(env.unwrapped.model, self._spec)

    def _physics(self):
        u = self.env.unwrapped
        if self.family == "mujoco":
            out = np.empty(self._size, dtype=np.float64)
            self._mujoco.mj_getState(u.model, u.data, out, self._spec)
            return torch.from_numpy(out)
        if self.family == "classic_control":
            return pickle.dumps({k: getattr(u, k) for k in CLASSIC_ATTRS if k in vars(u)})
        if self.family == "minatar":
            return pickle.dumps(u.game)
        return b""

    def _set_physics(self, physics) -> None:
        u = self.env.unwrapped
        if self.family == "mujoco":
            state = np.ascontiguousarray(np.asarray(physics, dtype=np.float64))
            self._mujoco.mj_setState(u.model, u.data, state, self._spec)
            self._mujoco.mj_forward(u.model, u.data)
        elif self.family == "classic_control":
            for k, v in pickle.loads(physics).items():
                setattr(u, k, v)
        elif self.family == "minatar":
            u.game = pickle.loads(physics)

    def state_dict(self) -> dict:
        return {
            "family": self.family,
            "np_random": self.env.unwrapped.np_random.bit_generator.state,
            "elapsed_steps": self._limit._elapsed_steps if self._limit is not None else 0,
            "physics": self._physics(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["family"] != self.family:
            raise ValueError(f"environment state of a {state['family']} env cannot load into a {self.family} env")
        if not self.exact:
            return
        self.env.unwrapped.np_random.bit_generator.state = state["np_random"]
        if self._limit is not None:
            self._limit._elapsed_steps = int(state["elapsed_steps"])
        self._set_physics(state["physics"])
