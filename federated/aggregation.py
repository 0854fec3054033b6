"""Aggregation of clients' LoRA adapters into the next round's global state, a registry of
strategies selected by `task.strategy`: FedIT, FFA-LoRA, FLoRA, FlexLoRA-style SVD, HetLoRA,
FedEx-LoRA.

The target of every strategy is the average of the clients' weight updates, Σ_k p_k·s_k·B_k·A_k
with p_k = n_k / Σ n (sample counts). A strategy returns an `Aggregate`: per client the adapters
it trains next round (None: it re-initialises them) and the low-rank factors of a delta that every
client folds into its frozen base. A strategy is *exact* when base delta + a client's adapters
reproduce the target for every client (`aggregation_error` measures it).
"""

from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful

from federated.lora import Adapters, LoraPair, payload_bytes, svd_factor, truncate, zero_pad
from trainer.errors import ConfigError
from trainer.registry import Registry

STRATEGIES: Registry[type["Strategy"]] = Registry("aggregation strategy", key="task.strategy")


def sample_weights(num_samples: Sequence[float]) -> list[float]:
    """p_k = n_k / Σ_j n_j."""
    n = [float(x) for x in num_samples]
    if not n or any(x < 0 for x in n) or sum(n) <= 0:
        raise ValueError(f"client weights need non-negative sample counts with a positive sum, got {n}")
    total = sum(n)
    return [x / total for x in n]


def target_delta(clients: Sequence[Mapping[str, LoraPair]], weights: Sequence[float]) -> dict[str, Tensor]:
    """ΔW* = Σ_k p_k·s_k·B_k·A_k per module: the average of the clients' weight updates."""
    p = sample_weights(weights)
    return {name: sum(pk * c[name].delta() for pk, c in zip(p, clients)) for name in clients[0]}


@dataclass
class Aggregate:
    """The global state after a round: per client the adapters it trains next (None: re-initialise
    them, B = 0), and per module the factors of a delta folded into every client's frozen base."""

    adapters: list[Optional[Adapters]]
    base: Adapters = field(default_factory=dict)

    def base_delta(self) -> dict[str, Tensor]:
        """{module: ΔW_base} to fold into the frozen base weights."""
        return {name: pair.delta() for name, pair in self.base.items()}

    def download_bytes(self, client: int) -> int:
        """Bytes the server sends `client`: the base factors plus its own adapters."""
        return payload_bytes(self.base) + payload_bytes(self.adapters[client] or {})

    def delta(self, client: int) -> dict[str, Tensor]:
        """ΔW seen by `client` next round relative to this round's base: ΔW_base + s_k·B_k·A_k."""
        out = self.base_delta()
        for name, pair in (self.adapters[client] or {}).items():
            out[name] = out[name] + pair.delta() if name in out else pair.delta()
        return out


def aggregation_error(clients: Sequence[Mapping[str, LoraPair]], weights: Sequence[float],
                      result: Aggregate) -> float:
    """max_k ‖ΔW_k − ΔW*‖_F / ‖ΔW*‖_F over all modules stacked (0 for an exact strategy)."""
    # the reference in float64, so a float32 round's own rounding is what gets measured
    wide = [{n: LoraPair(q.A.double(), q.B.double(), q.scale) for n, q in c.items()} for c in clients]
    target = target_delta(wide, weights)
    norm = torch.sqrt(sum((d ** 2).sum() for d in target.values()))
    if norm == 0:  # every client sent a zero update: measure the absolute error instead
        norm = torch.ones((), dtype=norm.dtype)
    worst = 0.0
    for k in range(len(clients)):
        got = {n: d.double() for n, d in result.delta(k).items()}
        err = torch.sqrt(sum(((got.get(n, torch.zeros_like(d)) - d) ** 2).sum() for n, d in target.items()))
        worst = max(worst, float(err / norm))
    return worst


