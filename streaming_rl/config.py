"""Options of the streaming RL tasks (`task=stream_td|stream_q|stream_sarsa|stream_ac`): one typed
dataclass holding every default once, and `task_config(cfg)` that validates `cfg.task` against it
with errors that name `task.<key>` and the allowed values.

Every stream-x trick is a switch, so the stream barrier can be shown by turning them off:
`task.optimizer=sgd task.init=default task.layer_norm=false task.normalize_obs=false
task.scale_rewards=false`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import ConfigError, PlaitConfig, choice

# What `env=""` and `trainer.total_steps=0` mean for each agent (the task YAMLs state the same).
DEFAULT_ENV = {"td": "CartPole-v1", "q": "CartPole-v1", "sarsa": "CartPole-v1", "ac": "Hopper-v5"}
DEFAULT_TOTAL_STEPS = {"td": 100_000, "q": 150_000, "sarsa": 150_000, "ac": 2_000_000}
# Network width and exploration by environment family (the paper's settings).
HIDDEN_SIZE = {"classic_control": 32, "mujoco": 128, "minatar": 128, "other": 128}
EXPLORATION_FRACTION = {"minatar": 0.2}  # every other family: 0.05


@dataclass
class StreamConfig:
    agent: str = choice("q", "td", "sarsa", "ac")  # registry key of the learner
    # ObGD (the paper's defaults); optimizer=sgd is traces without the overshooting bound
    optimizer: str = choice("obgd", "adaptive_obgd", "sgd")
    lr: float = 1.0
    gamma: float = 0.99
    lamda: float = 0.8
    kappa: float = 2.0  # κ of the value / Q network (the critic's in ac)
    kappa_policy: float = 3.0  # κ of the actor's ObGD (ac)
    beta2: float = 0.999  # adaptive_obgd's second-moment decay
    eps: float = 1e-8  # adaptive_obgd's ε
    entropy_coef: float = 0.01  # c in −log π(a|s) − c·sign(δ)·H(π) (ac)
    # networks
    init: str = choice("sparse", "default")  # default = PyTorch's Kaiming-uniform
    sparsity: float = 0.9  # fraction of each unit's inputs zeroed by the sparse init
    layer_norm: bool = True  # parameter-free LayerNorm before every LeakyReLU
    hidden_size: Optional[int] = None  # None: 32 for classic control, 128 otherwise
    hidden_layers: int = 2  # MLP torso depth (the MinAtar conv torso has one conv + one linear)
    # observations and rewards
    normalize_obs: bool = True  # Welford running mean / variance
    scale_rewards: bool = True  # by the running std of the discounted return trace
    # append t/T − 0.5 (T: the time limit), which then ends episodes for the learner too;
    # None: on for flat observations with a time limit (the paper's setting), else off
    time_feature: Optional[bool] = None
    max_episode_steps: int = 0  # 0 = the environment's own time limit
    # ε-greedy exploration (q, sarsa): linear start → end over exploration_fraction × total steps
    epsilon_start: float = 1.0
    epsilon_end: float = 0.01
    exploration_fraction: Optional[float] = None  # None: 0.2 for MinAtar, 0.05 otherwise
    # plumbing
    summary_every: int = 10_000  # environment steps between summary lines; 0 = none
    threads: int = 1  # torch threads: per-sample updates of tiny networks are fastest on one


FIELDS = [f.name for f in dataclasses.fields(StreamConfig)]


def _check_ranges(c: StreamConfig) -> None:
    def bad(key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"task.{key}={value!r} is not allowed; allowed: {allowed}")

    for key in ("lr", "kappa", "kappa_policy", "eps"):
        if getattr(c, key) <= 0:
            raise bad(key, getattr(c, key), "a number > 0")
    for key in ("gamma", "lamda", "epsilon_start", "epsilon_end"):
        if not 0 <= getattr(c, key) <= 1:
            raise bad(key, getattr(c, key), "a number in [0, 1]")
    if not 0 <= c.beta2 < 1:
        raise bad("beta2", c.beta2, "a number in [0, 1)")
    if not 0 <= c.sparsity < 1:
        raise bad("sparsity", c.sparsity, "a number in [0, 1)")
    if c.entropy_coef < 0:
        raise bad("entropy_coef", c.entropy_coef, "a number >= 0")
    if c.hidden_size is not None and c.hidden_size < 1:
        raise bad("hidden_size", c.hidden_size, "an integer >= 1, or null for the family's default")
    if c.hidden_layers < 1:
        raise bad("hidden_layers", c.hidden_layers, "an integer >= 1")
    if c.exploration_fraction is not None and not 0 < c.exploration_fraction <= 1:
        raise bad("exploration_fraction", c.exploration_fraction, "a number in (0, 1], or null")
    for key in ("max_episode_steps", "summary_every"):
        if getattr(c, key) < 0:
            raise bad(key, getattr(c, key), "an integer >= 0")
    if c.threads < 1:
        raise bad("threads", c.threads, "an integer >= 1")


def task_config(cfg: PlaitConfig) -> StreamConfig:
    """`cfg.task` (less `_target_` and `name`) checked against StreamConfig."""
    options = {k: v for k, v in cfg.task.items() if k not in ("_target_", "name")}
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join('task.' + k for k in unknown)}; "
                          f"allowed: {', '.join(FIELDS)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StreamConfig), options)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise ConfigError(f"task.{key}: {str(err).splitlines()[0]}") from None
    c: StreamConfig = OmegaConf.to_object(merged)
    for f in dataclasses.fields(c):
        allowed = f.metadata.get("choices")
        if allowed and getattr(c, f.name) not in allowed:
            raise ConfigError(f"task.{f.name}={getattr(c, f.name)!r} is not allowed; "
                              f"choose one of: {', '.join(allowed)}")
    _check_ranges(c)
    return c


def env_id(cfg: PlaitConfig, c: StreamConfig) -> str:
    """The top-level `env`, or the agent's default when it is empty."""
    return cfg.env or DEFAULT_ENV[c.agent]


def total_steps(cfg: PlaitConfig, c: StreamConfig) -> int:
    """`trainer.total_steps`, or the agent's default when it is 0."""
    if cfg.trainer.total_steps < 0:
        raise ConfigError(f"trainer.total_steps={cfg.trainer.total_steps} must be >= 0 (0 = the task's default)")
    return cfg.trainer.total_steps or DEFAULT_TOTAL_STEPS[c.agent]


def hidden_size(c: StreamConfig, family: str) -> int:
    return c.hidden_size if c.hidden_size is not None else HIDDEN_SIZE[family]


def exploration_fraction(c: StreamConfig, family: str) -> float:
    if c.exploration_fraction is not None:
        return c.exploration_fraction
    return EXPLORATION_FRACTION.get(family, 0.05)
