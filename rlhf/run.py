"""Task runner of `task=rlhf` (HybridFlow's single controller): the composing step only.

options → tokenizer, prompts → role worker groups (Ray actors or in-process) → driver →
checkpoint (every role from its own group, one atomic step) → iterations → plot.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import torch

from rlhf.config import RLHFOptions
from rlhf.data.prompts import PromptLoader, build_vocabulary, prompt_records
from rlhf.driver import RLHFDriver, needs_critic, needs_reference
from rlhf.groups.base import WorkerFailure, WorkerGroup
from rlhf.kl_control import KL_CONTROLLERS
from rlhf.plot import plot_curves
from rlhf.rewards import resolve_reward
from rlhf.sizes import BatchSizes, derive_sizes
from rlhf.task import micro_batches_of
from rlhf.workers import WORKER_CLASSES
from rlhf.workers.base import WorkerSpec, layout_dims, replace
from rlhf.workers.critic import value_config
from trainer.boundary import StepBoundary
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.manifest import CheckpointError
from trainer.checkpoint.state import Progress, RNGState
from trainer.config import PlaitConfig, as_dict
from trainer.errors import ConfigError
from trainer.launch.distributed import DistEnv
from trainer.launch.preemption import PreemptionHandler
from trainer.metrics import MetricLogger

SHOWN = ("reward", "accuracy", "eval/accuracy", "kl", "entropy", "response_length", "logprob_mismatch_max",
         "tokens_per_s")


def active_roles(o: RLHFOptions) -> list[str]:
    roles = ["actor"]
    if needs_reference(o):
        roles.append("reference")
    if needs_critic(o):
        roles.append("critic")
    if o.reward_model_from:
        roles.append("reward_model")
    return roles


def role_spec(cfg: PlaitConfig, o: RLHFOptions, role: str, vocab, sizes: BatchSizes) -> WorkerSpec:
    layout = getattr(o, role)
    if layout.microbatches == -1:
        layout = replace(layout, microbatches=micro_batches_of(layout))
    model = value_config(cfg.model) if role in ("critic", "reward_model") else cfg.model
    lr = o.critic_lr if role == "critic" else o.actor_lr
    optim = replace(cfg.optim, lr=lr, warmup_steps=0, schedule="constant")
    dims = layout_dims(layout)
    micro = sizes.micro_batches_per_worker.get(role, 1)  # trained roles: DeepSpeed's accumulation steps
    return WorkerSpec(role=role, rank=0, world_size=dims.world_size, model=model, layout=layout,
                      optim=optim, options=o, seed=cfg.seed, precision=cfg.trainer.precision, device=cfg.device,
                      checkpoint_dir=cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last,
                      eos_id=vocab.eos_id, pad_id=vocab.pad_id, micro_batches=micro)


def start_groups(cfg: PlaitConfig, o: RLHFOptions, roles: list[str], vocab,
                 sizes: BatchSizes) -> dict[str, WorkerGroup]:
    """Every role's worker group, built; on failure the ones already started are stopped."""
    groups: dict[str, WorkerGroup] = {}
    try:
        if o.backend == "local":
            from rlhf.groups.local import LocalWorkerGroup

            for role in roles:
                groups[role] = LocalWorkerGroup(role, WORKER_CLASSES[role], role_spec(cfg, o, role, vocab, sizes))
        else:
            from rlhf.groups.ray_group import RayPool, RayWorkerGroup, worker_resources

            specs = {role: role_spec(cfg, o, role, vocab, sizes) for role in roles}
            colocate = o.placement == "colocate"
            processes = specs["actor"].world_size if colocate else sum(s.world_size for s in specs.values())
            cpus, gpus = worker_resources(cfg.device, processes)
            offload = colocate and (o.offload_idle == "on" or (o.offload_idle == "auto" and gpus > 0))
            pool = RayPool(processes, cpus, gpus, o.worker_timeout, name="colocated", offload=offload) \
                if colocate else None
            try:
                for role in roles:
                    groups[role] = RayWorkerGroup(role, WORKER_CLASSES[role], specs[role], num_cpus=cpus,
                                                  num_gpus=gpus, timeout=o.worker_timeout, pool=pool)
            finally:
                if pool is not None and not pool.roles:
                    pool.close()
        for group in groups.values():  # on Ray, the models build in parallel
            group.pending_start = group.init_model.future()
        for group in groups.values():
            group.started(group.pending_start.result())
    except BaseException:
        close_groups(groups)
        raise
    return groups


