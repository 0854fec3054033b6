"""Options of the streaming RL tasks (`task=stream_td|stream_q|stream_sarsa|stream_ac`): one typed
dataclass holding every default once (trainer/task.py's contract). Hydra's ConfigStore holds it as
`task_options/stream`; each configs/task/stream_*.yaml states only what differs (its agent, and
for some its environment and length).

Every stream-x trick is a switch, so the stream barrier can be shown by turning them off:
`task.optimizer=sgd task.init=default task.layer_norm=false task.normalize_obs=false
task.scale_rewards=false`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import bounded, choice
from trainer.task import TaskOptions

# Network width and exploration by environment family (the paper's settings).
HIDDEN_SIZE = {"classic_control": 32, "mujoco": 128, "minatar": 128, "other": 128}
EXPLORATION_FRACTION = {"minatar": 0.2}  # every other family: 0.05


@dataclass
class StreamConfig(TaskOptions):
    agent: str = "q"  # registry key of the learner (streaming_rl/agents): td | q | sarsa | ac
    env: str = "CartPole-v1"  # a gymnasium id (MinAtar/... with plait[minatar])
    total_steps: int = bounded(100_000, ge=1)  # environment steps of the run
    # ObGD (the paper's defaults); optimizer=sgd is traces without the overshooting bound
    optimizer: str = choice("obgd", "adaptive_obgd", "sgd")
    lr: float = bounded(1.0, gt=0)
    gamma: float = bounded(0.99, ge=0, le=1)
    lamda: float = bounded(0.8, ge=0, le=1)
    kappa: float = bounded(2.0, gt=0)  # κ of the value / Q network (the critic's in ac)
    kappa_policy: float = bounded(3.0, gt=0)  # κ of the actor's ObGD (ac)
    beta2: float = bounded(0.999, ge=0, lt=1)  # adaptive_obgd's second-moment decay
    eps: float = bounded(1e-8, gt=0)  # adaptive_obgd's ε
    entropy_coef: float = bounded(0.01, ge=0)  # c in −log π(a|s) − c·sign(δ)·H(π) (ac)
    # networks
    init: str = choice("sparse", "default")  # default = PyTorch's Kaiming-uniform
    sparsity: float = bounded(0.9, ge=0, lt=1)  # fraction of each unit's inputs zeroed by the sparse init
    layer_norm: bool = True  # parameter-free LayerNorm before every LeakyReLU
    # None: 32 for classic control, 128 otherwise
    hidden_size: Optional[int] = bounded(None, ge=1, note="null for the family's default")
    hidden_layers: int = bounded(2, ge=1)  # MLP torso depth (the MinAtar conv torso has one conv + one linear)
    # observations and rewards
    normalize_obs: bool = True  # Welford running mean / variance
    scale_rewards: bool = True  # by the running std of the discounted return trace
    # append t/T − 0.5 (T: the time limit), which then ends episodes for the learner too;
    # None: on for flat observations with a time limit (the paper's setting), else off
    time_feature: Optional[bool] = None
    max_episode_steps: int = bounded(0, ge=0, note="0 for the environment's own time limit")
    # ε-greedy exploration (q, sarsa): linear start → end over exploration_fraction × total steps
    epsilon_start: float = bounded(1.0, ge=0, le=1)
    epsilon_end: float = bounded(0.01, ge=0, le=1)
    # None: 0.2 for MinAtar, 0.05 otherwise
    exploration_fraction: Optional[float] = bounded(None, gt=0, le=1, note="null for the family's default")
    # plumbing
    summary_every: int = bounded(10_000, ge=0, note="0 for none")  # environment steps between summary lines
    threads: int = bounded(1, ge=1)  # torch threads: per-sample updates of tiny networks are fastest on one


def hidden_size(c: StreamConfig, family: str) -> int:
    return c.hidden_size if c.hidden_size is not None else HIDDEN_SIZE[family]


def exploration_fraction(c: StreamConfig, family: str) -> float:
    if c.exploration_fraction is not None:
        return c.exploration_fraction
    return EXPLORATION_FRACTION.get(family, 0.05)
