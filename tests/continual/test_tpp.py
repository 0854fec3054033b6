"""The attention TPP: the log-likelihood against closed forms, causality (with and without the
prompt pool), the prompt pool's retrieval, and next-event prediction on a known process."""

import math

import torch

from continual.tpp import AttentionTPP, EventBatch, PromptPool, temporal_encoding


def batch():
    return EventBatch.collate([[0.5, 1.2, 3.0], [2.0]], [[0, 1, 1], [2]], horizon=4.0)


def test_temporal_encoding_formula():
    te = temporal_encoding(torch.tensor([0.0, 2.5]), 6)
    i = torch.arange(0, 6, 2) / 6
    torch.testing.assert_close(te[1, 0::2], torch.sin(2.5 / 10000 ** i))
    torch.testing.assert_close(te[1, 1::2], torch.cos(2.5 / 10000 ** i))
    assert torch.equal(te[0, 1::2], torch.ones(3))


def test_log_likelihood_of_constant_intensities_is_the_poisson_one():
    """w = 0, a = 0: λ_k = softplus(b_k), LL = Σ_j log λ_{k_j} − T Σ_k λ_k per sequence."""
    m = AttentionTPP(3, dim=8, layers=1, heads=2)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.tensor([0.1, -0.5, 1.0]))
    lam = torch.nn.functional.softplus(m.head.bias.detach())
    ll, sim = m.log_likelihood(batch())
    expected = (lam[0].log() + 2 * lam[1].log() - 4 * lam.sum()) + (lam[2].log() - 4 * lam.sum())
    torch.testing.assert_close(ll, expected)
    assert float(sim) == 0.0


def test_midpoint_rule_converges_to_the_integral():
    m = AttentionTPP(2, dim=8, layers=1, heads=1, integration_points=4000)  # a_k ≠ 0: no closed form
    with torch.no_grad():
        m.decay.copy_(torch.tensor([-0.7, 0.4]))
    b = EventBatch.collate([[0.5, 1.2, 3.0], [2.0]], [[0, 1, 1], [0]], 4.0)
    with torch.no_grad():
        fine, _ = m.log_likelihood(b)
        m.integration_points = 8
        coarse, _ = m.log_likelihood(b)
        m.integration_points = 1
        crude, _ = m.log_likelihood(b)
    assert abs(float(fine - coarse)) < 1e-3 * abs(float(fine)) < abs(float(fine - crude))


def test_history_is_causal_with_and_without_prompts():
    for pool in (None, PromptPool(6, 2, 3, 8)):
        m = AttentionTPP(3, dim=8, layers=2, heads=2, pool=pool)
        a = EventBatch.collate([[0.5, 1.0, 2.0, 3.0]], [[0, 1, 2, 0]], 5.0)
        b = EventBatch.collate([[0.5, 1.0, 2.5, 3.5]], [[0, 1, 0, 0]], 5.0)  # differs from event 3 on
        ha, _, _ = m.history(a)
        hb, _, _ = m.history(b)
        torch.testing.assert_close(ha[:, :3], hb[:, :3])  # start token and the first two events
        assert not torch.allclose(ha[:, 3], hb[:, 3])


def test_padding_does_not_change_a_sequences_likelihood():
    m = AttentionTPP(3, dim=8, layers=2, heads=2, pool=PromptPool(5, 2, 2, 8))
    alone, _ = m.log_likelihood(EventBatch.collate([[2.0]], [[2]], 4.0))
    both, _ = m.log_likelihood(batch())
    first, _ = m.log_likelihood(EventBatch.collate([[0.5, 1.2, 3.0]], [[0, 1, 1]], 4.0))
    torch.testing.assert_close(both, alone + first)


def test_prompt_pool_selects_the_most_similar_keys():
    pool = PromptPool(4, 2, 3, 2)
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]]))
    idx, sim = pool.select(torch.tensor([[[2.0, 0.1]]]))
    assert idx.tolist() == [[[0, 3]]]
    torch.testing.assert_close(sim[0, 0, 0], torch.tensor(2.0 / math.hypot(2.0, 0.1)))
    tokens = pool.tokens(idx, torch.ones(1, 1, 2))
    assert tokens.shape == (1, 1, 6, 2)
    torch.testing.assert_close(tokens[0, 0, :3], pool.prompts[0] + 1)


def test_expected_next_time_of_a_constant_rate():
    """λ = r constant: the next event is Exp(r), E = 1/r (the window is long enough to hold it)."""
    m = AttentionTPP(1, dim=8, layers=1, heads=1)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.fill_(math.log(math.e ** 2.0 - 1))  # softplus = 2
    b = EventBatch.collate([[1.0, 1.5]], [[0, 0]], 10.0)
    when, kind = m.predict_next(b, window=8.0, points=4000)
    torch.testing.assert_close(when, torch.tensor([[0.5, 1.5]]), atol=2e-3, rtol=0)
    assert kind.tolist() == [[0, 0]]
