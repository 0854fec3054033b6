"""FedPipe's automation (Fang et al., 2024) as a mixed-integer program solved with SciPy's `milp`:
which weight matrices to adapt, and per client the rank of each adapter, the batch size and the
base model's quantization bits, under each client's memory and round-time budget.

FedPipe's exact program is not public; this is the formulation documented in docs/federated.md
(`task.plan_modules=importance`, the default, lets the program choose up to task.max_modules, on
the pretrained base of federated/pretrain.py; `target` fixes u_m = 1 on task.target_modules):

    importance   I_m = Σ |w ⊙ ∂L/∂w| over weight matrix m on a calibration batch, normalised to Σ_m I_m = 1
    variables    u_m ∈ {0,1} adapt module m;  x_kmr ∈ {0,1} client k gives m rank r;
                 y_kbq ∈ {0,1} client k trains at batch b on a q-bit base;  w_kmrb = x_kmr·y_kb (linearised);
                 T ≥ 0 the slowest client's round time
    maximise     Σ_k p_k [ Σ_mr I_m·v(r)·x_kmr + β Σ_bq (b/b_max)·y_kbq − γ Σ_bq π(q)·y_kbq ] − λ·T/T_ref
    subject to   Σ_r x_kmr = u_m,  Σ_bq y_kbq = 1,  min_modules ≤ Σ_m u_m ≤ max_modules
                 mem_k = Σ_bq (base(q) + act(b))·y_kbq + Σ_mr 4·adapter(m,r)·x_kmr ≤ M_k
                 t_k = Σ_bq S·b·F_base·slow(q)/(ρ s_k)·y_kbq + Σ_mrb S·b·F_mr/(ρ s_k)·w_kmrb
                       + Σ_mr 2·bytes(m,r)·8/bw_k·x_kmr  ≤ T,  ≤ budget_k (when given)
                 x_kmr = x_0mr for a strategy that needs one rank per module

with v(r) = log2(1+r)/log2(1+r_max) (diminishing returns of rank), S local steps, F FLOPs per
sample (4·params·seq for the frozen base's forward and input-gradient backward, 6·r·(in+out)·seq
for an adapter), ρ = REFERENCE_FLOPS (a client of speed 1), p_k the clients' data shares.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from federated.client import Plan
from federated.config import ClientProfile
from trainer.errors import ConfigError

REFERENCE_FLOPS = 1e10  # FLOP/s of a client of speed 1 (the cost model's unit, not a measurement)
QUANT_SLOWDOWN = {32: 1.0, 8: 1.45, 4: 1.65}  # step time vs float, measured here (optimum-quanto on CPU)
QUANT_PENALTY = {32: 0.0, 8: 0.02, 4: 0.1}  # π(q): the objective's price of a coarser base
BATCH_VALUE = 0.1  # β
ADAPTER_COPIES = 4  # weights, gradients and AdamW's two moments


@dataclass(frozen=True)
class Costs:
    """The cost model of one model and task: everything the program's coefficients come from."""

    shapes: dict[str, tuple[int, int]]  # adaptable module → (out, in)
    linear_params: int  # weights of every adaptable Linear (what quantization shrinks)
    other_params: int  # embeddings, head, norms: kept in float32
    seq_len: int
    act_bytes_per_sample: float
    local_steps: int

    def base_bytes(self, bits: int) -> float:
        return self.linear_params * bits / 8 + self.other_params * 4

    def adapter_params(self, m: str, r: int) -> int:
        out_f, in_f = self.shapes[m]
        return r * (in_f + out_f)

    def base_flops(self, batch: int, bits: int) -> float:
        """Per round: S·b samples, forward + input-gradient backward of the frozen base."""
        return self.local_steps * batch * 4 * (self.linear_params + self.other_params) * self.seq_len * \
            QUANT_SLOWDOWN[bits]

    def adapter_flops(self, m: str, r: int, batch: int) -> float:
        return self.local_steps * batch * 6 * self.adapter_params(m, r) * self.seq_len


