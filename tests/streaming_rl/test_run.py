"""The task runner end to end: metrics, checkpoints, refusals, and exact resume mid-episode."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import streaming_rl.run as stream_run
from streaming_rl.loop import EpisodeState
from trainer.checkpoint import Checkpointer
from trainer.config import validate
from trainer.errors import ConfigError
from trainer.launch.distributed import DistEnv, seed_everything
from trainer.launch.preemption import Preempted

ONE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def config(run_dir, agent, env, steps, every=0, resume="none", world_size=None, **task):
    return validate({
        "task": {"_target_": "streaming_rl.run.run", "name": f"stream_{agent}", "agent": agent,
                 "summary_every": 0, "env": env, "total_steps": steps, **task},
        "seed": 0, "run_dir": str(run_dir),
        "checkpoint": {"every": every, "resume": resume}, "logger": {"progress": False},
    }, world_size=world_size)


def run(cfg):
    seed_everything(cfg.seed)  # what trainer.launch.rank.run_rank does before calling the task
    return stream_run.run(cfg, ONE)


def episodes(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["episode/return"], r["episode/length"]) for r in rows if "episode/return" in r]


def final_state(run_dir, tmp_path):
    latest = Checkpointer(str(run_dir / "checkpoints")).latest()
    out = tmp_path / f"{run_dir.name}.pt"
    dcp_to_torch_save(str(latest), str(out))
    return torch.load(out, weights_only=False)


def assert_same_tensors(a, b, prefix=""):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k], f"{prefix}{k}.")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{prefix}{k} differs"


@pytest.mark.parametrize("agent, env", [("td", "CartPole-v1"), ("q", "Acrobot-v1"), ("sarsa", "CartPole-v1"),
                                        ("ac", "Pendulum-v1"), ("ac", "CartPole-v1")])
def test_each_agent_runs_logs_and_checkpoints(tmp_path, agent, env):
    out = run(config(tmp_path / "run", agent, env, 250, every=100))
    assert out["steps"] == 250
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000000100", "step_000000200", "step_000000250"]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_000000250" / "plait.json").read_text())
    assert {"networks", "agent", "env", "observation", "reward_scaler", "episode", "rng", "progress"} <= set(
        manifest["components"])
    assert manifest["task"] == f"stream_{agent}" and manifest["env"] == env
    if env == "CartPole-v1":  # Acrobot's and Pendulum's first episodes last 200-500 steps
        assert episodes(tmp_path / "run")


def test_stream_q_learns_cartpole(tmp_path):
    """A fixed-seed regression on learning itself: CartPole's return climbs within 5k steps."""
    run(config(tmp_path / "run", "q", "CartPole-v1", 5_000))
    eps = episodes(tmp_path / "run")
    first, last = [r for _, r, _ in eps[:20]], [r for _, r, _ in eps[-10:]]
    assert sum(last) / len(last) > 3 * sum(first) / len(first)


@pytest.mark.parametrize("agent, env, steps, cut", [("q", "CartPole-v1", 900, 437), ("ac", "Hopper-v5", 400, 173)])
def test_resume_mid_episode_is_exact(tmp_path, monkeypatch, agent, env, steps, cut):
    """Stopped (preempted) mid-episode and resumed = never stopped: same episodes, same weights,
    traces, normalizers, RNG and environment state at the end."""
    whole = tmp_path / "whole"
    run(config(whole, agent, env, steps))

    class StopAt:  # a preemption signal that arrives during step `cut`
        def __init__(self):
            self.checks = 0

        @property
        def received(self):
            self.checks += 1
            return "SIGTERM" if self.checks >= cut else None

        def restore(self):
            pass

    cut_dir = tmp_path / "cut"
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        patch.setattr(stream_run, "PreemptionHandler", StopAt)
        run(config(cut_dir, agent, env, steps))
    saved = Checkpointer(str(cut_dir / "checkpoints")).latest()
    assert saved.name == f"step_{cut:09d}"
    episode = EpisodeState(obs=torch.zeros(5 if env == "CartPole-v1" else 12))  # + the time feature
    Checkpointer(str(cut_dir / "checkpoints")).load(saved, {"episode": episode})
    assert episode.length > 0  # stopped mid-episode

    run(config(cut_dir, agent, env, steps, resume="latest"))
    assert episodes(cut_dir) == episodes(whole) and len(episodes(whole)) > 2
    a, b = final_state(cut_dir, tmp_path), final_state(whole, tmp_path)
    for key in ("networks", "env", "observation", "reward_scaler", "episode", "agent"):
        assert_same_tensors(a[key], b[key], key + ".")
    assert a["env"]["np_random"] == b["env"]["np_random"]
    if env == "CartPole-v1":  # classic control state is pickled; MuJoCo's is a tensor (compared above)
        assert a["env"]["physics"] == b["env"]["physics"]
    assert_same_tensors(a["rng"], b["rng"])
    optimizers = [k for k in a if k.startswith("optimizer_")]
    assert optimizers and all(any(".eligibility_trace" in t for t in a[k]) for k in optimizers)
    for key in optimizers:
        assert_same_tensors(a[key], b[key], key + ".")


