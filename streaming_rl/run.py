"""Task runner of `task=stream_td|stream_q|stream_sarsa|stream_ac` (stream-x, Elsayed et al. 2024).

The composing step only: options → environment → agent → loop → checkpoint → stream. Streaming
learners are single-process; seeds run side by side with `plait -m task=stream_q seed=0,1,2,3,4`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Optional

import gymnasium as gym
import torch

from streaming_rl.agents import AGENTS, AgentSpec, build_agent
from streaming_rl.config import StreamConfig, exploration_fraction, hidden_size
from streaming_rl.envs import family, make_env
from streaming_rl.loop import Diverged, ObservationPipeline, StreamLoop
from streaming_rl.normalize import RewardScaler
from trainer.boundary import StepBoundary
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import Progress, RNGState
from trainer.config import PlaitConfig, as_dict
from trainer.errors import ConfigError
from trainer.launch.distributed import DistEnv
from trainer.launch.preemption import PreemptionHandler
from trainer.metrics import MetricLogger

BAR_CHUNK = 1000  # progress-bar updates are batched: one per step would cost more than the step


def time_limit_used(c: StreamConfig, env: gym.Env) -> Optional[int]:
    """Check that `env` fits the options (observations, actions, time feature); returns the time
    limit the time feature divides by, or None without one. The CLI runs this before any rank."""
    space = env.observation_space
    if not (hasattr(space, "shape") and space.shape is not None and len(space.shape) in (1, 3)):
        raise ConfigError(f"task.env={env.spec.id} has observations {space}; stream-x networks take flat "
                          "vectors or (H, W, C) frames")
    if AGENTS.get(c.agent).discrete_only and not hasattr(env.action_space, "n"):
        raise ConfigError(f"task.agent={c.agent} needs discrete actions but task.env={env.spec.id} has "
                          f"{env.action_space}; use task=stream_ac for continuous actions")
    limit = env.spec.max_episode_steps if env.spec is not None else None
    return limit if use_time_feature(c, env, limit) else None


def build_loop(cfg: PlaitConfig, c: StreamConfig) -> StreamLoop:
    """Environment, agent and loop of a run."""
    env = make_env(c.env, c.max_episode_steps)
    fam = family(env)
    observe = ObservationPipeline(env.observation_space.shape, c.normalize_obs, time_limit_used(c, env))
    spec = AgentSpec(cfg=c, obs_shape=observe.shape, action_space=env.action_space,
                     hidden_size=hidden_size(c, fam), total_steps=c.total_steps,
                     exploration_fraction=exploration_fraction(c, fam))
    return StreamLoop(env, build_agent(c.agent, spec), observe, RewardScaler(c.gamma, c.scale_rewards), cfg.seed)


def use_time_feature(c: StreamConfig, env, limit: Optional[int]) -> bool:
    """`task.time_feature`, or when it is null: on for flat observations under a time limit."""
    flat = len(env.observation_space.shape) == 1
    if c.time_feature is None:
        return flat and bool(limit)
    if c.time_feature and not limit:
        raise ConfigError(f"task.time_feature=true but task.env={env.spec.id} has no time limit; set task.max_episode_steps")
    if c.time_feature and not flat:
        raise ConfigError(f"task.time_feature=true but task.env={env.spec.id} has observations of shape "
                          f"{env.observation_space.shape}; the time feature needs flat vectors")
    return c.time_feature


def run(cfg: PlaitConfig, env: DistEnv) -> dict:
    c: StreamConfig = cfg.task
    torch.set_num_threads(c.threads)
    loop = build_loop(cfg, c)
    if cfg.device not in ("auto", "cpu"):
        print(f"plait: note: streaming learners run on the CPU (device={cfg.device} ignored): per-sample "
              "updates of small networks are bound by latency, not arithmetic", file=sys.stderr)

    progress = Progress()
    components = {**loop.components(), "rng": RNGState(env.rank), "progress": progress}
    checkpointer = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last,
                                async_save=cfg.checkpoint.async_save,
                                meta={"task": c.name, "env": c.env, "config": as_dict(cfg), "world_size": 1})
    log = MetricLogger(cfg.run_dir, cfg.logger, as_dict(cfg), c.total_steps, is_main=env.is_main)
    agent = loop.agent
    n_params = sum(p.numel() for p in agent.networks.parameters())
    log.text(f"plait: stream {c.agent} on {c.env} ({loop.env_state.family}), {n_params:,} parameters, "
             f"{c.total_steps:,} steps, optimizer {c.optimizer}, seed {cfg.seed}")
    resume = checkpointer.resolve(cfg.checkpoint.resume)
    if resume is not None:
        manifest = checkpointer.load(resume, components)
        if not loop.env_state.exact:
            loop.restart_episode()
            log.text(f"{c.env}: its state cannot be captured; the resumed run starts a fresh episode")
        saved_steps = manifest.get("config", {}).get("task", {}).get("total_steps")
        if saved_steps not in (None, c.total_steps) and hasattr(agent, "epsilon"):
            log.text(f"note: task.total_steps was {saved_steps} when saved: the ε schedule's horizon moves")
        log.text(f"resumed from {resume} at step {progress.step} (episode {loop.episode.count + 1}, "
                 f"step {loop.episode.length} of it)")
        log.advance(progress.step)
    boundary = StepBoundary(checkpointer, components, every=cfg.checkpoint.every, last=c.total_steps,
                            save_final=cfg.checkpoint.save_final, log=log.text,
                            counters=lambda: {"episodes": loop.episode.count}, preemption=PreemptionHandler(),
                            saved_at=progress.step if resume is not None else -1)
    try:
        recent = stream(c, loop, progress, boundary, log)
    except Diverged as err:
        print(f"plait: error: step {progress.step + 1}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        boundary.close()
        log.close()
    result = {"steps": progress.step, "episodes": loop.episode.count,
              "mean_return_last_20": sum(recent) / len(recent) if recent else float("nan")}
    if env.is_main:
        print(f"plait: done at step {progress.step:,}: {loop.episode.count} episodes, mean return of the "
              f"last {len(recent)} {result['mean_return_last_20']:.2f}; run dir {cfg.run_dir}", flush=True)
    return result


def stream(c: StreamConfig, loop: StreamLoop, progress: Progress, boundary: StepBoundary,
           log: MetricLogger) -> deque:
    """Step until `task.total_steps`: episode metrics, summaries, and the step boundary (checkpoints,
    save-then-stop on a preemption signal). Returns the last 20 episodic returns."""
    agent = loop.agent
    recent: deque = deque(maxlen=20)
    steps, summary = c.total_steps, c.summary_every
    window_start, window_step, unshown = time.perf_counter(), progress.step, 0
    try:
        while progress.step < steps:
            stats = loop.step()
            progress.step += 1
            progress.samples += 1
            unshown += 1
            step = progress.step
            if stats is not None:
                if hasattr(agent, "epsilon"):
                    stats["epsilon"] = agent.epsilon()
                log.log(step, stats)
                recent.append(stats["episode/return"])
            if unshown >= BAR_CHUNK:
                log.advance(unshown)
                unshown = 0
                if log.bar is not None and recent:
                    log.bar.set_postfix({"return": f"{sum(recent) / len(recent):.4g}",
                                         "episodes": loop.episode.count}, refresh=False)
            if summary and step % summary == 0:
                rate = (step - window_step) / (time.perf_counter() - window_start)
                mean = f"{sum(recent) / len(recent):.2f}" if recent else "-"
                log.text(f"step {step:>9,}  episodes {loop.episode.count:>6}  return (last {len(recent)}) "
                         f"{mean}  {rate:,.0f} steps/s")
                log.log(step, {"steps_per_s": rate})
                window_start, window_step = time.perf_counter(), step
            boundary(step)
    finally:
        log.advance(unshown)
    return recent