def costs_of(model: nn.Module, seq_len: int, local_steps: int) -> Costs:
    from federated.model import weight_shapes

    shapes = weight_shapes(model)
    linear = sum(o * i for o, i in shapes.values())
    total = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "cfg", None)  # a Plait Llama's ModelConfig, else a Hugging Face LlamaConfig
    if cfg is not None:
        layers, dim, ffn, vocab = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size
    else:
        hf = model.config
        layers, dim, ffn, vocab = hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.vocab_size
    per_token = layers * (10 * dim + 3 * ffn) + vocab  # activations stored for backward
    return Costs(shapes, linear, total - linear, seq_len, 4.0 * per_token * seq_len, local_steps)


def importance(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, label_tokens: list[int]) -> dict[str, float]:
    """I_m = Σ |w ⊙ ∂L/∂w| per adaptable weight matrix (first-order sensitivity), normalised to sum 1."""
    from federated.model import adaptable_modules, loss

    mods = dict(model.named_modules())
    names = adaptable_modules(model)
    model.zero_grad(set_to_none=True)
    loss(model, tokens, labels, label_tokens).backward()
    raw = {n: float((mods[n].weight.detach() * mods[n].weight.grad).abs().sum()) for n in names}
    model.zero_grad(set_to_none=True)
    total = sum(raw.values()) or 1.0
    return {n: v / total for n, v in raw.items()}


@dataclass
class Problem:
    """One planning instance."""

    importance: dict[str, float]
    costs: Costs
    profiles: list[ClientProfile]
    shares: list[float]  # p_k
    ranks: list[int]
    batches: list[int]
    bits: list[int]
    max_modules: int
    balance_weight: float
    same_ranks: bool  # the strategy needs one rank per module across clients
    t_ref: float = 1.0
    min_modules: int = 1

    @property
    def modules(self) -> list[str]:
        return sorted(self.importance)

    # ---- per-choice quantities (shared by the MILP and the exhaustive search) -------------
    def value(self, r: int) -> float:
        return math.log2(1 + r) / math.log2(1 + max(self.ranks))

    def memory(self, k: int, b: int, q: int, ranks: Mapping[str, int]) -> float:
        """Bytes on client k."""
        c = self.costs
        return c.base_bytes(q) + b * c.act_bytes_per_sample + sum(
            ADAPTER_COPIES * 4 * c.adapter_params(m, r) for m, r in ranks.items())

    def time(self, k: int, b: int, q: int, ranks: Mapping[str, int]) -> float:
        """Modelled seconds of client k's round: compute at its speed + adapters up and down at its bandwidth."""
        c, prof = self.costs, self.profiles[k]
        flops = c.base_flops(b, q) + sum(c.adapter_flops(m, r, b) for m, r in ranks.items())
        comm = sum(2 * 4 * c.adapter_params(m, r) for m, r in ranks.items()) * 8 / (prof.bandwidth_mbps * 1e6)
        return flops / (REFERENCE_FLOPS * prof.speed) + comm

    def objective(self, choices: Sequence[tuple[int, int, Mapping[str, int]]]) -> float:
        """Σ_k p_k [Σ_m I_m·v(r_km) + β·b_k/b_max − π(q_k)] − λ·max_k t_k/T_ref of per-client (b, q, ranks)."""
        total = 0.0
        for k, (b, q, ranks) in enumerate(choices):
            total += self.shares[k] * (sum(self.importance[m] * self.value(r) for m, r in ranks.items())
                                       + BATCH_VALUE * b / max(self.batches) - QUANT_PENALTY[q])
        slowest = max(self.time(k, b, q, ranks) for k, (b, q, ranks) in enumerate(choices))
        return total - self.balance_weight * slowest / self.t_ref

    def feasible(self, k: int, b: int, q: int, ranks: Mapping[str, int]) -> Optional[str]:
        """None, or which budget client k's choice breaks."""
        prof = self.profiles[k]
        if self.memory(k, b, q, ranks) > prof.memory_mib * 2**20:
            return "memory"
        if prof.time_budget_s and self.time(k, b, q, ranks) > prof.time_budget_s:
            return "round time"
        return None


@dataclass
class Solution:
    plans: list[Plan]
    objective: float
    times: list[float]
    memories: list[float]