def test_refusals_name_the_key_before_anything_runs(tmp_path):
    cases = [
        (dict(agent="q", env="Pendulum-v1"), ["task.agent=q", "discrete", "stream_ac"]),
        (dict(agent="q", env="CartPole-v9"), ["task.env='CartPole-v9'", "CartPole-v1", "Hopper-v5"]),
        (dict(agent="q", env="CartPole-v1", optimizer="adam"), ["task.optimizer", "adaptive_obgd"]),
        (dict(agent="q", env="FrozenLake-v1"), ["task.env=FrozenLake-v1", "stream-x networks take flat vectors"]),
        (dict(agent="q", env="CartPole-v1", world_size=2), ["single-process", "plait -m task=stream_q seed=0,1,2,3,4"]),
    ]
    for case, words in cases:
        with pytest.raises(ConfigError) as err:
            config(tmp_path / "a", steps=10, **case)
        for word in words:
            assert word in str(err.value), (word, str(err.value))
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_cli_runs_a_stream_task(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "trainer", "task=stream_sarsa", "task.total_steps=300",
                          "checkpoint.every=100", "task.summary_every=100"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = tmp_path / "runs" / "stream_sarsa-CartPole-v1"
    assert "steps/s" in out.stdout and "done at step 300" in out.stdout
    assert (run_dir / "checkpoints" / "step_000000300" / "plait.json").exists() and episodes(run_dir)


def test_plain_sgd_hits_the_stream_barrier_and_stops_clearly(tmp_path, capsys):
    """Every stream-x trick off: SGD with traces at α = 1 blows up within a few steps."""
    cfg = config(tmp_path / "run", "q", "CartPole-v1", 2_000, optimizer="sgd", init="default",
                 layer_norm=False, normalize_obs=False, scale_rewards=False)
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 1
    assert "diverged" in capsys.readouterr().err


def test_minatar_runs_through_the_conv_torso_and_resumes_exactly(tmp_path, monkeypatch):
    pytest.importorskip("minatar")  # the GPL extra: pip install 'plait[minatar]'
    whole = tmp_path / "whole"
    run(config(whole, "q", "MinAtar/Breakout-v1", 300))
    manifest = json.loads((whole / "checkpoints" / "step_000000300" / "plait.json").read_text())
    assert manifest["env"] == "MinAtar/Breakout-v1"

    class StopAt:
        checks = 0

        @property
        def received(self):
            StopAt.checks += 1
            return "SIGTERM" if StopAt.checks >= 120 else None

        def restore(self):
            pass

    cut = tmp_path / "cut"
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        patch.setattr(stream_run, "PreemptionHandler", StopAt)
        run(config(cut, "q", "MinAtar/Breakout-v1", 300))
    run(config(cut, "q", "MinAtar/Breakout-v1", 300, resume="latest"))
    assert episodes(cut) == episodes(whole)
    assert_same_tensors(final_state(cut, tmp_path)["networks"], final_state(whole, tmp_path)["networks"])


class RandomWalk(gym.Env):
    """An environment outside the families whose state Plait captures (it lives in this module)."""

    observation_space = gym.spaces.Box(-10, 10, (1,))
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0.0
        return np.array([self.x], dtype=np.float32), {}

    def step(self, action):
        self.x += 1.0 if action else -1.0
        done = abs(self.x) >= 3
        return np.array([self.x], dtype=np.float32), float(done), done, False, {}


def test_envs_of_other_families_resume_at_a_fresh_episode(tmp_path, capsys):
    if "PlaitTestWalk-v0" not in gym.registry:
        gym.register("PlaitTestWalk-v0", entry_point=RandomWalk, max_episode_steps=50)
    run(config(tmp_path / "run", "q", "PlaitTestWalk-v0", 50, every=25))
    run(config(tmp_path / "run", "q", "PlaitTestWalk-v0", 80, resume="latest"))
    out = capsys.readouterr().out
    assert "starts a fresh episode" in out and "done at step 80" in out


def test_time_feature_is_on_by_default_for_flat_observations_under_a_time_limit():
    from types import SimpleNamespace

    from streaming_rl.config import StreamConfig
    from streaming_rl.run import use_time_feature
    flat = gym.make("CartPole-v1")
    frames = SimpleNamespace(observation_space=gym.spaces.Box(0, 1, (10, 10, 4)), spec=SimpleNamespace(id="frames"))
    auto, on, off = StreamConfig(), StreamConfig(time_feature=True), StreamConfig(time_feature=False)
    assert use_time_feature(auto, flat, 500) and not use_time_feature(off, flat, 500)
    assert not use_time_feature(auto, flat, None) and not use_time_feature(auto, frames, 1000)
    with pytest.raises(ConfigError, match="no time limit"):
        use_time_feature(on, flat, None)
    with pytest.raises(ConfigError, match="needs flat vectors"):
        use_time_feature(on, frames, 1000)
