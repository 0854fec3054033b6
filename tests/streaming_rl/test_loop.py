"""The streaming loop's observation pipeline, episode bookkeeping and episode ends."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from streaming_rl.agents import StreamAgent
from streaming_rl.loop import EpisodeState, ObservationPipeline, StreamLoop, time_feature
from streaming_rl.normalize import RewardScaler


def test_time_feature_spans_minus_half_to_half():
    assert time_feature(0, 500) == -0.5 and time_feature(250, 500) == 0.0 and time_feature(500, 500) == 0.5


def test_pipeline_normalizes_then_appends_time():
    pipe = ObservationPipeline((2,), normalize=True, time_limit=10)
    assert pipe.shape == (3,)
    first = pipe(np.array([5.0, -1.0]), 0)
    assert first.dtype == torch.float32 and first.tolist() == [0.0, 0.0, -0.5]
    second = pipe(np.array([7.0, 1.0]), 4)
    # μ = (6, 0), σ² = (2, 2): (x − μ)/√σ²
    np.testing.assert_allclose(second.numpy(), [1 / np.sqrt(2), 1 / np.sqrt(2), -0.1], rtol=1e-6)
    raw = ObservationPipeline((2,), normalize=False)
    assert raw(np.array([5.0, -1.0]), 3).tolist() == [5.0, -1.0]
    with pytest.raises(ValueError, match="flat"):
        ObservationPipeline((10, 10, 4), time_limit=100)


def test_episode_state_roundtrip():
    ep = EpisodeState(obs=torch.arange(3.0), ret=4.5, length=7, count=2, abs_delta=0.25)
    fresh = EpisodeState(obs=torch.zeros(3))
    fresh.load_state_dict(ep.state_dict())
    assert fresh.state_dict().keys() == ep.state_dict().keys()
    assert torch.equal(fresh.obs, ep.obs) and (fresh.ret, fresh.length, fresh.count) == (4.5, 7, 2)


class _Recorder(StreamAgent):
    """Acts 0 and records what each learn() was told about the episode's end."""

    def __init__(self):
        self.seen = []
        self.steps = 0

    def act(self, obs):
        return 0

    def learn(self, obs, action, reward, next_obs, terminated, truncated):
        self.seen.append((terminated, truncated))
        return 0.0

    def components(self):
        return {}


@pytest.mark.parametrize("with_time, ends", [(True, True), (False, False)])
def test_time_limit_ends_the_episode_only_when_time_is_observed(with_time, ends):
    env = gym.make("CartPole-v1", max_episode_steps=3)  # action 0 three times: truncated, not fallen
    agent = _Recorder()
    loop = StreamLoop(env, agent, ObservationPipeline((4,), time_limit=3 if with_time else None),
                      RewardScaler(0.99), seed=0)
    while loop.step() is None:
        pass
    assert agent.seen == [(False, False), (False, False), (ends, True)]
