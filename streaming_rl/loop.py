"""The streaming loop: act, step the environment, normalize, learn from that one transition,
forget it. Everything it carries between steps (the current observation, the episode's return
and length, the environment's state, the normalizers) is a `Stateful` component, so a checkpoint
taken at any step boundary, mid-episode included, resumes on exactly the same trajectory."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from streaming_rl.agents import StreamAgent
from streaming_rl.envs import EnvState
from streaming_rl.normalize import ObservationNormalizer, RewardScaler


class Diverged(RuntimeError):
    """The TD error is no longer a finite number: the learner has blown up."""


def time_feature(t: int, limit: int) -> float:
    """t/T − 0.5: where the episode is within its time limit T."""
    return t / limit - 0.5


class ObservationPipeline(Stateful):
    """Raw observation → float32 tensor: Welford normalization, then the time feature if asked."""

    def __init__(self, shape: tuple[int, ...], normalize: bool = True, time_limit: Optional[int] = None):
        if time_limit is not None and len(shape) != 1:
            raise ValueError(f"a time feature needs flat observations, got shape {shape}")
        self.normalizer = ObservationNormalizer(shape, enabled=normalize)
        self.time_limit = time_limit
        self.shape = (shape[0] + 1,) if time_limit is not None else tuple(shape)

    def __call__(self, raw: np.ndarray, t: int) -> torch.Tensor:
        obs = self.normalizer(np.asarray(raw, dtype=np.float64))
        if self.time_limit is not None:
            obs = np.append(obs, time_feature(t, self.time_limit))
        return torch.from_numpy(obs.astype(np.float32))

    def state_dict(self) -> dict:
        return self.normalizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.normalizer.load_state_dict(state)


@dataclass
class EpisodeState(Stateful):
    """Where the stream is: the current observation and the running episode's statistics."""

    obs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    ret: float = 0.0  # undiscounted, unscaled return so far
    length: int = 0
    count: int = 0  # episodes finished
    abs_delta: float = 0.0  # Σ|δ| over the episode so far

    def state_dict(self) -> dict:
        return {"obs": self.obs, "ret": self.ret, "length": self.length, "count": self.count,
                "abs_delta": self.abs_delta}

    def load_state_dict(self, state: dict) -> None:
        self.obs = state["obs"].clone()
        self.ret, self.length = float(state["ret"]), int(state["length"])
        self.count, self.abs_delta = int(state["count"]), float(state["abs_delta"])


class StreamLoop:
    """One environment, one agent, one transition per `step()`."""

    def __init__(self, env: gym.Env, agent: StreamAgent, observe: ObservationPipeline,
                 rewards: RewardScaler, seed: int):
        self.env, self.agent, self.observe, self.rewards = env, agent, observe, rewards
        self.env_state = EnvState(env)
        self.episode = EpisodeState()
        raw, _ = env.reset(seed=seed)
        self.episode.obs = observe(raw, 0)

    def components(self) -> dict[str, Stateful]:
        return {**self.agent.components(), "env": self.env_state, "observation": self.observe,
                "reward_scaler": self.rewards, "episode": self.episode}

    def restart_episode(self) -> None:
        """Begin a fresh episode (after a resume whose environment state could not be restored)."""
        ep = self.episode
        ep.ret, ep.length, ep.abs_delta = 0.0, 0, 0.0
        for opt in self.agent.optimizers.values():
            opt.reset_traces()
        raw, _ = self.env.reset()
        ep.obs = self.observe(raw, 0)

    def step(self) -> Optional[dict]:
        """One transition learned from; returns the episode's statistics when it ends."""
        ep, agent = self.episode, self.agent
        action = agent.act(ep.obs)
        raw, reward, terminated, truncated, _ = self.env.step(action)
        reward, terminated, truncated = float(reward), bool(terminated), bool(truncated)
        ep.length += 1
        next_obs = self.observe(raw, ep.length)
        done = terminated or truncated
        # With time in the observation the time limit is part of the state: reaching it ends the
        # (time-augmented) episode for real, so it is not bootstrapped past (Pardo et al. 2018).
        ends = terminated or (truncated and self.observe.time_limit is not None)
        delta = agent.learn(ep.obs, action, self.rewards(reward, done), next_obs, ends, truncated)
        if not math.isfinite(delta):
            raise Diverged(f"the TD error is {delta} after {agent.steps} updates: the learner diverged "
                           f"(optimizer={agent.cfg.optimizer}, lr={agent.cfg.lr}; ObGD's bound prevents this)")
        ep.ret += reward
        ep.abs_delta += abs(delta)
        if not done:
            ep.obs = next_obs
            return None
        stats = {"episode/return": ep.ret, "episode/length": ep.length,
                 "episode/abs_td_error": ep.abs_delta / ep.length, "episodes": ep.count + 1}
        ep.count += 1
        ep.ret, ep.length, ep.abs_delta = 0.0, 0, 0.0
        raw, _ = self.env.reset()
        ep.obs = self.observe(raw, 0)
        return stats
