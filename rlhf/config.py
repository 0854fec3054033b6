"""Options of the RLHF tasks (`task=rlhf|sft|rm`): typed dataclasses holding every default once
(trainer/task.py's contract), stored in Hydra's ConfigStore as `task_options/rlhf|sft|rm`.

One unit per batch size (HybridFlow §2's iteration; verl's names in brackets):

- `prompts_per_iteration`      prompts drawn per iteration [data.train_batch_size]
- `samples_per_prompt`         responses sampled per prompt [rollout.n]
- `prompts_per_minibatch`      prompts per optimizer mini-batch; its responses = × samples_per_prompt
                               [ppo_mini_batch_size, in prompts]
- `responses_per_micro_batch`  responses one worker runs per forward/backward (memory only: the
                               gradient does not depend on it) [ppo_micro_batch_size_per_gpu]
- `epochs_per_iteration`       passes over the iteration's responses [ppo_epochs]

so an iteration makes prompts_per_iteration × samples_per_prompt responses and
epochs_per_iteration × prompts_per_iteration / prompts_per_minibatch optimizer updates per role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trainer.config import ParallelConfig, bounded, choice
from trainer.task import TaskOptions

ALGORITHMS = ("grpo", "ppo", "rloo", "remax", "reinforce_pp")
ROLES = ("actor", "reference", "critic", "reward_model")


@dataclass
class PromptData:
    """Where prompts (and, for the built-in task, their answers) come from."""

    # "arithmetic": the built-in generated task (rlhf/data/arithmetic.py); else a local .jsonl/.parquet file
    source: str = "arithmetic"
    prompt_field: str = "prompt"
    answer_field: str = "answer"  # passed to the reward function (may be absent for a reward model)
    tokenizer: str = "chars"  # "chars": the arithmetic alphabet; else a tokenizer.json path
    digits: int = bounded(2, ge=1, le=9)  # arithmetic: operands of 1..digits digits
    operators: str = "+"  # arithmetic: any of + - *
    reverse_answer: bool = True  # arithmetic: answers least significant digit first (learnable by small models)
    train_size: int = bounded(4096, ge=1)  # arithmetic: training problems (a file: all its rows)
    heldout_size: int = bounded(256, ge=1)  # arithmetic: held-out problems for exact-match accuracy


@dataclass
class RLHFOptions(TaskOptions):
    algorithm: str = choice("grpo", *ALGORITHMS[1:])
    backend: str = choice("ray", "local")  # local: every role in the driver process, world size 1 (a debugger works)
    # ray: each role on its own resource pool (split), or every role in one set of processes (colocate)
    placement: str = choice("split", "colocate")
    # colocated roles move their parameters, gradients and optimizer state to host memory while
    # another role of their process runs: auto = on GPUs; on (on a CPU host: a copy, to check it); off
    offload_idle: str = choice("auto", "on", "off")
    init_from: str = ""  # an SFT or pretrain checkpoint (step dir or run's checkpoint dir); "" = random init
    critic_init_from: str = ""  # the critic's trunk (e.g. a task=rm checkpoint); "" = the actor's init_from
    reward_model_from: str = ""  # a task=rm checkpoint: score with a reward-model worker instead of `reward`
    reward: str = "exact_match"  # a registered reward function (rlhf/rewards.py) or module:function
    prompts: PromptData = field(default_factory=PromptData)
    iterations: int = bounded(150, ge=1)
    # batch sizes (units in the module docstring)
    prompts_per_iteration: int = bounded(32, ge=1)
    samples_per_prompt: int = bounded(8, ge=1)
    prompts_per_minibatch: int = bounded(16, ge=1)
    responses_per_micro_batch: int = bounded(64, ge=1)
    epochs_per_iteration: int = bounded(1, ge=1)
    # rollout
    max_new_tokens: int = bounded(8, ge=1)
    temperature: float = bounded(1.0, gt=0)
    top_k: int = bounded(0, ge=0, note="0 for no top-k")
    top_p: float = bounded(1.0, gt=0, le=1)
    # the 3D-HybridEngine: generate under tensor parallelism rollout_tp (dividing task.actor.tp) with
    # tp / rollout_tp times the data parallelism, resharding the actor's weights each iteration
    rollout_tp: int = bounded(0, ge=0, note="0 to generate in the actor's training layout")
    # ... and with rollout_pp pipeline stages (1, or dividing task.actor.pp; needs rollout_tp)
    rollout_pp: int = bounded(1, ge=1)
    # what generates: Plait's KV-cache engine, or package.module:Class (rlhf/rollout_engine.py's interface)
    rollout_engine: str = "plait"
    # optimisation (optim.* holds the optimizer; these are the per-role rates)
    actor_lr: float = bounded(3e-4, gt=0)  # the tiny demo model's; large models want ~1e-6
    critic_lr: float = bounded(1e-3, gt=0)
    loss_agg_mode: str = choice("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
    clip_ratio_low: float = bounded(0.2, ge=0, lt=1)
    clip_ratio_high: float = bounded(0.2, ge=0)
    clip_ratio_c: Optional[float] = bounded(None, gt=1, note="null for no dual-clip")
    cliprange_value: Optional[float] = bounded(0.5, gt=0, note="null for an unclipped value loss")
    entropy_coef: float = bounded(0.0, ge=0)
    # KL to the reference: as a loss (k1/k2/k3) and/or as a reward penalty (fixed or adaptive β)
    use_kl_loss: bool = False
    kl_loss_coef: float = bounded(0.001, ge=0)
    kl_estimator: str = choice("k3", "k1", "k2")
    kl_in_reward: bool = False
    kl_coef: float = bounded(0.001, ge=0)
    kl_ctrl: str = choice("fixed", "adaptive")
    kl_target: float = bounded(0.1, gt=0)
    kl_horizon: int = bounded(10000, ge=1)
    # advantages
    gamma: float = bounded(1.0, ge=0, le=1)
    lam: float = bounded(1.0, ge=0, le=1)
    norm_adv_by_std: bool = True  # grpo: false is Dr. GRPO
    # each role's layout (parallel/: dp_shard, dp_replicate, tp; dp_backend fsdp|ddp|deepspeed)
    actor: ParallelConfig = field(default_factory=ParallelConfig)
    reference: ParallelConfig = field(default_factory=ParallelConfig)
    critic: ParallelConfig = field(default_factory=ParallelConfig)
    reward_model: ParallelConfig = field(default_factory=ParallelConfig)
    # plumbing
    eval_every: int = bounded(10, ge=0, note="0 for only at the end")  # iterations between held-out evaluations
    threads: int = bounded(1, ge=1)  # torch threads per worker
    worker_timeout: float = bounded(600.0, gt=0)  # seconds a worker call may take before the run stops
    ray_address: str = ""  # "" starts a local Ray; else an existing cluster's address


@dataclass
class SFTOptions(TaskOptions):
    """`task=sft`: supervised fine-tuning on prompt/response pairs, the loss on response tokens only.
    The batches are trainer.* (batch_size = pairs per optimizer step), the layout parallel.*, the
    starting weights checkpoint.init_from (a pretrain checkpoint), as in pretraining."""

    data: PromptData = field(default_factory=PromptData)
    response_field: str = "response"  # a file's field holding the target response
    max_length: int = bounded(32, ge=2)  # prompt + response tokens per pair (longer pairs are an error)


@dataclass
class RMOptions(TaskOptions):
    """`task=rm`: a reward model (Llama trunk + scalar head) trained on chosen/rejected pairs with
    the Bradley–Terry loss −log σ(r_chosen − r_rejected). Layout and loop as pretraining's; the
    network is model.* with a scalar head (llama_value)."""

    data: PromptData = field(default_factory=PromptData)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_length: int = bounded(32, ge=2)