def solve(pb: Problem) -> Solution:
    """The MILP's optimum (scipy.optimize.milp, HiGHS); an infeasible budget is a ConfigError naming
    the client and the constraint."""
    from scipy.optimize import LinearConstraint, milp

    M, K, R, Bs, Q = pb.modules, len(pb.profiles), pb.ranks, pb.batches, pb.bits
    BQ = list(itertools.product(Bs, Q))
    idx: dict = {}

    def var(key):
        idx[key] = len(idx)

    for m in M:
        var(("u", m))
    for k in range(K):
        for m in M:
            for r in R:
                var(("x", k, m, r))
        for bq in BQ:
            var(("y", k, bq))
        for m in M:
            for r in R:
                for b in Bs:
                    var(("w", k, m, r, b))
    var(("T",))
    n = len(idx)
    c = np.zeros(n)
    rows, lo, hi = [], [], []

    def row(coefs: dict, lb: float, ub: float):
        a = np.zeros(n)
        for key, v in coefs.items():
            a[idx[key]] += v
        rows.append(a)
        lo.append(lb)
        hi.append(ub)

    cost = pb.costs
    for k in range(K):
        prof, p = pb.profiles[k], pb.shares[k]
        for m in M:
            for r in R:
                c[idx[("x", k, m, r)]] -= p * pb.importance[m] * pb.value(r)
            row({("u", m): -1, **{("x", k, m, r): 1 for r in R}}, 0, 0)
            if pb.same_ranks and k > 0:
                for r in R:
                    row({("x", k, m, r): 1, ("x", 0, m, r): -1}, 0, 0)
        for b, q in BQ:
            c[idx[("y", k, (b, q))]] -= p * (BATCH_VALUE * b / max(Bs) - QUANT_PENALTY[q])
        row({("y", k, bq): 1 for bq in BQ}, 1, 1)
        # w_kmrb ≥ x_kmr + y_kb − 1 (w only appears with a positive cost, so it sits at the bound)
        for m in M:
            for r in R:
                for b in Bs:
                    row({("w", k, m, r, b): 1, ("x", k, m, r): -1, **{("y", k, (b, q)): -1 for q in Q}}, -1, np.inf)
        mem = {("y", k, (b, q)): cost.base_bytes(q) + b * cost.act_bytes_per_sample for b, q in BQ}
        mem.update({("x", k, m, r): ADAPTER_COPIES * 4 * cost.adapter_params(m, r) for m in M for r in R})
        row(mem, -np.inf, prof.memory_mib * 2**20)
        rate = REFERENCE_FLOPS * prof.speed
        t = {("y", k, (b, q)): cost.base_flops(b, q) / rate for b, q in BQ}
        t.update({("w", k, m, r, b): cost.adapter_flops(m, r, b) / rate for m in M for r in R for b in Bs})
        t.update({("x", k, m, r): 2 * 4 * cost.adapter_params(m, r) * 8 / (prof.bandwidth_mbps * 1e6)
                  for m in M for r in R})
        row({**t, ("T",): -1}, -np.inf, 0)
        if prof.time_budget_s:
            row(t, -np.inf, prof.time_budget_s)
    row({("u", m): 1 for m in M}, pb.min_modules, pb.max_modules)
    c[idx[("T",)]] = pb.balance_weight / pb.t_ref
    integrality = np.ones(n)
    integrality[idx[("T",)]] = 0
    ub = np.ones(n)
    ub[idx[("T",)]] = np.inf
    from scipy.optimize import Bounds

    res = milp(c, integrality=integrality, bounds=Bounds(np.zeros(n), ub),
               constraints=LinearConstraint(np.array(rows), np.array(lo), np.array(hi)),
               options={"time_limit": 60})
    if res.x is None:
        raise ConfigError(diagnose(pb))
    x = res.x
    chosen = [m for m in M if x[idx[("u", m)]] > 0.5]
    plans = []
    for k in range(K):
        ranks = {m: r for m in chosen for r in R if x[idx[("x", k, m, r)]] > 0.5}
        b, q = next(bq for bq in BQ if x[idx[("y", k, bq)]] > 0.5)
        plans.append(Plan(ranks, b, q))
    return finish(pb, plans)


