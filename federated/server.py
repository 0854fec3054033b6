"""Plait's federated server loop, Flower-free: it owns the round counter, sends each client its own
request (its adapters at its ranks, the base delta), aggregates the replies with a registered
strategy, evaluates the merged model, and checkpoints its whole state every round, so a killed
server resumes at the saved round with results identical to an uninterrupted run.

The transport is a function `(requests, timeout_s) -> {client: Reply | reason it failed}`: Flower's
grid (federated/flower_app.py) or the in-process one here. A client that fails, or answers after
the timeout, is dropped from the round: it takes part in the aggregation with weight 0 (so it still
gets its next adapters, at its own rank) and its `accepted` round stays where it was.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful

from federated.aggregation import Aggregate, Strategy, aggregation_error
from federated.client import Plan, Reply, Request
from federated.lora import Adapters, LoraPair, payload_bytes

Transport = Callable[[list[Request], float], dict[int, Union[Reply, str]]]


class FederationStopped(RuntimeError):
    """Too few clients replied for a round to proceed (task.min_clients)."""


class ServerState(Stateful):
    """Round, each client's global adapters, the running base delta and the last base factors, the
    round each client was last accepted in, the last round's client weights, the server's RNG.

    Every tensor has a shape fixed by the plan, so a fresh server is the template a checkpoint loads
    into: the last base factors are stored zero-padded to the largest rank a strategy can produce."""

    def __init__(self, plans: Sequence[Plan], shapes: Mapping[str, tuple[int, int]], seed: int):
        self.plans = list(plans)
        self.shapes = dict(shapes)
        k = len(plans)
        self.round = torch.zeros((), dtype=torch.int64)
        self.adapters: list[Adapters] = [{} for _ in plans]
        self.base_total = {m: torch.zeros(shapes[m]) for m in sorted(plans[0].ranks)}
        # FedEx's residual: rank Σ r_k + max r_k; FLoRA's stack: Σ r_k
        self.max_base_rank = {m: sum(p.ranks[m] for p in plans) + max(p.ranks[m] for p in plans)
                              for m in self.base_total}
        self.base_A = {m: torch.zeros(self.max_base_rank[m], shapes[m][1]) for m in self.base_total}
        self.base_B = {m: torch.zeros(shapes[m][0], self.max_base_rank[m]) for m in self.base_total}
        self.base_rank = {m: torch.zeros((), dtype=torch.int64) for m in self.base_total}
        self.has_base = torch.zeros((), dtype=torch.bool)
        self.accepted = torch.zeros(k, dtype=torch.int64)
        self.weights = torch.zeros(k, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = 1.0

    # ---- the state's pieces ------------------------------------------------------------
    def base_factors(self) -> Adapters:
        """The last aggregate's base delta as factors (empty: none)."""
        out = {}
        for m in self.base_total:
            r = int(self.base_rank[m])
            if r:
                out[m] = LoraPair(self.base_A[m][:r], self.base_B[m][:, :r], 1.0)
        return out

    def set_base(self, aggregate: Aggregate) -> None:
        for m in self.base_total:
            pair = aggregate.base.get(m)
            self.base_A[m].zero_()
            self.base_B[m].zero_()
            self.base_rank[m] = torch.tensor(0 if pair is None else pair.rank)
            if pair is not None:
                self.base_A[m][:pair.rank] = pair.A
                self.base_B[m][:, :pair.rank] = pair.scale * pair.B
                self.base_total[m] = self.base_total[m] + pair.delta()
                self.has_base = torch.tensor(True)

    def state_dict(self) -> dict:
        adapters = {f"c{k}.{m}.{f}": getattr(p, f) for k, a in enumerate(self.adapters)
                    for m, p in a.items() for f in ("A", "B")}
        return {"round": self.round, "adapters": adapters, "base_total": self.base_total, "base_A": self.base_A,
                "base_B": self.base_B, "base_rank": self.base_rank, "has_base": self.has_base,
                "accepted": self.accepted, "weights": self.weights, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.accepted, self.weights = state["round"], state["accepted"], state["weights"]
        self.base_total, self.base_A, self.base_B = dict(state["base_total"]), dict(state["base_A"]), dict(state["base_B"])
        self.base_rank, self.has_base = dict(state["base_rank"]), state["has_base"]
        self.generator.set_state(state["rng"])
        for k, a in enumerate(self.adapters):
            self.adapters[k] = {m: LoraPair(state["adapters"][f"c{k}.{m}.A"], state["adapters"][f"c{k}.{m}.B"],
                                            p.scale) for m, p in a.items()}

    def global_delta(self) -> dict[str, Tensor]:
        """ΔW of the merged model: the running base delta + Σ_k p_k s_k B_k A_k of the clients' next adapters."""
        out = {m: t.clone() for m, t in self.base_total.items()}
        for p, a in zip(self.weights.tolist(), self.adapters):
            if p:
                for m, pair in a.items():
                    out[m] = out[m] + p * pair.delta()
        return out


@dataclass
class RoundResult:
    round: int
    replies: dict[int, Reply]
    dropped: dict[int, str]
    metrics: dict = field(default_factory=dict)


class Server:
    """The loop's state and one round's logic; the runner wraps it with checkpoints and logging."""

    def __init__(self, strategy: Strategy, plans: Sequence[Plan], shapes: Mapping[str, tuple[int, int]],
                 seed: int, alpha_ratio: float, state_dir: str, min_clients: int,
                 evaluate: Callable[[dict[str, Tensor]], float]):
        from federated.model import init_adapters

        self.strategy = strategy
        self.plans = list(plans)
        self.alpha_ratio = alpha_ratio
        self.state_dir = state_dir
        self.min_clients = min_clients
        self.evaluate = evaluate
        self.state = ServerState(plans, shapes, seed)
        self.state.adapters = init_adapters(shapes, [p.ranks for p in plans], alpha_ratio, self.state.generator)

    def requests(self, rnd: int) -> list[Request]:
        st = self.state
        factors = st.base_factors()
        out = []
        for k, plan in enumerate(self.plans):
            in_step = int(st.accepted[k]) == rnd - 1
            dense = None
            if not in_step and bool(st.has_base):
                dense = {m: t.clone() for m, t in st.base_total.items()}
            out.append(Request(client=k, round=rnd, accepted=int(st.accepted[k]), adapters=st.adapters[k],
                               base_factors=factors if in_step else {}, base_dense=dense, plan=plan,
                               freeze_A=self.strategy.name == "ffa",
                               state_dir=f"{self.state_dir}/client_{k:03d}"))
        return out

    def round(self, rnd: int, transport: Transport, timeout_s: float) -> RoundResult:
        """Round `rnd`: send, receive, drop the failed, aggregate, evaluate. Raises FederationStopped."""
        st = self.state
        if rnd != int(st.round) + 1:
            raise ValueError(f"the server is at round {int(st.round)}; round {rnd} cannot run next")
        requests = self.requests(rnd)
        start = time.perf_counter()
        answers = transport(requests, timeout_s)
        wall = time.perf_counter() - start
        replies = {k: a for k, a in answers.items() if isinstance(a, Reply)}
        dropped = {k: a for k, a in answers.items() if not isinstance(a, Reply)}
        dropped.update({k: "no reply" for k in range(len(self.plans)) if k not in answers})
        for k, reply in replies.items():  # a reply must fit what was asked
            sent = requests[k].adapters
            if {m: p.shape for m, p in reply.adapters.items()} != {m: p.shape for m, p in sent.items()} or \
                    {m: p.rank for m, p in reply.adapters.items()} != {m: p.rank for m, p in sent.items()}:
                dropped[k] = "its adapters do not match the ranks it was sent"
        replies = {k: replies[k] for k in sorted(replies) if k not in dropped}  # client order, not arrival order
        if len(replies) < self.min_clients:
            why = "; ".join(f"client {k}: {v}" for k, v in sorted(dropped.items()))
            raise FederationStopped(f"round {rnd}: {len(replies)} of {len(self.plans)} clients replied, fewer than "
                                    f"task.min_clients={self.min_clients} ({why}); the server state of round "
                                    f"{rnd - 1} is the last checkpoint")
        # a dropped client joins with weight 0: the target is unchanged, it still gets its next adapters
        clients = [replies[k].adapters if k in replies else requests[k].adapters for k in range(len(self.plans))]
        counts = [replies[k].num_samples if k in replies else 0 for k in range(len(self.plans))]
        aggregate = self.strategy(clients, counts)
        error = aggregation_error(clients, counts, aggregate)
        self._apply(aggregate, counts, rnd, replies)
        accuracy = self.evaluate(st.global_delta())
        # FFA-LoRA's A is frozen and shared: it travels down once (round 1) and never up
        frozen = self.strategy.name == "ffa"
        up = {k: payload_bytes(r.adapters) - (a_bytes(r.adapters) if frozen else 0) for k, r in replies.items()}
        down = {k: requests[k].download_bytes() - (a_bytes(requests[k].adapters) if frozen and rnd > 1 else 0)
                for k in range(len(self.plans))}
        metrics = {"accuracy": accuracy, "aggregation_error": error, "participants": len(replies),
                   "round_wall_s": wall,
                   "train_loss": sum(r.metrics["train_loss"] * r.num_samples for r in replies.values())
                   / max(1, sum(r.num_samples for r in replies.values())),
                   "bytes_up": sum(up.values()), "bytes_down": sum(down.values())}
        for k in range(len(self.plans)):
            metrics[f"client{k}/bytes_down"] = down[k]
            if k in replies:
                metrics[f"client{k}/bytes_up"] = up[k]
                for key, v in replies[k].metrics.items():
                    metrics[f"client{k}/{key}"] = v
        return RoundResult(rnd, replies, dropped, metrics)

    def _apply(self, aggregate: Aggregate, counts: list[int], rnd: int, replies: Mapping[int, Reply]) -> None:
        from federated.model import init_adapters

        st = self.state
        st.set_base(aggregate)
        restart = [k for k, a in enumerate(aggregate.adapters) if a is None]
        fresh = init_adapters(st.shapes, [self.plans[k].ranks for k in restart], self.alpha_ratio,
                              st.generator) if restart else []
        for k, a in enumerate(aggregate.adapters):
            st.adapters[k] = {m: LoraPair(p.A.contiguous(), p.B.contiguous(), p.scale) for m, p in a.items()} \
                if a is not None else fresh[restart.index(k)]
        total = sum(counts)
        st.weights = torch.tensor([n / total for n in counts], dtype=torch.float64)
        for k in replies:
            st.accepted[k] = rnd
        st.round = torch.tensor(rnd)


def a_bytes(adapters: Mapping[str, LoraPair]) -> int:
    """Bytes of the A factors alone."""
    return sum(p.A.numel() * p.A.element_size() for p in adapters.values())


def local_transport(c, model_cfg, seed: int) -> Transport:
    """Clients run in this process, one after another (task.mode=local): no Flower, no Ray. A client
    that raises is dropped; one that takes longer than the timeout is dropped after it returns."""
    from federated.client import train_round

    def send(requests: list[Request], timeout_s: float) -> dict[int, Union[Reply, str]]:
        out: dict[int, Union[Reply, str]] = {}
        for req in requests:
            start = time.perf_counter()
            try:
                reply = train_round(req, c, model_cfg, seed)
            except Exception as err:  # noqa: BLE001 - a client's failure is the round's business
                out[req.client] = f"raised {type(err).__name__}: {err}"
                continue
            took = time.perf_counter() - start
            out[req.client] = reply if took <= timeout_s else f"took {took:.1f} s > task.round_timeout_s={timeout_s}"
        return out

    return send


def plans_json(plans: Sequence[Plan]) -> str:
    return json.dumps([p.to_json() for p in plans], sort_keys=True)
