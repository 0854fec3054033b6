"""Task families `rlhf`, `sft` and `rm` (HybridFlow's dataflow and the two stages before it).
Options in rlhf/config.py; runners rlhf/run.py, rlhf/sft.py, rlhf/rm.py. Light to import: the
checks load prompts, tokenizers and registries only when they run."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

from rlhf.config import ROLES, RLHFOptions, RMOptions, SFTOptions
from trainer.config import PlaitConfig
from trainer.errors import ConfigError
from trainer.launch.ray_cluster import check_ray_nodes
from trainer.task import TaskFamily


def micro_batches_of(layout) -> int:
    """A role's pipeline microbatches (-1: pp, the fewest that keep every stage busy)."""
    return layout.pp if layout.microbatches == -1 else layout.microbatches


def check_layout(cfg: PlaitConfig, key: str, layout) -> None:
    """What a role's layout may be in this release, and that the model splits under it."""
    if layout.pp > 1:
        from parallel.pipeline import schedule_problem

        problem = schedule_problem(layout.schedule, layout.pp, layout.virtual_stages, micro_batches_of(layout),
                                   cfg.model.n_layers)
        if problem:
            raise ConfigError(f"{key}.schedule={layout.schedule} with {key}.pp={layout.pp}: {problem}")
    if layout.dp_shard == -1:
        raise ConfigError(f"{key}.dp_shard=-1: give a role's data-parallel size explicitly")
    if layout.sequence_parallel:
        raise ConfigError(f"{key}.sequence_parallel=true: not supported with left-padded RLHF batches")
    if layout.dp_backend == "deepspeed" and (layout.tp > 1 or layout.pp > 1):
        raise ConfigError(f"{key}.dp_backend=deepspeed partitions over all of the role's ranks: it takes "
                          f"{key}.tp=1 and {key}.pp=1 (use fsdp to combine data parallelism with them)")
    if layout.dp_backend != "deepspeed" and layout.zero_stage != 1:
        raise ConfigError(f"{key}.zero_stage={layout.zero_stage} applies to {key}.dp_backend=deepspeed only")
    m = cfg.model
    for what, n in (("n_heads", m.n_heads), ("n_kv_heads", m.n_kv_heads), ("vocab_size", m.vocab_size)):
        if n % layout.tp:
            raise ConfigError(f"{key}.tp={layout.tp} does not divide model.{what}={n}")


def check_checkpoint(key: str, path: str) -> None:
    if path and not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r}: no such checkpoint directory")


def check_prompts(cfg: PlaitConfig, data, key: str, extra_tokens: int) -> None:
    """Prompts load, the tokenizer fits the model, prompt + generated tokens fit its context."""
    from rlhf.data.prompts import build_vocabulary, prompt_records

    vocab = build_vocabulary(data, f"{key}.tokenizer")
    size = vocab.tokenizer.get_vocab_size()
    if size > cfg.model.vocab_size:
        raise ConfigError(f"{key}.tokenizer has {size} tokens but model.vocab_size={cfg.model.vocab_size}")
    rows = prompt_records(data, "train", cfg.seed, key)
    longest = max(len(vocab.encode_prompt(r["prompt"])) for r in rows[:2048])
    if longest + extra_tokens > cfg.model.max_seq_len:
        raise ConfigError(f"prompts of up to {longest} tokens + {extra_tokens} more exceed "
                          f"model.max_seq_len={cfg.model.max_seq_len}")