def finish(pb: Problem, plans: list[Plan]) -> Solution:
    choices = [(p.batch_size, p.bits, p.ranks) for p in plans]
    return Solution(plans, pb.objective(choices), [pb.time(k, *ch) for k, ch in enumerate(choices)],
                    [pb.memory(k, *ch) for k, ch in enumerate(choices)])


def exhaustive(pb: Problem) -> Optional[Solution]:
    """Every combination (small instances only): the reference the MILP is tested against."""
    M, K = pb.modules, len(pb.profiles)
    best: Optional[tuple[float, list]] = None
    for size in range(pb.min_modules, min(pb.max_modules, len(M)) + 1):
        for subset in itertools.combinations(M, size):
            per_client = []
            for k in range(K):
                opts = [(b, q, dict(zip(subset, rs))) for b in pb.batches for q in pb.bits
                        for rs in itertools.product(pb.ranks, repeat=size)]
                per_client.append([o for o in opts if pb.feasible(k, *o) is None])
            for combo in itertools.product(*per_client):
                if pb.same_ranks and any(ch[2] != combo[0][2] for ch in combo):
                    continue
                value = pb.objective(combo)
                if best is None or value > best[0] + 1e-12:
                    best = (value, list(combo))
    if best is None:
        return None
    return finish(pb, [Plan(dict(r), b, q) for b, q, r in best[1]])


def diagnose(pb: Problem) -> str:
    """Why no plan fits: the first client whose cheapest choice breaks a budget, and which one."""
    r_min = min(pb.ranks)
    cheapest_module = min(pb.modules, key=lambda m: pb.costs.adapter_params(m, r_min))
    one = {cheapest_module: r_min}
    for k, prof in enumerate(pb.profiles):
        mem = min(pb.memory(k, b, q, one) for b in pb.batches for q in pb.bits)
        if mem > prof.memory_mib * 2**20:
            return (f"no plan fits client {k}'s memory budget: task.clients[{k}].memory_mib={prof.memory_mib:g} "
                    f"but its smallest plan (batch {min(pb.batches)}, {min(pb.bits)}-bit base, one module at "
                    f"rank {r_min}) needs {mem / 2**20:.2f} MiB")
        t = min(pb.time(k, b, q, one) for b in pb.batches for q in pb.bits)
        if prof.time_budget_s and t > prof.time_budget_s:
            return (f"no plan fits client {k}'s round-time budget: task.clients[{k}].time_budget_s="
                    f"{prof.time_budget_s:g} but its fastest plan takes {t:.3g} s (speed {prof.speed:g}, "
                    f"bandwidth {prof.bandwidth_mbps:g} Mbit/s)")
        fits = [1 for b in pb.batches for q in pb.bits if pb.feasible(k, b, q, one) is None]
        if not fits:
            return (f"no plan fits client {k}'s memory (task.clients[{k}].memory_mib={prof.memory_mib:g}) and "
                    f"round-time (time_budget_s={prof.time_budget_s:g}) budgets together")
    return ("no plan fits every client's budgets with one rank per module across clients (the strategy needs "
            "equal ranks); use a strategy that takes mixed ranks (svd, hetlora, flora) or raise the budgets")


def table(pb: Problem, sol: Solution) -> str:
    """The plan as text: per client its bits, batch, ranks per module, modelled memory and round time."""
    mods = sorted({m for p in sol.plans for m in p.ranks})
    head = f"{'client':>6} {'speed':>5} {'bits':>4} {'batch':>5} {'mem MiB':>8} {'time s':>8}  ranks"
    lines = [f"modules adapted ({len(mods)}): " + ", ".join(f"{m} (I={pb.importance[m]:.3f})" for m in mods), head]
    for k, p in enumerate(sol.plans):
        ranks = " ".join(str(p.ranks[m]) for m in mods)
        lines.append(f"{k:>6} {pb.profiles[k].speed:>5g} {p.bits:>4} {p.batch_size:>5} "
                     f"{sol.memories[k] / 2**20:>8.2f} {sol.times[k]:>8.3f}  {ranks}")
    lines.append(f"objective {sol.objective:.4f}; slowest round {max(sol.times):.3f} s")
    return "\n".join(lines)
