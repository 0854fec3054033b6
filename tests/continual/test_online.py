"""Online learners for active learning: the SGD step is the cross-entropy gradient, state
round-trips, and the prequential loop learns Phishing."""

import torch
import torch.nn.functional as F

from continual.active import STRATEGIES
from continual.metrics import PrequentialAccuracy
from continual.online import (ONLINE_LEARNERS, Predictions, prequential_step, running_standardise,
                              softmax_regression_step)
from trainer.running_stats import RunningMeanVar
from continual.streams import build_stream, tensors


def test_softmax_regression_step_is_the_cross_entropy_gradient():
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, dtype=torch.float64)
    loss = F.cross_entropy((W @ x + b)[None], torch.tensor([1])) + 0.5 * 0.01 * (W ** 2).sum()
    loss.backward()
    W2, b2 = W.detach().numpy().copy(), b.detach().numpy().copy()
    p = torch.softmax(W.detach() @ x + b.detach(), 0).numpy()
    softmax_regression_step(W2, b2, x.numpy(), p, 1, lr=0.1, l2=0.01)
    torch.testing.assert_close(torch.from_numpy(W2), W.detach() - 0.1 * W.grad)
    torch.testing.assert_close(torch.from_numpy(b2), b.detach() - 0.1 * b.grad)


def test_mlp_step_follows_autograd():
    m = ONLINE_LEARNERS.get("mlp")(4, 3, 0.1, 0.0, seed=0)
    m.W2[...] = torch.randn(3, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
    params = [torch.tensor(t).requires_grad_() for t in (m.W1, m.b1, m.W2, m.b2)]
    z = torch.randn(4, dtype=torch.float64)
    logits = params[2] @ torch.relu(params[0] @ z + params[1]) + params[3]
    F.cross_entropy(logits[None], torch.tensor([2])).backward()
    p = m.predict_proba(z.numpy())
    torch.testing.assert_close(torch.from_numpy(p), torch.softmax(logits.detach(), 0))
    m.learn(z.numpy(), p, 2)
    for now, before in zip((m.W1, m.b1, m.W2, m.b2), params):
        torch.testing.assert_close(torch.from_numpy(now), before.detach() - 0.1 * before.grad)


def test_prequential_active_learning_on_phishing_beats_random_at_the_same_budget():
    x, y = tensors(build_stream("phishing", 0).data)
    z = running_standardise(x.double().numpy())
    out = {}
    for name in ("variable_uncertainty", "random"):
        learner = ONLINE_LEARNERS.get("logistic")(9, 2, 0.05, 0.0, 0)
        strategy, acc = STRATEGIES.get(name)(budget=0.2, seed=0), PrequentialAccuracy()
        predictions = Predictions(learner, z)
        for i in range(len(y)):
            prequential_step(learner, predictions, strategy, acc, i, int(y[i]))
        assert strategy.labels_fraction <= 0.2
        out[name] = acc.accuracy
    assert out["variable_uncertainty"] > 0.87 and out["variable_uncertainty"] > out["random"], out


def test_running_standardisation_is_welford_over_the_prefix():
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 3 * torch.randn(300, 4, generator=g, dtype=torch.float64)).numpy()
    z = running_standardise(x)
    stats = RunningMeanVar((4,))
    for t in range(300):
        stats.update(x[t])
        expected = (x[t] - stats.mean) / (stats.var + 1e-8) ** 0.5
        torch.testing.assert_close(torch.from_numpy(z[t]), torch.from_numpy(expected), rtol=1e-7, atol=1e-7)


def test_block_predictions_are_bitwise_those_of_single_samples():
    """What makes a resumed run (whose blocks start elsewhere) predict the same bits."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 9, generator=g, dtype=torch.float64).numpy()
    for name in ("logistic", "mlp"):
        m = ONLINE_LEARNERS.get(name)(9, 3, 0.1, 0.0, 0)
        for i in range(10):
            m.learn(z[i], m.predict_proba(z[i]), i % 3)
        block = m.predict_rows(z)
        assert all((m.predict_proba(z[i]) == block[i]).all() for i in range(40))
        assert all((m.predict_rows(z[i:i + 7]) == block[i:i + 7]).all() for i in range(0, 33, 3))
