"""ObGD / AdaptiveObGD against the paper's formulas written per coordinate in numpy."""

import numpy as np
import pytest
import torch
from torch import nn

from streaming_rl.obgd import SECOND_MOMENT, TRACE, AdaptiveObGD, ObGD, obgd_step_size
from trainer.checkpoint import Checkpointer
from trainer.checkpoint.state import ModelState, OptimizerState


@pytest.mark.parametrize("alpha, kappa, delta, l1, expected", [
    (1.0, 2.0, 0.1, 0.2, 1.0),  # M = 1·2·1·0.2 = 0.4 ≤ 1: α itself
    (1.0, 2.0, 3.0, 5.0, 1.0 / 30.0),  # M = 1·2·3·5 = 30
    (0.5, 2.0, -0.2, 4.0, 0.5 / 4.0),  # δ̄ = max(|δ|, 1) = 1: M = 0.5·2·1·4 = 4
    (1.0, 3.0, 0.0, 0.0, 1.0),
])
def test_step_size_bound(alpha, kappa, delta, l1, expected):
    assert obgd_step_size(alpha, kappa, delta, l1) == pytest.approx(expected)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _load(model, arrays):
    """Set the reference model's weights to the closed-form arrays."""
    with torch.no_grad():
        for p, w in zip(model.parameters(), arrays):
            p.copy_(torch.from_numpy(w))


def _grads(model, x):
    model.zero_grad()
    for p in model.parameters():
        p.grad = None
    (-model(x).sum()).backward()
    return [p.grad.detach().numpy().copy() for p in model.parameters()]


def _numpy_obgd(ws, zs, gs, delta, lr, gamma, lamda, kappa, reset, bound=True):
    zs = [gamma * lamda * z + g for z, g in zip(zs, gs)]
    l1 = sum(np.abs(z).sum() for z in zs)
    m = lr * kappa * max(abs(delta), 1.0) * l1
    step = lr / m if (bound and m > 1) else lr
    ws = [w - step * delta * z for w, z in zip(ws, zs)]
    return ws, [np.zeros_like(z) for z in zs] if reset else zs


@pytest.mark.parametrize("bound", [True, False])
def test_obgd_matches_the_formula_per_parameter(bound):
    model, ref = _model(), _model()
    opt = ObGD(model.parameters(), lr=1.0, gamma=0.9, lamda=0.8, kappa=2.0, overshoot_bound=bound)
    ws = [p.detach().numpy().copy() for p in ref.parameters()]
    zs = [np.zeros_like(w) for w in ws]
    rng = np.random.default_rng(0)
    for t in range(6):
        x = torch.tensor(rng.normal(size=3), dtype=torch.float32)
        delta = float(rng.normal() * 2)
        gs = _grads(ref, x)
        opt.zero_grad()
        (-model(x).sum()).backward()
        reset = t == 3
        opt.step(delta, reset=reset)
        ws, zs = _numpy_obgd(ws, zs, gs, delta, 1.0, 0.9, 0.8, 2.0, reset, bound)
        _load(ref, ws)
        for p, w, z in zip(model.parameters(), ws, zs):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(opt.state[p][TRACE].numpy(), z, rtol=1e-5, atol=1e-6)


def test_bound_prevents_overshooting_a_single_sample():
    """On a linear v(s) = w·x (so z = x), one step changes v(s) by α_eff·δ·‖x‖₂² with
    α_eff = 1/(κ·δ̄·‖x‖₁): here 10·45/(2·10·15) = 1.5, short of the target 10; SGD overshoots to 450."""
    w = nn.Parameter(torch.zeros(5))
    opt = ObGD([w], lr=1.0, gamma=0.99, lamda=0.8, kappa=2.0)
    x = torch.full((5,), 3.0)
    delta = 10.0  # target = v + δ = 10
    opt.zero_grad()
    (-(w @ x)).backward()
    opt.step(delta)
    assert (w @ x).item() == pytest.approx(1.5)
    sgd_w = nn.Parameter(torch.zeros(5))
    sgd = ObGD([sgd_w], lr=1.0, overshoot_bound=False)
    sgd.zero_grad()
    (-(sgd_w @ x)).backward()
    sgd.step(delta)
    assert (sgd_w @ x).item() == pytest.approx(450.0)


def test_adaptive_obgd_matches_the_formula():
    model, ref = _model(), _model()
    beta2, eps, lr, gamma, lamda, kappa = 0.999, 1e-8, 1.0, 0.99, 0.8, 2.0
    opt = AdaptiveObGD(model.parameters(), lr=lr, gamma=gamma, lamda=lamda, kappa=kappa, beta2=beta2, eps=eps)
    ws = [p.detach().numpy().astype(np.float64) for p in ref.parameters()]
    zs = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    rng = np.random.default_rng(1)
    for t in range(1, 6):
        x = torch.tensor(rng.normal(size=3), dtype=torch.float32)
        delta = float(rng.normal())
        gs = _grads(ref, x)
        opt.zero_grad()
        (-model(x).sum()).backward()
        opt.step(delta)
        zs = [gamma * lamda * z + g for z, g in zip(zs, gs)]
        vs = [beta2 * v + (1 - beta2) * (delta * z) ** 2 for v, z in zip(vs, zs)]
        us = [z / np.sqrt(v / (1 - beta2**t) + eps) for z, v in zip(zs, vs)]
        m = lr * kappa * max(abs(delta), 1) * sum(np.abs(u).sum() for u in us)
        step = lr / m if m > 1 else lr
        ws = [w - step * delta * u for w, u in zip(ws, us)]
        _load(ref, ws)
        for p, w, v in zip(model.parameters(), ws, vs):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=2e-4, atol=1e-5)
            np.testing.assert_allclose(opt.state[p][SECOND_MOMENT].numpy(), v, rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("cls", [ObGD, AdaptiveObGD])
def test_traces_checkpoint_and_load_into_the_flat_buffers(tmp_path, cls):
    model = _model()
    opt = cls(model.parameters())
    for t in range(3):
        opt.zero_grad()
        (-model(torch.ones(3) * t).sum()).backward()
        opt.step(0.5)
    comps = {"model": ModelState([model]), "optimizer": OptimizerState([model], opt)}
    Checkpointer(str(tmp_path)).save(3, comps)
    saved = {k: v.clone() for k, v in opt._buffers.items()}
    weights = [p.detach().clone() for p in model.parameters()]

    fresh_model = _model()
    fresh = cls(fresh_model.parameters())
    Checkpointer(str(tmp_path)).load(tmp_path / "step_000000003",
                                     {"model": ModelState([fresh_model]), "optimizer": OptimizerState([fresh_model], fresh)})
    for key, flat in fresh._buffers.items():
        torch.testing.assert_close(flat, saved[key], rtol=0, atol=0)
    for p, w in zip(fresh_model.parameters(), weights):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=0)
    # still views of the flat buffers: the next step moves parameters and traces alike
    fresh.zero_grad()
    (-fresh_model(torch.ones(3)).sum()).backward()
    opt.zero_grad()
    (-model(torch.ones(3)).sum()).backward()
    fresh.step(0.3)
    opt.step(0.3)
    for p, q in zip(fresh_model.parameters(), model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="lamda"):
        ObGD(_model().parameters(), lamda=1.5)
    with pytest.raises(ValueError, match="beta2"):
        AdaptiveObGD(_model().parameters(), beta2=1.0)
