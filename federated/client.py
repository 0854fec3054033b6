"""A federated client's round, Flower-free: fold the server's base delta into its own copy of the
frozen base, quantize it, load the adapters it was sent, take `local_steps` AdamW steps on its own
data, optionally privatize the update, and keep its state for the next round.

The client's state (AdamW moments, its RNG, its data position, its running base delta) is a
`Stateful` saved through the one checkpoint format on the client's own disk, one step per round
(`<state_dir>/step_<round>`). The server tells each client the last round it *accepted* from it; the
client resumes from that step. So a reply that came too late, a crash after saving, or a server that
restarts from an older round all leave the client exactly where the server thinks it is.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor
from torch.distributed.checkpoint.stateful import Stateful

from federated.lora import Adapters, add, payload_bytes, subtract
from trainer.checkpoint import Checkpointer, step_dirname

_DATA: dict[str, list] = {}  # the clients' partitions, built once per process


@dataclass
class Plan:
    """One client's share of the plan: adapter rank per module, batch size (samples per step), base bits."""

    ranks: dict[str, int]
    batch_size: int
    bits: int

    def to_json(self) -> dict:
        return {"ranks": dict(self.ranks), "batch_size": self.batch_size, "bits": self.bits}

    @classmethod
    def from_json(cls, d: Mapping) -> "Plan":
        return cls({k: int(v) for k, v in d["ranks"].items()}, int(d["batch_size"]), int(d["bits"]))


@dataclass
class Request:
    """What the server sends client `client` in round `round`."""

    client: int
    round: int
    accepted: int  # the last round whose reply from this client the server aggregated (0: none)
    adapters: Adapters
    base_factors: Adapters  # the last aggregate's base delta, factored (folded on top of the client's own)
    base_dense: Optional[dict[str, Tensor]]  # or, for a client out of step, the whole running base delta
    plan: Plan
    freeze_A: bool  # FFA-LoRA: train B only
    state_dir: str

    def download_bytes(self) -> int:
        """Adapters + base factors (or the dense running base delta), as sent."""
        dense = sum(t.numel() * t.element_size() for t in (self.base_dense or {}).values())
        return payload_bytes(self.adapters) + payload_bytes(self.base_factors) + dense


@dataclass
class Reply:
    client: int
    round: int
    adapters: Adapters
    num_samples: int
    metrics: dict = field(default_factory=dict)


class ClientState(Stateful):
    """AdamW moments per adapter factor, the client's RNG, its data position and running base delta."""

    def __init__(self, plan: Plan, shapes: Mapping[str, tuple[int, int]], num_samples: int, seed: int):
        self.moments: dict[str, Tensor] = {}
        for name, r in sorted(plan.ranks.items()):
            out_f, in_f = shapes[name]
            for factor, shape in (("A", (r, in_f)), ("B", (out_f, r))):
                self.moments[f"{name}.{factor}.exp_avg"] = torch.zeros(shape)
                self.moments[f"{name}.{factor}.exp_avg_sq"] = torch.zeros(shape)
        self.adam_step = torch.zeros((), dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(num_samples, generator=self.generator)
        self.cursor = torch.zeros((), dtype=torch.int64)
        self.epoch = torch.zeros((), dtype=torch.int64)
        self.base = {name: torch.zeros(shapes[name]) for name in sorted(plan.ranks)}
        self.base_round = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"moments": self.moments, "adam_step": self.adam_step, "rng": self.generator.get_state(),
                "order": self.order, "cursor": self.cursor, "epoch": self.epoch, "base": self.base,
                "base_round": self.base_round}

    def load_state_dict(self, state: dict) -> None:
        self.moments = dict(state["moments"])
        self.base = dict(state["base"])
        self.adam_step, self.order = state["adam_step"], state["order"]
        self.cursor, self.epoch, self.base_round = state["cursor"], state["epoch"], state["base_round"]
        self.generator.set_state(state["rng"])

    def next_batch(self, batch_size: int) -> Tensor:
        """Indices of the next `batch_size` samples: epochs of a fresh permutation, wrapping across rounds."""
        out = []
        n = len(self.order)
        while len(out) < batch_size:
            if int(self.cursor) >= n:
                self.order = torch.randperm(n, generator=self.generator)
                self.cursor = torch.zeros((), dtype=torch.int64)
                self.epoch = self.epoch + 1
            take = min(batch_size - len(out), n - int(self.cursor))
            out += self.order[int(self.cursor):int(self.cursor) + take].tolist()
            self.cursor = self.cursor + take
        return torch.tensor(out)


def client_data(c, model_cfg, seed: int) -> list:
    """Every client's (tokens, labels) for this config (cached per process)."""
    import json
    from dataclasses import asdict

    from federated.data import TaskSpec, partitions

    key = json.dumps([c.num_classes, c.seq_len, c.train_samples, c.keyword_prob, c.partitioner, c.alpha,
                      list(c.partition_sizes), c.num_clients, asdict(model_cfg)["vocab_size"], seed])
    if key not in _DATA:
        spec = TaskSpec(c.num_classes, c.seq_len, model_cfg.vocab_size, c.keyword_prob)
        _DATA[key] = partitions(spec, c.train_samples, c.num_clients, c.partitioner, c.alpha,
                                list(c.partition_sizes), seed)
    return _DATA[key]