def check_rlhf(cfg: PlaitConfig, launcher_world: Optional[int]) -> int:
    o: RLHFOptions = cfg.task
    # the driver (it starts the workers itself); in a Slurm job of N nodes, one task per node
    world = check_ray_nodes(cfg, launcher_world, o.backend, o.ray_address)
    from rlhf.run import active_roles
    from rlhf.sizes import derive_sizes
    from rlhf.workers.base import layout_dims

    roles = active_roles(o)
    for role in ROLES:
        check_layout(cfg, f"task.{role}", getattr(o, role))
    if o.backend == "local":
        wide = [r for r in roles if layout_dims(getattr(o, r)).world_size > 1]
        if wide:
            raise ConfigError(f"task.backend=local runs one worker per role, but task.{wide[0]} asks for "
                              f"{layout_dims(getattr(o, wide[0])).world_size}; use task.backend=ray")
    elif o.placement == "colocate":
        sizes = {r: layout_dims(getattr(o, r)).world_size for r in roles}
        if len(set(sizes.values())) > 1:
            raise ConfigError("task.placement=colocate runs every role in one set of processes, so every role "
                              "needs as many: " + ", ".join(f"task.{r}: {n}" for r, n in sizes.items()))
    if o.offload_idle == "on" and (o.placement != "colocate" or o.backend != "ray"):
        raise ConfigError("task.offload_idle=on moves idle colocated roles to host memory: it needs "
                          f"task.placement=colocate on task.backend=ray (got {o.placement} on {o.backend})")
    if o.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("task.backend=ray needs Ray: pip install 'plait[rlhf]' (or task.backend=local)")
    derive_sizes(o, {r: layout_dims(getattr(o, r)).dp for r in roles if r in ("actor", "critic")})
    if o.rollout_tp:
        a = o.actor
        actor_world = layout_dims(a).world_size
        if a.dp_shard > 1:  # FSDP: generation groups of rollout_tp consecutive ranks
            if a.pp > 1 or a.dp_replicate > 1 or a.dp_backend != "fsdp" or actor_world % o.rollout_tp:
                raise ConfigError(f"task.rollout_tp={o.rollout_tp} with task.actor.dp_shard={a.dp_shard}: needs "
                                  f"dp_backend=fsdp, pp=1, dp_replicate=1 and rollout_tp dividing the actor's "
                                  f"{actor_world} ranks")
        elif a.tp % o.rollout_tp:
            raise ConfigError(f"task.rollout_tp={o.rollout_tp} must divide task.actor.tp={a.tp}")
        elif a.dp_replicate > 1 and a.dp_backend != "fsdp":
            raise ConfigError(f"task.rollout_tp={o.rollout_tp} with task.actor.dp_replicate={a.dp_replicate} needs "
                              f"task.actor.dp_backend=fsdp (got {a.dp_backend})")
    if o.rollout_pp > 1:
        if not o.rollout_tp or o.actor.pp % o.rollout_pp or o.actor.dp_shard > 1:
            raise ConfigError(f"task.rollout_pp={o.rollout_pp} (generation pipeline stages) needs task.rollout_tp set "
                              f"and must divide task.actor.pp={o.actor.pp} (without dp_shard; got "
                              f"rollout_tp={o.rollout_tp}, dp_shard={o.actor.dp_shard})")
        if o.rollout_engine != "plait":
            raise ConfigError(f"task.rollout_engine={o.rollout_engine} with task.rollout_pp={o.rollout_pp}: an "
                              "external engine reads whole-model weights; generate with task.rollout_pp=1")
    from rlhf.rollout_engine import resolve_engine

    resolve_engine(o.rollout_engine)
    if o.rollout_engine != "plait" and o.actor.pp > 1 and not o.rollout_tp:
        raise ConfigError(f"task.rollout_engine={o.rollout_engine} needs the weights without pipeline stages, but "
                          f"task.actor.pp={o.actor.pp}: set task.rollout_tp (the 3D-HybridEngine gathers them)")
    for key in ("init_from", "critic_init_from", "reward_model_from"):
        check_checkpoint(f"task.{key}", getattr(o, key))
    if not o.reward_model_from:
        from rlhf.rewards import resolve_reward

        resolve_reward(o.reward)
    check_prompts(cfg, o.prompts, "task.prompts", o.max_new_tokens)
    return world


def check_pairs(cfg: PlaitConfig, launcher_world: Optional[int]) -> int:
    """sft and rm: SPMD ranks like pretraining, so the launcher's world is the layout's."""
    from trainer.config import check_combinations

    o = cfg.task
    check_checkpoint("task.init_from", getattr(o, "init_from", ""))
    check_prompts(cfg, o.data, "task.data", 0)
    if o.max_length > cfg.model.max_seq_len:
        raise ConfigError(f"task.max_length={o.max_length} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    return check_combinations(cfg, launcher_world, seq_len=("task.max_length", o.max_length))


RLHF = TaskFamily(name="rlhf", options=RLHFOptions, runners=("rlhf.run.run",),
                  reads=("model", "optim", "trainer.precision"), check=check_rlhf)
SFT = TaskFamily(name="sft", options=SFTOptions, runners=("rlhf.sft.run",),
                 reads=("model", "optim", "parallel", "trainer"), check=check_pairs)
RM = TaskFamily(name="rm", options=RMOptions, runners=("rlhf.rm.run",),
                reads=("model", "optim", "parallel", "trainer"), check=check_pairs)