class Strategy(Stateful, abc.ABC):
    """Module by module: `aggregate_module(pairs, p) -> (per-client pairs or None, base pair or None)`.

    The state of a strategy that has one (a server optimizer's moments) goes through
    `state_dict()` / `load_state_dict()`; the strategies here are stateless."""

    name: ClassVar[str]
    exact: ClassVar[bool]
    mixed_ranks: ClassVar[bool]

    def __call__(self, clients: Sequence[Mapping[str, LoraPair]], weights: Sequence[float]) -> Aggregate:
        p = sample_weights(weights)
        if len(p) != len(clients):
            raise ValueError(f"{len(clients)} clients but {len(p)} weights")
        modules = _common_modules(clients)
        adapters: list[Adapters] = [{} for _ in clients]
        reinit = [False] * len(clients)
        base: Adapters = {}
        for name in modules:
            pairs = [c[name] for c in clients]
            if not self.mixed_ranks and len({q.rank for q in pairs}) > 1:
                raise ConfigError(
                    f"task.strategy={self.name!r} needs every client at one rank, but module {name} has "
                    f"ranks {[q.rank for q in pairs]}; for mixed ranks use one of: "
                    f"{', '.join(n for n in STRATEGIES.names() if STRATEGIES.get(n).mixed_ranks)}")
            per_client, base_pair = self.aggregate_module(pairs, p)
            for k, q in enumerate(per_client):
                if q is None:
                    reinit[k] = True
                else:
                    adapters[k][name] = q
            if base_pair is not None:
                base[name] = base_pair
        return Aggregate([None if r else a for a, r in zip(adapters, reinit)], base)

    @abc.abstractmethod
    def aggregate_module(self, pairs: Sequence[LoraPair], p: Sequence[float]
                         ) -> tuple[list[Optional[LoraPair]], Optional[LoraPair]]:
        """One module's clients' pairs → (each client's next pair or None to restart, base delta factors)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            raise ValueError(f"strategy {self.name!r} has no state, got keys {sorted(state_dict)}")


def build_strategy(name: str) -> Strategy:
    """The strategy registered as `name` (`task.strategy`); an unknown name is a ConfigError."""
    return STRATEGIES.get(name)()


# ---------------------------------------------------------------- the strategies


@STRATEGIES.register("fedit")
class FedIT(Strategy):
    """Ā = Σ p_k A_k, B̄ = Σ p_k s_k B_k: FedAvg on each factor (Zhang et al. 2024); B̄Ā ≠ Σ p_k B_k A_k."""

    name, exact, mixed_ranks = "fedit", False, False

    def aggregate_module(self, pairs, p):
        A, B = _average_factors(pairs, p)
        return [LoraPair(A, B, 1.0).rescaled(q.scale) for q in pairs], None


@STRATEGIES.register("ffa")
class FFALoRA(Strategy):
    """A frozen and shared, B̄ = Σ p_k s_k B_k: B̄A = Σ p_k s_k B_k A exactly (Sun et al., FFA-LoRA, 2024)."""

    name, exact, mixed_ranks = "ffa", True, False

    def aggregate_module(self, pairs, p):
        A = pairs[0].A
        for k, q in enumerate(pairs[1:], start=1):
            if not torch.equal(q.A, A):
                raise ConfigError(f"task.strategy='ffa' keeps A frozen and shared, but client {k}'s A differs "
                                  f"from client 0's (max |ΔA| = {float((q.A - A).abs().max()):.3g}); "
                                  f"initialise every client's A from one seed and freeze it")
        B = sum(pk * q.scale * q.B for pk, q in zip(p, pairs))
        return [LoraPair(A, B, 1.0).rescaled(q.scale) for q in pairs], None


@STRATEGIES.register("flora")
class FLoRA(Strategy):
    """ΔW = [s_1B_1, …, s_KB_K]·[p_1A_1; …; p_KA_K] = Σ p_k s_k B_k A_k: exact, any ranks.

    Merged into the base each round; clients restart their adapters (Wang et al., FLoRA, 2024)."""

    name, exact, mixed_ranks = "flora", True, True

    def aggregate_module(self, pairs, p):
        return [None] * len(pairs), _stack(pairs, p)


@STRATEGIES.register("svd")
class FlexLoRA(Strategy):
    """Client k gets SVD_{r_k}(Σ p_j s_j B_j A_j): exact when r_k ≥ the sum's rank, else the best rank r_k.

    One SVD per module, truncated to each client's rank (Bai et al., FlexLoRA, 2024)."""

    name, exact, mixed_ranks = "svd", False, True  # exact only before truncation

    def aggregate_module(self, pairs, p):
        target = sum(pk * q.delta() for pk, q in zip(p, pairs))
        svd = torch.linalg.svd(target, full_matrices=False)  # once, truncated per client
        return [svd_factor(target, q.rank, q.scale, svd=svd) for q in pairs], None


