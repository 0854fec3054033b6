"""federated/aggregation.py: each strategy's exactness against Σ p_k s_k B_k A_k, mixed ranks, refusals."""

from __future__ import annotations

import pytest
import torch

from federated import aggregation as agg
from federated import lora
from federated.lora import LoraPair
from trainer.errors import ConfigError

SHAPES = {"q_proj": (12, 10), "v_proj": (8, 10)}  # module: (out, in)
COUNTS = [30, 10, 60]  # sample counts: p = (0.3, 0.1, 0.6)


def clients(ranks=(4, 4, 4), alpha=8.0, seed=0, shared_A=False, dtype=torch.float64, shapes=SHAPES):
    """One adapters dict per client, scaling α/r (peft's default)."""
    g = torch.Generator().manual_seed(seed)
    shared = {m: torch.randn(ranks[0], i, generator=g, dtype=dtype) for m, (o, i) in shapes.items()}
    out = []
    for r in ranks:
        out.append({m: LoraPair(shared[m].clone() if shared_A else torch.randn(r, i, generator=g, dtype=dtype),
                                torch.randn(o, r, generator=g, dtype=dtype), alpha / r)
                    for m, (o, i) in shapes.items()})
    return out


def test_registry_holds_the_six_strategies_and_names_the_key():
    assert agg.STRATEGIES.names() == ["fedex", "fedit", "ffa", "flora", "hetlora", "svd"]
    with pytest.raises(ConfigError, match=r"task.strategy='fedavg' is not a registered aggregation strategy; "
                                          r"allowed: fedex, fedit, ffa, flora, hetlora, svd"):
        agg.build_strategy("fedavg")


def test_sample_weights_normalise_counts():
    assert agg.sample_weights(COUNTS) == pytest.approx([0.3, 0.1, 0.6])
    with pytest.raises(ValueError):
        agg.sample_weights([0, 0])


def test_target_is_the_weighted_average_of_client_deltas():
    cs = clients()
    target = agg.target_delta(cs, COUNTS)
    manual = 0.3 * cs[0]["q_proj"].delta() + 0.1 * cs[1]["q_proj"].delta() + 0.6 * cs[2]["q_proj"].delta()
    torch.testing.assert_close(target["q_proj"], manual)


@pytest.mark.parametrize("name", ["flora", "fedex"])
def test_exact_strategies_equal_ranks(name):
    cs = clients()
    result = agg.build_strategy(name)(cs, COUNTS)
    assert agg.aggregation_error(cs, COUNTS, result) < 1e-5


def test_ffa_is_exact_with_a_shared_frozen_A():
    cs = clients(shared_A=True)
    result = agg.build_strategy("ffa")(cs, COUNTS)
    assert agg.aggregation_error(cs, COUNTS, result) < 1e-5
    assert not result.base  # nothing folded: B̄·A is the whole update
    torch.testing.assert_close(result.adapters[1]["q_proj"].A, cs[0]["q_proj"].A)


def test_ffa_refuses_clients_whose_A_differs():
    with pytest.raises(ConfigError, match=r"task.strategy='ffa' keeps A frozen and shared, but client 1's A differs"):
        agg.build_strategy("ffa")(clients(), COUNTS)


def test_fedit_is_inexact_and_fedex_fixes_it_with_the_same_adapters():
    cs = clients()
    fedit = agg.build_strategy("fedit")(cs, COUNTS)
    fedex = agg.build_strategy("fedex")(cs, COUNTS)
    assert agg.aggregation_error(cs, COUNTS, fedit) > 0.1  # B̄Ā misses the cross terms
    for k in range(3):  # FedEx's adapters are FedIT's averages; the difference lives in the base
        torch.testing.assert_close(fedex.adapters[k]["v_proj"].delta(), fedit.adapters[k]["v_proj"].delta())
    residual = fedex.base_delta()["q_proj"]
    expected = agg.target_delta(cs, COUNTS)["q_proj"] - fedit.adapters[0]["q_proj"].delta()
    torch.testing.assert_close(residual, expected)
    assert fedex.base["q_proj"].rank == 3 * 4 + 4  # travels factored: Σ r_k + r