def close_groups(groups: dict[str, WorkerGroup]) -> None:
    for group in groups.values():
        try:
            group.close()
        except Exception as err:  # closing the rest matters more
            print(f"plait: warning: closing the {group.role} workers: {err}", file=sys.stderr)


class RunCheckpoint:
    """The run's checkpoints: each role saves from its own group into one step with the driver's
    state; the step is visible only once all have (trainer/checkpoint's multi-role steps)."""

    async_save = False

    def __init__(self, cfg: PlaitConfig, groups: dict[str, WorkerGroup], meta: dict):
        self.groups = groups
        self.roles = tuple(groups) + ("driver",)
        self.attempt = uuid.uuid4().hex
        self.keep_last = cfg.checkpoint.keep_last
        self.driver = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last, meta=meta, role="driver",
                                   roles=self.roles, attempt=self.attempt)

    def save(self, step: int, components: dict, counters=None) -> Path:
        request = {"step": step, "roles": self.roles, "attempt": self.attempt, "counters": counters}
        pending = [g.save.future(request) for g in self.groups.values()]  # every role at once
        for p in pending:
            p.result()
        return self.driver.save(step, components, counters=counters)

    def load(self, path: Path, components: dict) -> dict:
        manifest = self.driver.load(path, components, role="driver")
        pending = [g.load.future(str(path)) for g in self.groups.values()]
        for p in pending:
            p.result()
        return manifest

    def poll(self):
        return None

    def wait(self):
        return None

    def close(self) -> None:
        self.driver.close()


def run(cfg: PlaitConfig, env: DistEnv) -> Optional[dict]:
    """The driver in this process; under a Slurm job of N nodes (one task each), on task 0 of a Ray
    cluster spanning them (the other tasks host Ray nodes and return None)."""
    if env.world_size > 1:
        from trainer.launch.ray_cluster import on_ray_cluster

        return on_ray_cluster(env, cfg.run_dir, lambda address: drive(cfg, address, nodes=env.world_size))
    return drive(cfg, cfg.task.ray_address)


