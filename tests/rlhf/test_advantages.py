"""rlhf/advantages.py: each estimator against a hand computation on tiny tensors."""

import math

import numpy as np
import pytest
import torch

from rlhf.advantages import ADVANTAGES, dr_grpo, gae, grpo, reinforce_pp, remax, rloo
from trainer.errors import ConfigError


def close(t, want, rel=1e-6):
    torch.testing.assert_close(t, torch.tensor(want, dtype=t.dtype), rtol=rel, atol=1e-7)


def outcome(scores, T=3):
    """Token-level rewards with each score on the last token."""
    r = torch.zeros(len(scores), T)
    r[:, -1] = torch.tensor(scores, dtype=torch.float)
    return r


def test_registry_names_and_unknown_key():
    assert ADVANTAGES.names() == ["dr_grpo", "gae", "grpo", "reinforce_pp", "remax", "rloo"]
    with pytest.raises(ConfigError, match="task.advantage='ppo' is not a registered advantage estimator"):
        ADVANTAGES.get("ppo")


def test_gae_by_hand():
    # gamma = lam = 0.5, r = [0, 0, 1], V = 0.5 everywhere
    # t=2: d = 1 - .5 = .5;              A2 = .5
    # t=1: d = .5*.5 - .5 = -.25;        A1 = -.25 + .25*.5 = -.125
    # t=0: d = -.25;                     A0 = -.25 + .25*(-.125) = -.28125
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.full((1, 3), 0.5)
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5, whiten=False)
    assert adv[0].tolist() == pytest.approx([-0.28125, -0.125, 0.5])
    assert ret[0].tolist() == pytest.approx([0.21875, 0.375, 1.0])
    white, _ = gae(r, v, m, gamma=0.5, lam=0.5)
    a = torch.tensor([-0.28125, -0.125, 0.5])
    assert white[0].tolist() == pytest.approx(((a - a.mean()) / a.std()).tolist(), rel=1e-5)


def test_gae_skips_masked_positions():
    # a masked middle token (gamma = lam = 1): its value and reward are ignored, the later
    # token's advantage carries over it; the masked advantage itself is 0
    r = torch.tensor([[0.0, 7.0, 1.0]])
    v = torch.tensor([[0.2, 9.0, 0.6]])
    m = torch.tensor([[1.0, 0.0, 1.0]])
    adv, ret = gae(r, v, m, whiten=False)
    # t=2: A2 = 1 - .6 = .4; t=0: d = 0 + .6 - .2 = .4, A0 = .4 + .4 = .8
    assert adv[0].tolist() == pytest.approx([0.8, 0.0, 0.4])
    assert ret[0].tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_grpo_and_dr_grpo_by_hand():
    # prompt a: scores 1, 0, 0, 1 (mean .5, unbiased std sqrt(1/3)); prompt b: 2, 4 (mean 3, std sqrt 2)
    r = outcome([1, 0, 2, 0, 1, 4])
    m = torch.ones(6, 3)
    m[1, 2] = 0  # padding on a response: zero advantage there
    index = np.array(["a", "a", "b", "a", "a", "b"], dtype=object)
    adv, ret = grpo(r, m, index)
    sa, sb = math.sqrt(1 / 3) + 1e-6, math.sqrt(2) + 1e-6
    want = [0.5 / sa, -0.5 / sa, -1 / sb, -0.5 / sa, 0.5 / sa, 1 / sb]
    assert adv[:, 0].tolist() == pytest.approx(want, rel=1e-6)
    assert adv[1].tolist() == pytest.approx([want[1], want[1], 0.0], rel=1e-6)
    assert torch.equal(adv, ret)
    trl, _ = grpo(r, m, index, eps=1e-4)
    assert trl[0, 0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4), rel=1e-6)
    dr, _ = dr_grpo(r, torch.ones(6, 3), index)
    assert dr[:, 0].tolist() == pytest.approx([0.5, -0.5, -1, -0.5, 0.5, 1])


def test_group_of_one_gets_zero_advantage():
    r = outcome([3.0, 1.0, 2.0])
    idx = torch.tensor([0, 1, 1])
    assert grpo(r, torch.ones(3, 3), idx)[0][0].tolist() == [0, 0, 0]
    assert rloo(r, torch.ones(3, 3), idx)[0][:, 0].tolist() == pytest.approx([0.0, -1.0, 1.0])


def test_rloo_by_hand():
    # group 1, 0, 0, 1: A_0 = 1 - (0+0+1)/3, A_1 = 0 - (1+0+1)/3
    r = outcome([1, 0, 0, 1])
    adv, _ = rloo(r, torch.ones(4, 3), [7, 7, 7, 7])
    assert adv[:, 1].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_remax_by_hand():
    # token rewards [0, .5, 1] (mask [1, 1, 1]) and [1, 0, 9] with the last token masked; greedy baselines .4, 2
    r = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = remax(r, m, torch.tensor([0.4, 2.0]))
    close(ret, [[1.5, 1.5, 1.0], [1.0, 0.0, 0.0]])
    close(adv, [[1.1, 1.1, 0.6], [-1.0, -2.0, 0.0]])


def test_reinforce_pp_by_hand():
    # r - 0.5*kl: seq 0: [-.05, -.1, .85] -> G = [.7, .75, .85] (gamma 1)
    #             seq 1: [-.1, -.1, masked] -> G = [-.2, -.1, 0]
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.2, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = reinforce_pp(scores, m, gamma=1.0, kl=kl, kl_coef=0.5)
    close(ret, [[0.7, 0.75, 0.85], [-0.2, -0.1, 0.0]])
    # whitened over the 5 response tokens of the whole batch: mean .4, unbiased var 1.025/4
    std = math.sqrt(1.025 / 4 + 1e-8)
    want = [[0.3 / std, 0.35 / std, 0.45 / std], [-0.6 / std, -0.5 / std, 0.0]]
    close(adv, want, rel=1e-5)
    # discounting: gamma .5 on seq 0 alone -> G = [-.05 + .5*(-.1 + .5*.85), -.1 + .5*.85, .85]
    _, ret = reinforce_pp(scores[:1], m[:1], gamma=0.5, kl=kl[:1], kl_coef=0.5)
    assert ret[0].tolist() == pytest.approx([0.1125, 0.325, 0.85])