def test_fedit_averages_each_factor():
    cs = clients(alpha=4.0)  # s = 1: plain averages
    out = agg.build_strategy("fedit")(cs, COUNTS).adapters[2]["q_proj"]
    torch.testing.assert_close(out.A, sum(p * c["q_proj"].A for p, c in zip([0.3, 0.1, 0.6], cs)))
    torch.testing.assert_close(out.B, sum(p * c["q_proj"].B for p, c in zip([0.3, 0.1, 0.6], cs)))


MIXED = (2, 4, 8)


def test_flora_exact_for_mixed_ranks_and_restarts_adapters():
    cs = clients(MIXED)
    result = agg.build_strategy("flora")(cs, COUNTS)
    assert agg.aggregation_error(cs, COUNTS, result) < 1e-5
    assert result.adapters == [None, None, None]
    assert result.base["q_proj"].rank == sum(MIXED)


def test_svd_exact_before_truncation_and_per_client_rank_after():
    cs = clients(MIXED)
    untruncated = [{m: lora.zero_pad(p, sum(MIXED)) for m, p in c.items()} for c in cs]  # every r_k ≥ Σ r_j
    exact = agg.build_strategy("svd")(untruncated, COUNTS)
    assert agg.aggregation_error(untruncated, COUNTS, exact) < 1e-5
    result = agg.build_strategy("svd")(cs, COUNTS)
    assert [lora.ranks(a) for a in result.adapters] == [{"q_proj": r, "v_proj": r} for r in MIXED]
    errors = []
    for k, r in enumerate(MIXED):  # each client holds the best rank-r_k approximation (Eckart–Young)
        target = agg.target_delta(cs, COUNTS)["q_proj"]
        s = torch.linalg.svdvals(target)
        got = result.delta(k)["q_proj"]
        torch.testing.assert_close(torch.linalg.norm(got - target), torch.sqrt((s[r:] ** 2).sum()))
        errors.append(float(torch.linalg.norm(got - target)))
    assert errors[0] > errors[1] > errors[2] > 0  # more rank, less truncation


def test_hetlora_pads_averages_and_truncates():
    cs = clients(MIXED)
    result = agg.build_strategy("hetlora")(cs, COUNTS)
    assert [lora.ranks(a)["v_proj"] for a in result.adapters] == list(MIXED)
    p = [0.3, 0.1, 0.6]
    padded = [lora.zero_pad(c["v_proj"].absorbed(), 8) for c in cs]
    A = sum(pk * q.A for pk, q in zip(p, padded))
    B = sum(pk * q.B for pk, q in zip(p, padded))
    small = result.adapters[0]["v_proj"]  # rank 2: the first two components of the padded average
    torch.testing.assert_close(small.A, A[:2])
    torch.testing.assert_close(small.delta(), B[:, :2] @ A[:2])
    assert small.scale == cs[0]["v_proj"].scale  # loads into client 0's own module unchanged
    torch.testing.assert_close(result.adapters[2]["v_proj"].delta(), B @ A)


@pytest.mark.parametrize("name", ["fedit", "ffa", "fedex"])
def test_equal_rank_strategies_refuse_mixed_ranks(name):
    with pytest.raises(ConfigError, match=rf"task.strategy='{name}' needs every client at one rank, but module "
                                          r"q_proj has ranks \[2, 4, 8\]; for mixed ranks use one of: flora, hetlora, svd"):
        agg.build_strategy(name)(clients(MIXED), COUNTS)


def test_weights_follow_sample_counts():
    cs = clients()
    only_last = agg.build_strategy("flora")(cs, [0, 0, 5])
    torch.testing.assert_close(only_last.base_delta()["q_proj"], cs[2]["q_proj"].delta())


