"""Continual classifiers by name (`task.learner`): naive fine-tuning, reservoir replay and EWC on an
MLP (the baselines), and the Discrete Key-Value Bottleneck behind a frozen encoder.

A learner sees the stream one experience at a time (`train_experience(x, y)`, several epochs of
mini-batches) and never again the data of a past one, except what replay keeps in its buffer. It
may fit itself to the stream's unlabelled pool first (`prepare`; the bottleneck's keys). Every
piece of state (weights, buffer, Fisher, keys and their EMA statistics, the learner's RNG) is in
the module's `state_dict` plus its generator, which `LearnerState` hands to the checkpoint; the
optimizer is built fresh for each experience, so between experiences it holds nothing.

The TPP learners (`tpp`, `prompt_tpp`) take event streams and live in `continual.tpp_learners`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from continual.encoders import build_encoder
from continual.kv_bottleneck import KeyValueBottleneck
from trainer.registry import Registry

LEARNERS: Registry[type["Learner"]] = Registry("learner", key="task.learner")
KIND = {}  # learner name → the stream kind it takes ("experiences" | "events")


def register_learner(name: str, kind: str = "experiences"):
    def add(cls):
        LEARNERS.add(name, cls)
        KIND[name] = kind
        return cls
    return add


@dataclass
class LearnerSpec:
    dim: int  # input width
    num_classes: int
    options: object  # the task's options (ContinualConfig)
    seed: int


class Learner(nn.Module):
    """The interface every classifier of `LEARNERS` offers to the runner."""

    def __init__(self, spec: LearnerSpec):
        super().__init__()
        self.spec = spec
        self.generator = torch.Generator().manual_seed(spec.seed)

    def prepare(self, unlabelled: torch.Tensor) -> None:
        """Before the stream: fit to unlabelled inputs (nothing by default)."""

    def train_experience(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, classes: Optional[tuple[int, ...]] = None) -> float:
        """Fraction of x classified as y: the arg-max over all classes (class- and domain-incremental),
        or over `classes` only (task-incremental: the experience's identity is given)."""
        logits = self.logits(x)
        if classes is not None:
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
            allowed[list(classes)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        return float((logits.argmax(-1) == y).double().mean())

    def batches(self, n: int, batch_size: int):
        """One epoch of shuffled mini-batch indices, from the learner's own generator."""
        order = torch.randperm(n, generator=self.generator)
        return order.split(batch_size)


class LearnerState(Stateful):
    """A learner's module state and RNG as one checkpoint component."""

    def __init__(self, learner: Learner):
        self.learner = learner

    def state_dict(self) -> dict:
        return {"module": self.learner.state_dict(), "rng": self.learner.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["module"])
        self.learner.generator.set_state(state["rng"])


def mlp(dim_in: int, hidden: int, layers: int, dim_out: int, seed: int) -> nn.Sequential:
    """dim_in → (Linear, ReLU) × layers → dim_out, initialised from `seed` (PyTorch's default init)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mods, width = [], dim_in
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        return nn.Sequential(*mods, nn.Linear(width, dim_out))


@register_learner("finetune")
class Finetune(Learner):
    """Naive fine-tuning: Adam on the cross-entropy of the current experience only."""

    def __init__(self, spec: LearnerSpec):
        super().__init__(spec)
        o = spec.options
        self.net = mlp(spec.dim, o.hidden, o.hidden_layers, spec.num_classes, spec.seed)

    def logits(self, x):
        return self.net(x)

    def loss(self, x, y) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)

    def train_experience(self, x, y):
        o = self.spec.options
        opt = torch.optim.Adam(self.net.parameters(), lr=o.lr)
        total, steps = 0.0, 0
        for _ in range(o.epochs):
            for idx in self.batches(len(y), o.batch_size):
                loss = self.loss(x[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
        self.after_experience(x, y)
        return {"loss": total / max(steps, 1), "steps": steps}

    def after_experience(self, x, y) -> None:
        pass


def reservoir_slot(seen: int, capacity: int, draw: int) -> int:
    """Reservoir sampling (Vitter 1985): the n-th sample (0-based) takes slot n while n < capacity,
    else slot j for j = draw ~ U{0..n} when j < capacity (else it is dropped: −1)."""
    if seen < capacity:
        return seen
    return draw if draw < capacity else -1


@register_learner("replay")
class Replay(Finetune):
    """Fine-tuning on batches of the current experience joined by as many samples drawn from a
    reservoir buffer of past ones (`task.replay_capacity`, every sample equally likely to be kept)."""

    def __init__(self, spec: LearnerSpec):
        super().__init__(spec)
        cap = spec.options.replay_capacity
        self.register_buffer("buffer_x", torch.zeros(cap, spec.dim))
        self.register_buffer("buffer_y", torch.zeros(cap, dtype=torch.int64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def loss(self, x, y):
        filled = min(int(self.seen), self.buffer_y.numel())
        if filled:
            pick = torch.randint(filled, (len(y),), generator=self.generator)
            x, y = torch.cat([x, self.buffer_x[pick]]), torch.cat([y, self.buffer_y[pick]])
        return F.cross_entropy(self.net(x), y)

    def after_experience(self, x, y):
        cap = self.buffer_y.numel()
        for i in range(len(y)):
            n = int(self.seen)
            draw = int(torch.randint(n + 1, (), generator=self.generator)) if n >= cap else 0
            slot = reservoir_slot(n, cap, draw)
            if slot >= 0:
                self.buffer_x[slot], self.buffer_y[slot] = x[i], y[i]
            self.seen += 1


def ewc_penalty(params, anchors, fisher) -> torch.Tensor:
    """Ω = ½ Σ_i F_i (θ_i − θ*_i)²   (Kirkpatrick et al. 2017; F summed over past experiences)."""
    return 0.5 * sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fisher))


@register_learner("ewc")
class EWC(Finetune):
    """Fine-tuning plus λ·Ω, Ω the EWC penalty around the weights after the last experience, with
    the diagonal empirical Fisher (squared per-sample gradients of the log-likelihood of the true
    label) accumulated over experiences (`task.ewc_lambda`)."""

    def __init__(self, spec: LearnerSpec):
        super().__init__(spec)
        for i, p in enumerate(self.net.parameters()):
            self.register_buffer(f"anchor_{i}", p.detach().clone())
            self.register_buffer(f"fisher_{i}", torch.zeros_like(p))

    def _ewc_state(self, prefix):
        n = len(list(self.net.parameters()))
        return [getattr(self, f"{prefix}_{i}") for i in range(n)]

    def loss(self, x, y):
        penalty = ewc_penalty(list(self.net.parameters()), self._ewc_state("anchor"), self._ewc_state("fisher"))
        return F.cross_entropy(self.net(x), y) + self.spec.options.ewc_lambda * penalty

    def after_experience(self, x, y):
        params = list(self.net.parameters())
        grads = [torch.zeros_like(p) for p in params]
        for i in range(len(y)):
            g = torch.autograd.grad(F.cross_entropy(self.net(x[i:i + 1]), y[i:i + 1]), params)
            for acc, gi in zip(grads, g):
                acc += gi ** 2
        for f, a, g, p in zip(self._ewc_state("fisher"), self._ewc_state("anchor"), grads, params):
            f += g / len(y)
            a.copy_(p.detach())


@register_learner("kv_bottleneck")
class KVBottleneckLearner(Learner):
    """Frozen encoder (`task.encoder`) → KeyValueBottleneck. `prepare` fits the keys on the stream's
    unlabelled pool by EMA k-means (`task.key_init_epochs` passes) and freezes them; each experience
    then trains only the values, by plain SGD (`task.kvb_lr`) on the cross-entropy."""

    def __init__(self, spec: LearnerSpec):
        super().__init__(spec)
        o = spec.options
        self.encoder = build_encoder(o.encoder, spec.dim, o.encoder_dim, spec.seed)
        self.bottleneck = KeyValueBottleneck(
            self.encoder.dim_out, num_codebooks=o.num_codebooks, key_value_pairs_per_codebook=o.key_value_pairs_per_codebook,
            dim_values=spec.num_classes, dim_keys=o.dim_keys, decay=o.decay, threshold_ema_dead_code=o.threshold_ema_dead_code,
            topk=o.topk, splitting=o.splitting, seed=spec.seed)

    def prepare(self, unlabelled):
        z = self.encoder(unlabelled)
        for _ in range(self.spec.options.key_init_epochs):
            for idx in self.batches(len(z), 256):
                self.bottleneck.update_keys(z[idx], generator=self.generator)
        self.bottleneck.freeze_keys()

    def logits(self, x):
        return self.bottleneck(self.encoder(x))

    def train_experience(self, x, y):
        o = self.spec.options
        opt = torch.optim.SGD([self.bottleneck.values], lr=o.kvb_lr)
        z = self.encoder(x)
        total, steps = 0.0, 0
        for _ in range(o.epochs):
            for idx in self.batches(len(y), o.batch_size):
                loss = F.cross_entropy(self.bottleneck(z[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
        return {"loss": total / max(steps, 1), "steps": steps}


def build_learner(name: str, spec: LearnerSpec) -> Learner:
    import continual.tpp_learners  # noqa: F401  (registers the TPP learners)

    return LEARNERS.get(name)(spec)


def learner_kind(name: str) -> str:
    import continual.tpp_learners  # noqa: F401

    LEARNERS.get(name)
    return KIND[name]
