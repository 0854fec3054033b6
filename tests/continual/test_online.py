"""Online learners for active learning: the SGD step is the cross-entropy gradient, state
round-trips, and the prequential loop learns Phishing."""

import torch
import torch.nn.functional as F

from continual.active import STRATEGIES
from continual.metrics import PrequentialAccuracy
from continual.online import ONLINE_LEARNERS, softmax_regression_step
from continual.run_active import prequential_step
from continual.streams import build_stream, tensors


def test_softmax_regression_step_is_the_cross_entropy_gradient():
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, dtype=torch.float64)
    loss = F.cross_entropy((W @ x + b)[None], torch.tensor([1])) + 0.5 * 0.01 * (W ** 2).sum()
    loss.backward()
    W2, b2 = W.detach().clone(), b.detach().clone()
    softmax_regression_step(W2, b2, x, torch.softmax(W.detach() @ x + b.detach(), 0), 1, lr=0.1, l2=0.01)
    torch.testing.assert_close(W2, W.detach() - 0.1 * W.grad)
    torch.testing.assert_close(b2, b.detach() - 0.1 * b.grad)


def test_mlp_step_follows_autograd():
    m = ONLINE_LEARNERS.get("mlp")(4, 3, 0.1, 0.0, seed=0)
    m.W2.normal_(generator=torch.Generator().manual_seed(1))
    params = [t.clone().requires_grad_() for t in (m.W1, m.b1, m.W2, m.b2)]
    z = torch.randn(4, dtype=torch.float64)
    logits = params[2] @ torch.relu(params[0] @ z + params[1]) + params[3]
    F.cross_entropy(logits[None], torch.tensor([2])).backward()
    m.learn(z, m.predict_proba(z), 2)
    for now, before in zip((m.W1, m.b1, m.W2, m.b2), params):
        torch.testing.assert_close(now, before.detach() - 0.1 * before.grad)


def test_prequential_active_learning_on_phishing_beats_random_at_the_same_budget():
    x, y = tensors(build_stream("phishing", 0).data)
    out = {}
    for name in ("variable_uncertainty", "random"):
        learner = ONLINE_LEARNERS.get("logistic")(9, 2, 0.05, 0.0, 0)
        strategy, acc = STRATEGIES.get(name)(budget=0.2, seed=0), PrequentialAccuracy()
        for i in range(len(y)):
            prequential_step(learner, strategy, acc, x[i].double(), int(y[i]))
        assert strategy.labels_fraction <= 0.2
        out[name] = acc.accuracy
    assert out["variable_uncertainty"] > 0.87 and out["variable_uncertainty"] > out["random"], out
