"""Environment ids and the environment state that makes resume exact."""

import copy
import random

import gymnasium as gym
import numpy as np
import pytest

from streaming_rl.envs import EnvError, EnvState, check_env_id, make_env


def test_unknown_ids_name_near_and_allowed_ones():
    with pytest.raises(EnvError) as err:
        check_env_id("CartPole-v7")
    msg = str(err.value)
    assert "env='CartPole-v7'" in msg and "CartPole-v1" in msg and "Hopper-v5" in msg
    with pytest.raises(EnvError, match="allowed"):
        check_env_id("NoSuchEnv")


def test_time_limit_private_counter_is_what_we_restore():
    """EnvState restores gymnasium's TimeLimit._elapsed_steps: pin that it still counts steps."""
    env = make_env("CartPole-v1", max_episode_steps=7)
    env.reset(seed=0)
    env.step(0)
    env.step(1)
    assert env._elapsed_steps == 2 and env.spec.max_episode_steps == 7


def _rollout(env, actions):
    out = []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        out.append((obs.copy(), r, term, trunc))
        if term or trunc:
            out.append((env.reset()[0].copy(),))
    return out


@pytest.mark.parametrize("env_id, steps", [("CartPole-v1", 400), ("Pendulum-v1", 250), ("Acrobot-v1", 200),
                                           ("Hopper-v5", 300)])
def test_state_roundtrip_replays_the_same_trajectory(env_id, steps):
    """Save mid-episode, run on (through resets), restore into a NEW env: identical trajectory."""
    env = make_env(env_id, max_episode_steps=60)
    env.reset(seed=3)
    env.action_space.seed(0)
    for _ in range(7):
        env.step(env.action_space.sample())
    state = copy.deepcopy(EnvState(env).state_dict())
    actions = [env.action_space.sample() for _ in range(steps)]
    first = _rollout(env, actions)

    other = make_env(env_id, max_episode_steps=60)
    other.reset(seed=99)  # a different episode: everything must come from the state
    saved = EnvState(other)
    assert saved.exact
    saved.load_state_dict(state)
    second = _rollout(other, actions)
    assert len(first) == len(second) and sum(len(t) == 1 for t in first) >= 3  # crossed resets
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_minatar_state_roundtrip():
    pytest.importorskip("minatar")
    env = make_env("MinAtar/Breakout-v1")
    env.reset(seed=1)
    for _ in range(5):
        env.step(1)
    state = copy.deepcopy(EnvState(env).state_dict())
    rng = random.Random(0)
    actions = [rng.randrange(3) for _ in range(300)]
    first = _rollout(env, actions)
    EnvState(env).load_state_dict(state)
    second = _rollout(env, actions)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for a, b in zip(first, second) for x, y in zip(a, b))


def test_minatar_missing_is_a_clear_error(monkeypatch):
    import streaming_rl.envs as envs

    monkeypatch.setattr(envs, "minatar_available", lambda: False)
    # as in a process where the package was never installed, even if it is here
    without = {k: v for k, v in gym.registry.items() if not k.startswith("MinAtar/")}
    monkeypatch.setattr(envs.gym, "registry", without)
    with pytest.raises(EnvError, match=r"plait\[minatar\]"):
        check_env_id("MinAtar/Breakout-v1")
