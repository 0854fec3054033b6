"""Task runner of `task=stream_td|stream_q|stream_sarsa|stream_ac` (stream-x, Elsayed et al. 2024).

The composing step only: options → environment → agent → loop → checkpoint → stream. Streaming
learners are single-process; seeds run side by side with `plait -m task=stream_q seed=0,1,2,3,4`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Optional

import torch

from streaming_rl.agents import AGENTS, AgentSpec, build_agent
from streaming_rl.config import (StreamConfig, env_id, exploration_fraction, hidden_size, task_config,
                                 total_steps)
from streaming_rl.envs import EnvError, family, make_env
from streaming_rl.loop import Diverged, ObservationPipeline, StreamLoop
from streaming_rl.normalize import RewardScaler
from trainer.checkpoint import Checkpointer
from trainer.config import ConfigError, PlaitConfig, as_dict
from trainer.errors import EXIT_BAD_INPUT
from trainer.launch.distributed import DistEnv
from trainer.metrics import MetricLogger
from trainer.launch.preemption import Preempted, PreemptionHandler
from trainer.checkpoint.state import Progress, RNGState

BAR_CHUNK = 1000  # progress-bar updates are batched: one per step would cost more than the step


def build_loop(cfg: PlaitConfig, c: StreamConfig) -> tuple[StreamLoop, int]:
    """Environment, agent and loop of a run; returns the loop and its total environment steps."""
    steps = total_steps(cfg, c)
    env = make_env(env_id(cfg, c), c.max_episode_steps)
    fam = family(env)
    space = env.observation_space
    if not (hasattr(space, "shape") and space.shape is not None and len(space.shape) in (1, 3)):
        raise ConfigError(f"env={env.spec.id} has observations {space}; stream-x networks take flat vectors "
                          "or (H, W, C) frames")
    limit = env.spec.max_episode_steps if env.spec is not None else None
    observe = ObservationPipeline(space.shape, c.normalize_obs, limit if use_time_feature(c, env, limit) else None)
    spec = AgentSpec(cfg=c, obs_shape=observe.shape, action_space=env.action_space,
                     hidden_size=hidden_size(c, fam), total_steps=steps,
                     exploration_fraction=exploration_fraction(c, fam))
    if AGENTS[c.agent].discrete_only and not hasattr(env.action_space, "n"):
        raise ConfigError(f"task.agent={c.agent} needs discrete actions but env={env.spec.id} has "
                          f"{env.action_space}; use task=stream_ac for continuous actions")
    agent = build_agent(c.agent, spec)
    return StreamLoop(env, agent, observe, RewardScaler(c.gamma, c.scale_rewards), cfg.seed), steps


def use_time_feature(c: StreamConfig, env, limit: Optional[int]) -> bool:
    """`task.time_feature`, or when it is null: on for flat observations under a time limit."""
    flat = len(env.observation_space.shape) == 1
    if c.time_feature is None:
        return flat and bool(limit)
    if c.time_feature and not limit:
        raise ConfigError(f"task.time_feature=true but {env.spec.id} has no time limit; set task.max_episode_steps")
    if c.time_feature and not flat:
        raise ConfigError(f"task.time_feature=true but {env.spec.id} has observations of shape "
                          f"{env.observation_space.shape}; the time feature needs flat vectors")
    return c.time_feature


def _refuse(message: str, is_main: bool):
    if is_main:
        print(f"plait: error: bad config: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT)


def run(cfg: PlaitConfig, env: DistEnv) -> dict:
    if env.world_size > 1:
        _refuse(f"task={cfg.task['name']} is a single-process streaming learner but the run has "
                f"{env.world_size} ranks; run seeds side by side instead: plait -m task={cfg.task['name']} "
                "seed=0,1,2,3,4", env.is_main)
    try:
        c = task_config(cfg)
        torch.set_num_threads(c.threads)
        loop, steps = build_loop(cfg, c)
    except (ConfigError, EnvError) as err:
        _refuse(str(err), env.is_main)
    if cfg.device not in ("auto", "cpu"):
        print(f"plait: note: streaming learners run on the CPU (device={cfg.device} ignored): per-sample "
              "updates of small networks are bound by latency, not arithmetic", file=sys.stderr)

    progress = Progress()
    components = {**loop.components(), "rng": RNGState(env.rank), "progress": progress}
    name = env_id(cfg, c)
    checkpointer = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last,
                                async_save=cfg.checkpoint.async_save,
                                meta={"task": cfg.task["name"], "env": name, "config": as_dict(cfg),
                                      "world_size": 1})
    log = MetricLogger(cfg.run_dir, cfg.logger, as_dict(cfg), steps, is_main=env.is_main)
    agent = loop.agent
    n_params = sum(p.numel() for p in agent.networks.parameters())
    log.text(f"plait: stream {c.agent} on {name} ({loop.env_state.family}), {n_params:,} parameters, "
             f"{steps:,} steps, optimizer {c.optimizer}, seed {cfg.seed}")
    resume = checkpointer.resolve(cfg.checkpoint.resume)
    if resume is not None:
        manifest = checkpointer.load(resume, components)
        if not loop.env_state.exact:
            loop.restart_episode()
            log.text(f"{name}: its state cannot be captured; the resumed run starts a fresh episode")
        saved_steps = manifest.get("config", {}).get("trainer", {}).get("total_steps")
        if saved_steps not in (None, cfg.trainer.total_steps) and hasattr(agent, "epsilon"):
            log.text(f"note: trainer.total_steps was {saved_steps} when saved: the ε schedule's horizon moves")
        log.text(f"resumed from {resume} at step {progress.step} (episode {loop.episode.count + 1}, "
                 f"step {loop.episode.length} of it)")
        log.advance(progress.step)
    try:
        recent = stream(cfg, c, loop, steps, progress, components, checkpointer, log, resumed=resume is not None)
    except Diverged as err:
        print(f"plait: error: step {progress.step + 1}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        log.close()
    result = {"steps": progress.step, "episodes": loop.episode.count,
              "mean_return_last_20": sum(recent) / len(recent) if recent else float("nan")}
    if env.is_main:
        print(f"plait: done at step {progress.step:,}: {loop.episode.count} episodes, mean return of the "
              f"last {len(recent)} {result['mean_return_last_20']:.2f}; run dir {cfg.run_dir}", flush=True)
    return result


def stream(cfg: PlaitConfig, c: StreamConfig, loop: StreamLoop, steps: int, progress: Progress,
           components: dict, checkpointer: Checkpointer, log: MetricLogger, resumed: bool) -> deque:
    """Step until `steps`: episode metrics, summaries, checkpoints every `checkpoint.every` steps,
    and a save-then-stop on a preemption signal. Returns the last 20 episodic returns."""
    agent = loop.agent
    preemption = PreemptionHandler()
    recent: deque = deque(maxlen=20)
    every, summary = cfg.checkpoint.every, c.summary_every
    saved_at = progress.step if resumed else -1
    window_start, window_step, unshown = time.perf_counter(), progress.step, 0

    def save() -> None:
        nonlocal saved_at
        path = checkpointer.save(progress.step, components, counters={"episodes": loop.episode.count})
        saved_at = progress.step
        log.text(f"checkpoint: {path}")

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
            if (every and step % every == 0) or (step == steps and cfg.checkpoint.save_final):
                save()
            else:
                checkpointer.poll()
            # One process, no ranks to agree with: the flag itself, not a collective, every step.
            if preemption.received is not None:
                if saved_at != step:
                    save()
                checkpointer.wait()
                raise Preempted(step, preemption.received)
        checkpointer.close()
    finally:
        log.advance(unshown)
        preemption.restore()
    return recent
