"""federated/planner.py: importance, the MILP against exhaustive search, infeasible budgets."""

from __future__ import annotations

import pytest

from federated import model as fm
from federated import planner as pl
from federated.config import ClientProfile
from federated.data import TaskSpec, generate
from trainer.config import ModelConfig
from trainer.errors import ConfigError

TINY = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
MODS = ["layers.0.attention.wq", "layers.0.attention.wv", "layers.0.feed_forward.w2"]


def problem(profiles, same_ranks=False, importance=(0.5, 0.3, 0.2), max_modules=2, balance=1.0):
    costs = pl.costs_of(fm.build_base(TINY, 0), seq_len=16, local_steps=10)
    costs = pl.Costs({m: costs.shapes[m] for m in MODS}, costs.linear_params, costs.other_params, 16,
                     costs.act_bytes_per_sample, 10)
    return pl.Problem(dict(zip(MODS, importance)), costs, profiles, [1 / len(profiles)] * len(profiles),
                      ranks=[2, 4], batches=[8, 16], bits=[8, 32], max_modules=max_modules,
                      balance_weight=balance, same_ranks=same_ranks, t_ref=0.01)


def test_importance_is_normalised_first_order_sensitivity():
    base = fm.build_base(TINY, 0)
    spec = TaskSpec(4, 12, TINY.vocab_size, 0.3)
    tokens, labels = generate(spec, 16, seed=1, task_seed=0)
    imp = pl.importance(base, tokens, labels, spec.label_tokens)
    assert set(imp) == set(fm.adaptable_modules(base))
    assert abs(sum(imp.values()) - 1) < 1e-9 and all(v >= 0 for v in imp.values())
    # the reference: Σ|w·∂L/∂w| of one module by hand
    base.zero_grad()
    fm.loss(base, tokens, labels, spec.label_tokens).backward()
    raw = {n: float((m.weight.detach() * m.weight.grad).abs().sum()) for n, m in base.named_modules() if n in imp}
    assert imp[MODS[0]] == pytest.approx(raw[MODS[0]] / sum(raw.values()), rel=1e-5)


@pytest.mark.parametrize("profiles, same", [
    ([ClientProfile(memory_mib=1.0, speed=1.0, bandwidth_mbps=10), ClientProfile(memory_mib=0.5, speed=4.0,
                                                                                 bandwidth_mbps=1)], False),
    ([ClientProfile(speed=1.0), ClientProfile(speed=2.0), ClientProfile(speed=4.0, time_budget_s=0.004)], False),
    ([ClientProfile(speed=1.0, bandwidth_mbps=0.5), ClientProfile(speed=3.0, memory_mib=0.4)], True),
])
def test_milp_optimum_equals_exhaustive_search(profiles, same):
    pb = problem(profiles, same_ranks=same)
    milp, brute = pl.solve(pb), pl.exhaustive(pb)
    assert brute is not None
    assert milp.objective == pytest.approx(brute.objective, abs=1e-9)
    for k, p in enumerate(milp.plans):  # the MILP's plan is feasible for the budgets it was given
        assert pb.feasible(k, p.batch_size, p.bits, p.ranks) is None
    if same:
        assert all(p.ranks == milp.plans[0].ranks for p in milp.plans)
    assert "objective" in pl.table(pb, milp)


def test_slower_clients_get_less_work_when_time_is_balanced():
    pb = problem([ClientProfile(speed=1.0), ClientProfile(speed=4.0)], balance=5.0)
    sol = pl.solve(pb)
    slow, fast = sol.plans
    work = lambda p: p.batch_size * sum(p.ranks.values())
    assert work(slow) <= work(fast)


def test_infeasible_memory_names_the_client_and_constraint():
    pb = problem([ClientProfile(), ClientProfile(memory_mib=0.01)])
    with pytest.raises(ConfigError, match=r"client 1's memory budget: task.clients\[1\].memory_mib=0.01"):
        pl.solve(pb)


def test_infeasible_round_time_names_the_client_and_constraint():
    pb = problem([ClientProfile(speed=0.01, time_budget_s=0.001), ClientProfile()])
    with pytest.raises(ConfigError, match=r"client 0's round-time budget: task.clients\[0\].time_budget_s"):
        pl.solve(pb)


def test_min_modules_forces_the_module_set():
    """task.plan_modules=target: every given module adapted, only ranks, batch and bits planned."""
    pb = problem([ClientProfile(speed=1.0), ClientProfile(speed=4.0)], max_modules=3)
    pb.min_modules = 3
    milp, brute = pl.solve(pb), pl.exhaustive(pb)
    assert sorted(milp.plans[0].ranks) == sorted(MODS)
    assert milp.objective == pytest.approx(brute.objective, abs=1e-9)
