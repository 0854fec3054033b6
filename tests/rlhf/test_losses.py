"""rlhf/losses.py: hand-computed clipped (and dual-clipped) surrogate, value loss, KL estimators,
entropy, the aggregation formulas, and the gradient's independence of how a mini-batch is split
(1 vs 2 data-parallel workers, 1 vs 4 micro-batches) in every aggregation mode."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.losses import (KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES, aggregate, entropy_from_logits, kl,
                         kl_penalty_reward, loss_scale, ppo_clip, value_loss)
from trainer.errors import ConfigError

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def test_registries():
    assert LOSS_AGG_MODES.names() == sorted(MODES)
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"] and POLICY_LOSSES.names() == ["ppo_clip"]
    with pytest.raises(ConfigError, match="task.loss_agg_mode='seq-mean' is not a registered"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "seq-mean", loss_scale(torch.ones(1, 1)))


def test_ppo_clip_by_hand():
    # (A, ratio): inside the range; clipped above (eps_high); clipped below; dual-clip on A < 0
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0]])
    ratio = torch.tensor([[1.1, 1.5, 0.5, 5.0, 2.0]])
    old = torch.zeros_like(ratio)
    mask = torch.ones_like(ratio)
    loss, m = ppo_clip(ratio.log(), old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28)
    # max(-A r, -A clip(r, .8, 1.28)): -1.1; max(-1.5, -1.28); max(.5, .8); max(5, 1.28); max(2, 1.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.1, -1.28, 0.8, 5.0, 2.0]]))
    assert m["clipfrac"] == pytest.approx(2 / 5)
    dual, m = ppo_clip(ratio.log(), old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    # for A < 0 the loss is capped at -c A = 3: only the ratio-5 token changes
    torch.testing.assert_close(dual, torch.tensor([[-1.1, -1.28, 0.8, 3.0, 2.0]]))
    assert m["clipfrac_dual"] == pytest.approx(1 / 5)
    with pytest.raises(ConfigError, match="task.clip_ratio_c=1.0"):
        ppo_clip(old, old, adv, mask, clip_ratio_c=1.0)
    with pytest.raises(ConfigError, match="task.clip_ratio_low=1.5"):
        ppo_clip(old, old, adv, mask, clip_ratio_low=1.5)


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 0.4]), torch.tensor([0.0, 1.0, 0.5])
    # token 0: max((1-0)^2, (0+.2-0)^2) = 1; token 1: max(1, 1) = 1; token 2: max(0, (.5-.5)^2) = 0
    torch.testing.assert_close(value_loss(v, old, ret, clip_range=0.2), torch.tensor([0.5, 0.5, 0.0]))
    # clipping wins when the new value moved past the return: V_old=0, V=2, R=1.5 -> max(.25, 1.69)
    torch.testing.assert_close(value_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.5])),
                               torch.tensor([0.5 * 1.69]))
    torch.testing.assert_close(value_loss(v, old, ret, clip_range=None), 0.5 * (v - ret) ** 2)


def test_kl_estimators_and_penalty_by_hand():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    assert kl(lp, ref, "k1").item() == pytest.approx(ln2)
    assert kl(lp, ref, "k2").item() == pytest.approx(0.5 * ln2 ** 2)
    assert kl(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + ln2)
    assert kl(ref, ref, "k3").item() == 0.0
    r = kl_penalty_reward(torch.tensor([[0.0, 1.0, 5.0]]), torch.full((1, 3), math.log(0.5)),
                          torch.full((1, 3), math.log(0.25)), torch.tensor([[1.0, 1.0, 0.0]]), kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.1 * ln2, 1 - 0.1 * ln2, 0.0]]))
    with pytest.raises(ConfigError, match="task.kl_estimator='low_var'"):
        kl(lp, ref, "low_var")


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(2, 3, 5)).flatten().tolist() == pytest.approx([math.log(5)] * 6)
    p = torch.tensor([0.7, 0.2, 0.1])
    assert entropy_from_logits(p.log()).item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)


def test_aggregation_formulas_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    scale = loss_scale(mask, max_response_length=8)
    assert (scale.num_tokens, scale.num_seqs, scale.max_response_length) == (6, 2, 8)
    assert aggregate(loss, mask, "token-mean", scale).item() == pytest.approx(21 / 6)
    assert aggregate(loss, mask, "seq-mean-token-mean", scale).item() == pytest.approx((10 / 4 + 11 / 2) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", scale).item() == pytest.approx(21 / (2 * 8))
    with pytest.raises(ConfigError, match="max_response_length=3"):
        loss_scale(mask, max_response_length=3)


# --- partition invariance ---------------------------------------------------------------------

B, T, D, V = 6, 5, 3, 7


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    actions = torch.randint(V, (B, T), generator=g)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])  # unequal: per-part normalisers differ from global ones
    mask = (torch.arange(T) < lengths[:, None]).double()
    old_log_prob = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1
    ref_log_prob = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(x=x, actions=actions, response_mask=mask, old_log_prob=old_log_prob, ref_log_prob=ref_log_prob,
                advantages=advantages, returns=returns, old_values=old_values)


def params():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(D, V, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(D, generator=g, dtype=torch.float64, requires_grad=True)]


def part_loss(p, rows, mode, scale):
    """The whole PPO objective on some rows: clipped policy loss, clipped value loss, entropy bonus, k3 KL loss."""
    w, w_v = p
    d = {k: v[rows] for k, v in problem().items()}
    logits = d["x"] @ w
    log_prob = F.log_softmax(logits, -1).gather(-1, d["actions"].unsqueeze(-1)).squeeze(-1)
    values = d["x"] @ w_v
    mask = d["response_mask"]
    pg, _ = ppo_clip(log_prob, d["old_log_prob"], d["advantages"], mask, 0.2, 0.28, clip_ratio_c=3.0)
    vf = value_loss(values, d["old_values"], d["returns"], 0.2)
    ent = entropy_from_logits(logits)
    kl_loss = kl(log_prob, d["ref_log_prob"], "k3")
    agg = lambda m: aggregate(m, mask, mode, scale)  # noqa: E731
    return agg(pg) + 0.5 * agg(vf) - 0.01 * agg(ent) + 0.1 * agg(kl_loss)


def grads(parts, mode, local_scale=False):
    """Σ over parts of ∇(part loss); each part normalised by the global scale (or, to show the
    test can fail, by its own and averaged)."""
    p = params()
    mask = problem()["response_mask"]
    total = 0
    for rows in parts:
        scale = loss_scale(mask[rows], T) if local_scale else loss_scale(mask, T)
        loss = part_loss(p, rows, mode, scale)
        total = total + (loss / len(parts) if local_scale else loss)
    total.backward()
    return [q.grad for q in p]


SPLITS = {"2 workers": [slice(0, 3), slice(3, 6)],
          "4 micro-batches": [slice(0, 1), slice(1, 3), slice(3, 4), slice(4, 6)]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_gradient_does_not_depend_on_the_split(mode, split):
    full = grads([slice(0, B)], mode)
    parted = grads(SPLITS[split], mode)
    for a, b in zip(full, parted):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert full[0].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_per_part_normalisers_would_change_the_gradient(mode):
    # the check above is sensitive: normalising each micro-batch by itself gives another gradient
    full = grads([slice(0, B)], mode)
    naive = grads(SPLITS["4 micro-batches"], mode, local_scale=True)
    assert (full[0] - naive[0]).abs().max() > 1e-3


def _rank_grads(mode):
    import torch.distributed as dist

    rank = dist.get_rank()
    p = params()
    scale = loss_scale(problem()["response_mask"], T)  # the global mini-batch's normaliser, on every rank
    mine = SPLITS["2 workers"][rank]
    micro = [slice(mine.start, mine.start + 1), slice(mine.start + 1, mine.stop)]  # 2 micro-batches per rank
    for rows in micro:
        part_loss(p, rows, mode, scale).backward()
    for q in p:
        dist.all_reduce(q.grad, op=dist.ReduceOp.SUM)
    return [q.grad for q in p]


def test_gradient_equal_on_two_gloo_ranks_in_every_mode(run_ranks):
    for mode in MODES:
        full = grads([slice(0, B)], mode)
        for rank_grads in run_ranks(2, _rank_grads, mode):
            for a, b in zip(full, rank_grads):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
