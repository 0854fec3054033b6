"""Options of `task=continual` (ContinualConfig, ConfigStore `task_options/continual`) and
`task=active` (ActiveConfig, `task_options/active`): every default once (trainer/task.py's
contract). The defaults are the ones the benchmark (bench/continual.py) was tuned with on
Split-Digits, the 2-D toy, the Hawkes streams and Phishing; docs/continual.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import bounded, choice
from trainer.task import TaskOptions


@dataclass
class ContinualConfig(TaskOptions):
    learner: str = "kv_bottleneck"  # continual.learners.LEARNERS: finetune | replay | ewc | kv_bottleneck | tpp | prompt_tpp
    stream: str = "split_digits"  # continual.streams.STREAMS (kind "experiences" or "events")
    epochs: int = bounded(20, ge=1)  # passes over each experience (or period)
    batch_size: int = bounded(32, ge=1)  # samples (sequences for the TPPs) per step
    # MLP baselines (finetune, replay, ewc)
    lr: float = bounded(1e-3, gt=0)  # Adam, fresh for each experience
    hidden: int = bounded(128, ge=1)
    hidden_layers: int = bounded(2, ge=1)
    replay_capacity: int = bounded(200, ge=1)  # reservoir buffer, samples
    ewc_lambda: float = bounded(1000.0, ge=0)
    # Discrete Key-Value Bottleneck
    encoder: str = "random_projection"  # continual.encoders.ENCODERS: identity | random_projection | llama
    encoder_dim: int = bounded(256, ge=1)  # output width of random_projection / llama (identity: the input's)
    num_codebooks: int = bounded(64, ge=1)
    key_value_pairs_per_codebook: int = bounded(256, ge=1)
    dim_keys: Optional[int] = bounded(8, ge=1, note="null: encoder width / num_codebooks (chunk)")
    splitting: str = choice("random_projection", "chunk")
    topk: int = bounded(1, ge=1)
    decay: float = bounded(0.95, ge=0, lt=1)
    threshold_ema_dead_code: float = bounded(0.2, ge=0)
    key_init_epochs: int = bounded(10, ge=0)  # EMA k-means passes over the unlabelled pool
    kvb_lr: float = bounded(0.3, gt=0)  # plain SGD on the values (the paper's)
    # temporal point processes (tpp, prompt_tpp)
    tpp_hidden: int = bounded(32, ge=4)
    tpp_layers: int = bounded(2, ge=1)
    tpp_heads: int = bounded(2, ge=1)
    tpp_lr: float = bounded(1e-2, gt=0)  # Adam, fresh for each period
    integration_points: int = bounded(8, ge=1)  # midpoint rule per inter-event interval for ∫λ
    prompt_pool_size: int = bounded(10, ge=1)  # M
    prompt_top_n: int = bounded(5, ge=1)  # N ≤ M
    prompt_length: int = bounded(5, ge=1)
    prompt_similarity_weight: float = bounded(0.1, ge=0)
    freeze_base: bool = True  # prompt_tpp: after the first period only prompts, keys and the intensity head train
    threads: int = bounded(1, ge=1)
    stop_after: int = bounded(0, ge=0, note="0: run the whole stream")  # experiences, then stop (saved)


@dataclass
class ActiveConfig(TaskOptions):
    strategy: str = "variable_uncertainty"  # continual.active.STRATEGIES
    budget: float = 0.2  # B ∈ (0, 1]: fraction of the stream's samples that may be labelled (checked in `check`)
    stream: str = "phishing"  # a continual.streams stream of kind "samples"
    learner: str = "logistic"  # continual.online.ONLINE_LEARNERS: logistic | mlp
    lr: float = bounded(0.05, gt=0)  # SGD step of the online learner
    l2: float = bounded(0.0, ge=0)
    threshold: Optional[float] = bounded(None, gt=0, note="null: the strategy's default")  # θ of the uncertainty strategies
    step: float = bounded(0.01, gt=0, le=1)  # s of the variable strategies
    delta: float = bounded(1.0, gt=0)  # δ of randomized_variable_uncertainty
    random_fraction: float = bounded(0.2, gt=0, lt=1)  # ν of split
    fading: float = bounded(1.0, gt=0, le=1)  # prequential fading factor α
    max_samples: int = bounded(0, ge=0, note="0: the whole stream")
    log_every: int = bounded(100, ge=1)  # samples between metric lines
    threads: int = bounded(1, ge=1)