def inject_fault(faults: list[str], client: int, rnd: int, timeout_s: float) -> None:
    """`task.faults`: items "<raise|exit|hang>:<client>:<round>" — really raise, exit the process, or stall."""
    for item in faults:
        kind, k, r = item.split(":")
        if int(k) != client or int(r) != rnd:
            continue
        if kind == "raise":
            raise RuntimeError(f"injected fault: client {client} raises in round {rnd}")
        if kind == "exit":
            os._exit(17)
        if kind == "hang":
            time.sleep(timeout_s * 1.5)


def train_round(req: Request, c, model_cfg, seed: int) -> Reply:
    """One client's round (see the module docstring); `c` is the task's FederatedConfig."""
    from federated import model as fm
    from federated.data import TaskSpec

    start = time.perf_counter()
    inject_fault(c.faults, req.client, req.round, c.round_timeout_s)
    tokens, labels = client_data(c, model_cfg, seed)[req.client]
    shapes = {n: (p.B.shape[0], p.A.shape[1]) for n, p in req.adapters.items()}
    state = ClientState(req.plan, shapes, len(labels), seed=seed * 1000 + req.client)
    ckpt = Checkpointer(req.state_dir, keep_last=0, meta={"task": "federated-client", "client": req.client})
    if req.accepted > 0:
        ckpt.load(Path(req.state_dir) / step_dirname(req.accepted), {"client": state})

    # the base: the server's running delta for a client out of step, else this round's factors on top
    if req.base_dense is not None:
        state.base = {n: req.base_dense[n].clone() for n in state.base}
    elif req.base_factors and req.accepted != req.round - 1:
        raise RuntimeError(f"client {req.client}: its state is from round {req.accepted}, but the server sent "
                           f"only round {req.round - 1}'s base factors (a client out of step needs the whole delta)")
    for name, pair in req.base_factors.items():
        state.base[name] = state.base[name] + pair.delta()
    state.base_round = torch.tensor(req.round - 1)

    from federated.pretrain import of as pretraining

    net = fm.client_model(model_cfg, seed, state.base, req.plan.bits, req.adapters, c.lora_alpha_ratio, c.base,
                          pretraining(c, model_cfg))
    params = fm.lora_parameters(net)
    if req.freeze_A:
        for name, p in params.items():
            if name.endswith(".A"):
                p.requires_grad_(False)
    trained = {n: p for n, p in params.items() if p.requires_grad}
    opt = torch.optim.AdamW(list(trained.values()), lr=c.lr, weight_decay=c.weight_decay)
    if float(state.adam_step) > 0:
        for name, p in trained.items():
            opt.state[p] = {"step": state.adam_step.clone(), "exp_avg": state.moments[f"{name}.exp_avg"].clone(),
                            "exp_avg_sq": state.moments[f"{name}.exp_avg_sq"].clone()}
    spec = TaskSpec(c.num_classes, c.seq_len, model_cfg.vocab_size, c.keyword_prob)
    net.train()
    losses = []
    for _ in range(c.local_steps):
        idx = state.next_batch(req.plan.batch_size)
        loss = fm.loss(net, tokens[idx], labels[idx], spec.label_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for name, p in trained.items():
        s = opt.state[p]
        state.moments[f"{name}.exp_avg"] = s["exp_avg"].detach().clone()
        state.moments[f"{name}.exp_avg_sq"] = s["exp_avg_sq"].detach().clone()
        state.adam_step = s["step"].detach().clone().float().reshape(())
    adapters = fm.read_adapters(net)
    metrics = {"train_loss": sum(losses) / len(losses)}
    if c.dp:
        adapters, report = privatize_update(adapters, req.adapters, c, state.generator)
        metrics.update(report.metrics())
    compute_s = time.perf_counter() - start

    final = Path(req.state_dir) / step_dirname(req.round)
    shutil.rmtree(final, ignore_errors=True)  # a late or repeated round: replace it
    ckpt.save(req.round, {"client": state})
    ckpt.close()
    for old in Path(req.state_dir).glob("step_*"):  # what the server can no longer ask for
        if int(old.name.split("_")[1]) < req.accepted:
            shutil.rmtree(old, ignore_errors=True)
    metrics["compute_s"] = compute_s
    return Reply(req.client, req.round, adapters, len(labels), metrics)


def privatize_update(trained: Adapters, received: Adapters, c, generator: torch.Generator):
    """The Gaussian mechanism on u = trained − received, in factor space (federated/privacy.py)."""
    from federated.privacy import privatize

    noisy, report = privatize(subtract(trained, received), c.dp_clip_norm, c.dp_noise_multiplier, generator)
    return add(received, noisy), report
