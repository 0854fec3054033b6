"""ObGD and AdaptiveObGD: overshooting-bounded gradient descent with eligibility traces
(Elsayed, Vasan & Mahmood 2024, "Streaming Deep Reinforcement Learning Finally Works").

The gradient handed to these optimizers is that of an *output* (−v(s), −q(s,a), or
−log π(a|s) − c·sign(δ)·H(π)), not of a loss; `step(delta)` takes the scalar TD error δ:

    z ← γλ·z + g;   w ← w − α_eff·δ·z,   α_eff = α / max(1, α·κ·max(|δ|, 1)·‖z‖₁)

so one sample never moves the output past its own target. With `overshoot_bound=False` this is
plain SGD with accumulating traces, the baseline that hits the "stream barrier". Traces (and
AdaptiveObGD's second moments) are optimizer state: they go through `state_dict()` and the
checkpoint as Adam's moments do.

All parameters of one optimizer live in one flat buffer (as in Megatron's and apex's fused
optimizers): parameters, their `.grad` and the traces are views into contiguous vectors, so a
step is a handful of vector ops whatever the number of parameter tensors.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

TRACE = "eligibility_trace"
SECOND_MOMENT = "second_moment"


def obgd_step_size(alpha: float, kappa: float, delta: float, trace_l1: float) -> float:
    """α_eff = α / max(1, M),  M = α·κ·max(|δ|, 1)·‖z‖₁  (ObGD's overshooting bound)."""
    m = alpha * kappa * max(abs(delta), 1.0) * trace_l1
    return alpha / m if m > 1.0 else alpha


def _flatten_(params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """Move `params` into one flat vector and their grads into another; params become views."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    flat_grad = torch.zeros_like(flat)
    for p, view, grad in zip(params, _views(flat, params), _views(flat_grad, params)):
        p.data = view
        p.grad = grad  # autograd accumulates into an existing .grad in place: it stays a view
    return flat, flat_grad


def _views(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class ObGD(torch.optim.Optimizer):
    """Overshooting-bounded gradient descent with accumulating eligibility traces.

    Per sample: `zero_grad()`, backward of the output, then `step(delta, reset=...)`; `reset=True`
    clears the traces after the update (episode end; an exploratory action in Watkins's Q(λ)).
    The parameters become views of one flat vector (one dtype and device): move the module where
    it will run before building the optimizer.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1.0, gamma: float = 0.99,
                 lamda: float = 0.8, kappa: float = 2.0, overshoot_bound: bool = True):
        self._setup(params, dict(lr=lr, gamma=gamma, lamda=lamda, kappa=kappa,
                                 overshoot_bound=overshoot_bound))

    def _setup(self, params: Iterable[nn.Parameter], defaults: dict) -> None:
        if defaults["lr"] <= 0:
            raise ValueError(f"lr={defaults['lr']} must be > 0")
        for key in ("gamma", "lamda"):
            if not 0 <= defaults[key] <= 1:
                raise ValueError(f"{key}={defaults[key]} must be in [0, 1]")
        if defaults["kappa"] <= 0:
            raise ValueError(f"kappa={defaults['kappa']} must be > 0")
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} takes one parameter group")
        params = self.param_groups[0]["params"]
        self._flat, self._flat_grad = _flatten_(params)
        # State exists from the start, as views of flat buffers: a fresh optimizer's state_dict has
        # the shapes a checkpoint is checked against, and a load writes into the buffers.
        self._buffers = {key: torch.zeros_like(self._flat) for key in self._state_keys()}
        for key, flat in self._buffers.items():
            for p, view in zip(params, _views(flat, params)):
                self.state[p][key] = view

    def _state_keys(self) -> tuple[str, ...]:
        return (TRACE,)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the flat gradient; grads stay views (`set_to_none` is ignored)."""
        self._flat_grad.zero_()

    def reset_traces(self) -> None:
        self._buffers[TRACE].zero_()

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's Optimizer.load_state_dict replaces the state tensors: copy them into the flat views.
        params = self.param_groups[0]["params"]
        views = {key: [self.state[p][key] for p in params] for key in self._buffers}
        super().load_state_dict(state_dict)
        for key, kept in views.items():
            for p, view in zip(params, kept):
                view.copy_(self.state[p][key])
                self.state[p][key] = view

    def _direction(self, group: dict, delta: float) -> torch.Tensor:
        """u in w ← w − α_eff·δ·u: the trace itself."""
        return self._buffers[TRACE]

    @torch.no_grad()
    def step(self, delta: float, reset: bool = False) -> float:  # type: ignore[override]
        """One update with TD error `delta`; returns the step size used (α_eff)."""
        group = self.param_groups[0]
        trace = self._buffers[TRACE]
        torch.add(self._flat_grad, trace, alpha=group["gamma"] * group["lamda"], out=trace)  # z ← γλz + g
        direction = self._direction(group, delta)
        alpha = group["lr"]
        if group["overshoot_bound"]:
            alpha = obgd_step_size(alpha, group["kappa"], delta, torch.linalg.vector_norm(direction, 1).item())
        self._flat.add_(direction, alpha=-alpha * delta)
        if reset:
            self.reset_traces()
        return alpha


class AdaptiveObGD(ObGD):
    """ObGD scaled per coordinate by a running second moment of δz (Adam's, with β₁ = 0):
    v ← β₂v + (1−β₂)(δz)², v̂ = v/(1−β₂ᵗ), u = z/√(v̂+ε); the bound uses ‖u‖₁; w ← w − α_eff·δ·u."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1.0, gamma: float = 0.99,
                 lamda: float = 0.8, kappa: float = 2.0, beta2: float = 0.999, eps: float = 1e-8,
                 overshoot_bound: bool = True):
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2={beta2} must be in [0, 1)")
        self._setup(params, dict(lr=lr, gamma=gamma, lamda=lamda, kappa=kappa, beta2=beta2, eps=eps,
                                 overshoot_bound=overshoot_bound))
        self._scratch = torch.empty_like(self._flat)

    def _state_keys(self) -> tuple[str, ...]:
        # "step" is a per-coordinate count here (all equal), so the state stays flat views; float32
        # counts exactly to 2^24 steps, long after 1 − β₂ᵗ has reached 1
        return (TRACE, SECOND_MOMENT, "step")

    def _direction(self, group: dict, delta: float) -> torch.Tensor:
        z, v, u = self._buffers[TRACE], self._buffers[SECOND_MOMENT], self._scratch
        count = self._buffers["step"]
        count += 1
        t = count[0].item()
        beta2 = group["beta2"]
        torch.mul(z, delta, out=u)
        v.mul_(beta2).addcmul_(u, u, value=1.0 - beta2)
        torch.div(v, 1.0 - beta2 ** t, out=u).add_(group["eps"]).sqrt_()
        return torch.div(z, u, out=u)