def test_refuses_clients_that_adapt_different_modules():
    cs = clients()
    del cs[1]["v_proj"]
    with pytest.raises(ValueError, match="client 1 adapts modules"):
        agg.build_strategy("flora")(cs, COUNTS)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("name", ["flora", "svd"])
def test_a_mixed_rank_round_on_peft_models(name):
    """Clients of ranks 2, 4, 8 on one base: after folding and loading, FLoRA puts every client at
    base + ΔW* (the merged average); SVD puts the rank-8 client there when ΔW* has rank ≤ 8."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = MLP()
    models = []
    for k, r in enumerate(MIXED):
        torch.manual_seed(100 + k)  # each client's own adapter init; the base is a copy of one model
        m = MLP()
        m.load_state_dict(base.state_dict())
        models.append(get_peft_model(m, LoraConfig(target_modules=["fc1", "fc2"], r=r, lora_alpha=8,
                                                   init_lora_weights=False)))
    updates = [lora.from_peft(m) for m in models]
    counts = [1, 1, 2]
    target = agg.target_delta(updates, counts)
    reference = MLP()
    reference.load_state_dict(base.state_dict())
    with torch.no_grad():
        reference.fc1.weight += target["base_model.model.fc1"]
        reference.fc2.weight += target["base_model.model.fc2"]
    result = agg.build_strategy(name)(updates, counts)
    x = torch.randn(7, 6)
    for k, m in enumerate(models):
        lora.fold_into_base(m, result.base_delta())
        if result.adapters[k] is None:  # restart: B = 0, so the adapters add nothing
            own = lora.from_peft(m)
            lora.load_into_peft(m, {n: LoraPair(p.A, torch.zeros_like(p.B), p.scale) for n, p in own.items()})
        else:
            lora.load_into_peft(m, result.adapters[k])
        if name == "flora" or MIXED[k] == 8:  # ΔW* of fc1 (5 × 6) and fc2 (3 × 5) has rank ≤ 5 ≤ 8
            with torch.no_grad():
                torch.testing.assert_close(m(x), reference(x), atol=1e-5, rtol=1e-5)


def test_strategy_state_round_trip_is_empty_and_strict():
    s = agg.build_strategy("svd")
    assert s.state_dict() == {}
    s.load_state_dict({})
    with pytest.raises(ValueError, match="has no state"):
        s.load_state_dict({"moments": torch.zeros(1)})


def test_error_of_an_all_zero_round_is_absolute_not_nan():
    cs = [{m: LoraPair(p.A, torch.zeros_like(p.B), p.scale) for m, p in c.items()} for c in clients()]  # B = 0: round 1
    assert agg.aggregation_error(cs, COUNTS, agg.build_strategy("fedit")(cs, COUNTS)) == 0.0


@pytest.mark.parametrize("name,ranks", [("ffa", (8,) * 6), ("flora", (2, 4, 8, 8, 16, 16)), ("fedex", (8,) * 6)])
def test_exact_strategies_hold_in_float32_at_a_larger_size(name, ranks):
    """What clients send is float32: the 1e-5 bound holds there too (the reference is float64)."""
    cs = clients(ranks, dtype=torch.float32, shared_A=name == "ffa", shapes={"w": (256, 192)})
    counts = [5, 1, 9, 3, 7, 2]
    result = agg.build_strategy(name)(cs, counts)
    assert agg.aggregation_error(cs, counts, result) < 1e-5


def test_download_bytes_flora_grows_with_clients_svd_does_not():
    cs = clients(MIXED, dtype=torch.float32)
    per_module = {m: o + i for m, (o, i) in SHAPES.items()}  # r·(out + in) elements per module
    flora = agg.build_strategy("flora")(cs, COUNTS)
    assert flora.download_bytes(0) == sum(MIXED) * sum(per_module.values()) * 4
    svd = agg.build_strategy("svd")(cs, COUNTS)
    assert [svd.download_bytes(k) for k in range(3)] == [r * sum(per_module.values()) * 4 for r in MIXED]