def drive(cfg: PlaitConfig, ray_address: str, nodes: int = 1) -> dict:
    o: RLHFOptions = cfg.task
    torch.set_num_threads(o.threads)
    vocab = build_vocabulary(o.prompts)
    loader = PromptLoader(prompt_records(o.prompts, "train", cfg.seed), o.prompts_per_iteration, cfg.seed)
    heldout = prompt_records(o.prompts, "heldout", cfg.seed)
    roles = active_roles(o)
    sizes = derive_sizes(o, {r: layout_dims(getattr(o, r)).dp for r in roles if r in ("actor", "critic")})
    log = MetricLogger(cfg.run_dir, cfg.logger, as_dict(cfg), o.iterations, is_main=True)
    log.text(f"plait: rlhf {o.algorithm} on {o.backend}: roles "
             + ", ".join(f"{r} ×{layout_dims(getattr(o, r)).world_size}" for r in roles)
             + f"; {o.iterations} iterations; {len(loader.records)} training prompts, {len(heldout)} held out")
    log.text(sizes.describe())
    vocab.tokenizer.save(str(Path(cfg.run_dir) / "tokenizer.json"))  # beside the checkpoints: exports ship it

    started_ray = False
    if o.backend == "ray":
        from rlhf.groups.ray_group import ensure_ray

        started_ray = ensure_ray(ray_address)
    groups: dict[str, WorkerGroup] = {}
    boundary = None
    try:
        if nodes > 1:
            from trainer.launch.ray_cluster import cluster_line, wait_for_nodes

            log.text(cluster_line(wait_for_nodes(nodes)))
        start = time.perf_counter()
        groups = start_groups(cfg, o, roles, vocab, sizes)
        log.text(f"workers ready in {time.perf_counter() - start:.1f}s{placement_text(groups)}")
        log.text(resident_line(groups))
        if o.rollout_tp:
            log.text(hybrid_line(o))
        kl_ctrl = KL_CONTROLLERS.get(o.kl_ctrl)(*((o.kl_coef, o.kl_target, o.kl_horizon) if o.kl_ctrl == "adaptive"
                                                  else (o.kl_coef,)))
        driver = RLHFDriver(o, groups, vocab, loader, heldout, None if o.reward_model_from else resolve_reward(o.reward),
                            kl_ctrl, cfg.seed)
        progress = Progress()
        components = {"progress": progress, "prompts": loader, "kl_ctrl": kl_ctrl, "rng": RNGState(0, seed=cfg.seed)}
        checkpoint = RunCheckpoint(cfg, groups, meta={"task": o.name, "config": as_dict(cfg), "worker_roles": roles})
        resume = checkpoint.driver.resolve(cfg.checkpoint.resume)
        if resume is not None:
            checkpoint.load(resume, components)
            log.text(f"resumed from {resume} at iteration {progress.step}")
            log.advance(progress.step)
        boundary = StepBoundary(checkpoint, components, every=cfg.checkpoint.every, last=o.iterations,
                                save_final=cfg.checkpoint.save_final, log=log.text, preemption=PreemptionHandler(),
                                counters=lambda: {"prompts": loader.drawn},
                                saved_at=progress.step if resume is not None else -1)
        history = iterate(o, driver, progress, boundary, log)
    except WorkerFailure as failure:
        if isinstance(failure.cause, (ConfigError, CheckpointError)):  # bad input found by a worker: one line, exit 2
            raise type(failure.cause)(f"[{failure.role} rank {failure.rank}] {failure.cause}") from None
        print(f"plait: error: {failure}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if boundary is not None:
            boundary.close()
        close_groups(groups)
        log.close()
        if started_ray:
            import ray

            ray.shutdown()
    if history:
        plot_curves(Path(cfg.run_dir) / "metrics.jsonl", Path(cfg.run_dir) / "rlhf_curves.png", o.algorithm)
    final = history[-1] if history else {}
    evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
    result = {"iterations": progress.step, "eval_accuracy": evals[-1] if evals else float("nan"),
              "first_eval_accuracy": evals[0] if evals else float("nan"), "reward": final.get("reward", float("nan"))}
    print(f"plait: done at iteration {progress.step}: held-out accuracy "
          f"{result['first_eval_accuracy']:.3f} -> {result['eval_accuracy']:.3f}; run dir {cfg.run_dir}", flush=True)
    return result


def placement_text(groups: dict[str, WorkerGroup]) -> str:
    """'; actor ×2 on 2 nodes, ...' for Ray groups whose workers span several nodes."""
    spans = {role: len(set(g.pool.nodes)) for role, g in groups.items() if getattr(g, "pool", None) is not None}
    if max(spans.values(), default=1) <= 1:
        return ""
    return "; " + ", ".join(f"{role} ×{groups[role].world_size} on {n} node{'s' * (n > 1)}" for role, n in spans.items())


def hybrid_line(o: RLHFOptions) -> str:
    """Where the 3D-HybridEngine takes the actor: its training and generation layouts."""
    a, dims = o.actor, layout_dims(o.actor)
    gen_dp = dims.world_size // (o.rollout_pp * o.rollout_tp)
    return (f"actor trains under pp={a.pp} × tp={a.tp} × dp={dims.dp} and generates under pp={o.rollout_pp} × "
            f"tp={o.rollout_tp} × dp={gen_dp} (3D-HybridEngine: weights resharded each iteration)")


def resident_line(groups: dict[str, WorkerGroup]) -> str:
    """Each role's largest per-rank parameter, gradient and optimizer-state bytes."""
    parts = []
    for role, g in groups.items():
        sizes = g.resident_bytes()
        moved = max(r.get("offloaded", 0) for r in sizes)
        parts.append(f"{role} " + ", ".join(f"{k} {max(r[k] for r in sizes) / 2**20:.2f} MiB"
                                            for k in ("params", "grads", "optimizer"))
                     + (f" (moved to host and back while idle: {moved / 2**20:.2f} MiB so far)" if moved else ""))
    return "resident per rank: " + "; ".join(parts)


def iterate(o: RLHFOptions, driver: RLHFDriver, progress: Progress, boundary: StepBoundary,
            log: MetricLogger) -> list[dict]:
    """Iterations until `task.iterations`, with held-out evaluations and the step boundary."""
    history = []
    if progress.step == 0:
        first = driver.evaluate(0)
        log.log(0, first)
        history.append(first)
        log.text(f"iteration 0: held-out accuracy {first['eval/accuracy']:.3f}")
    while progress.step < o.iterations:
        it = progress.step + 1
        metrics = driver.step(it)
        if (o.eval_every and it % o.eval_every == 0) or it == o.iterations:
            metrics.update(driver.evaluate(it))
        progress.step = it
        progress.samples += metrics["responses"]
        log.log(it, metrics)
        history.append(metrics)
        log.advance()
        shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in SHOWN if k in metrics)
        if log.bar is not None:
            log.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in SHOWN[:3] if k in metrics}, refresh=False)
        else:
            log.text(f"iteration {it:>4}  {shown}")
        if it == 1 or it == o.iterations:  # optimizer state exists after the first update
            log.text(resident_line(driver.groups))
        boundary(it)
    return history