@STRATEGIES.register("hetlora")
class HetLoRA(Strategy):
    """Ā = Σ p_k [A_k; 0], B̄ = Σ p_k [s_kB_k, 0] at r_max; client k keeps the first r_k components.

    Cho et al., HetLoRA, 2024 (without its rank self-pruning and sparsity-weighted averaging)."""

    name, exact, mixed_ranks = "hetlora", False, True

    def aggregate_module(self, pairs, p):
        r_max = max(q.rank for q in pairs)
        A, B = _average_factors([zero_pad(q, r_max) for q in pairs], p)
        full = LoraPair(A, B, 1.0)
        return [truncate(full, q.rank).rescaled(q.scale) for q in pairs], None


@STRATEGIES.register("fedex")
class FedExLoRA(Strategy):
    """Ā, B̄ as FedIT, and Σ p_k s_k B_k A_k − B̄Ā folded into the frozen base: exact.

    Singhal et al., FedEx-LoRA, 2025."""

    name, exact, mixed_ranks = "fedex", True, False

    def aggregate_module(self, pairs, p):
        A, B = _average_factors(pairs, p)
        stacked = _stack(pairs, p)
        # ΔW* − B̄Ā = [s_1B_1, …, s_KB_K, −B̄]·[p_1A_1; …; p_KA_K; Ā]: rank ≤ Σ r_k + r, sent factored
        residual = LoraPair(torch.cat([stacked.A, A], dim=0), torch.cat([stacked.B, -B], dim=1), 1.0)
        return [LoraPair(A, B, 1.0).rescaled(q.scale) for q in pairs], residual


# ---------------------------------------------------------------- shared pieces


def _average_factors(pairs: Sequence[LoraPair], p: Sequence[float]) -> tuple[Tensor, Tensor]:
    """(Σ p_k A_k, Σ p_k s_k B_k): scalings folded into B so clients with different α average fairly."""
    A = sum(pk * q.A for pk, q in zip(p, pairs))
    B = sum(pk * q.scale * q.B for pk, q in zip(p, pairs))
    return A, B


def _stack(pairs: Sequence[LoraPair], p: Sequence[float]) -> LoraPair:
    """([p_1A_1; …; p_KA_K], [s_1B_1, …, s_KB_K], 1): rank Σ r_k, ΔW = Σ p_k s_k B_k A_k."""
    return LoraPair(torch.cat([pk * q.A for pk, q in zip(p, pairs)], dim=0),
                    torch.cat([q.scale * q.B for q in pairs], dim=1), 1.0)


def _common_modules(clients: Sequence[Mapping[str, LoraPair]]) -> list[str]:
    if not clients:
        raise ValueError("no client updates to aggregate")
    first = set(clients[0])
    for k, c in enumerate(clients[1:], start=1):
        if set(c) != first:
            raise ValueError(f"client {k} adapts modules {sorted(c)}, client 0 adapts {sorted(first)}; "
                             f"every client must adapt the same modules")
        for name in first:
            if c[name].shape != clients[0][name].shape:
                raise ValueError(f"module {name}: client {k} updates a {c[name].shape} weight, "
                                 f"client 0 a {clients[0][name].shape} one")
    return sorted(first)
