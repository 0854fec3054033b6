"""federated/lora.py: ΔW = s·B·A, factor-space helpers, peft and state-dict round trips."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from federated import lora
from federated.lora import LoraPair


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def peft_mlp(seed: int = 0, r: int = 4, alpha: int = 8, rank_pattern=None):
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=["fc1", "fc2"], r=r, lora_alpha=alpha,
                        rank_pattern=rank_pattern or {}, init_lora_weights=False)  # random B: a non-zero ΔW
    return get_peft_model(MLP(), config)


def pair(out: int, inp: int, r: int, scale: float = 1.0, seed: int = 0) -> LoraPair:
    g = torch.Generator().manual_seed(seed)
    return LoraPair(torch.randn(r, inp, generator=g, dtype=torch.float64),
                    torch.randn(out, r, generator=g, dtype=torch.float64), scale)


def test_delta_is_scaled_product_and_rescaling_keeps_it():
    p = pair(5, 7, 3, scale=2.5)
    assert p.rank == 3 and p.shape == (5, 7)
    torch.testing.assert_close(p.delta(), 2.5 * p.B @ p.A)
    torch.testing.assert_close(p.absorbed().delta(), p.delta())
    assert p.absorbed().scale == 1.0
    torch.testing.assert_close(p.rescaled(0.5).delta(), p.delta())


def test_pair_refuses_mismatched_ranks():
    with pytest.raises(ValueError, match="rank mismatch"):
        LoraPair(torch.zeros(3, 7), torch.zeros(5, 2))


def test_zero_pad_keeps_delta_and_truncate_keeps_leading_components():
    p = pair(5, 7, 2, scale=0.5)
    padded = lora.zero_pad(p, 6)
    assert padded.rank == 6
    torch.testing.assert_close(padded.delta(), p.delta())
    back = lora.truncate(padded, 2)
    torch.testing.assert_close(back.A, p.A)
    torch.testing.assert_close(back.B, p.B)
    with pytest.raises(ValueError):
        lora.zero_pad(p, 1)


def test_svd_factor_exact_at_full_rank_and_best_at_lower_rank():
    d = pair(6, 8, 4, seed=1).delta()
    full = lora.svd_factor(d, 4, scale=2.0)
    assert full.rank == 4 and full.scale == 2.0
    torch.testing.assert_close(full.delta(), d)
    low = lora.svd_factor(d, 2)
    s = torch.linalg.svdvals(d)
    # Eckart–Young: the Frobenius error of the best rank-2 approximation is √(σ₃² + σ₄²)
    torch.testing.assert_close(torch.linalg.norm(d - low.delta()), torch.sqrt((s[2:] ** 2).sum()))
    padded = lora.svd_factor(d, 7)  # more rank than ΔW has (min(out, in) = 6): padded, still exact
    assert padded.rank == 7
    torch.testing.assert_close(padded.delta(), d)


def test_subtract_and_add_are_inverse():
    old = {"m": pair(4, 3, 2, seed=1)}
    new = {"m": pair(4, 3, 2, seed=2)}
    upd = lora.subtract(new, old)
    back = lora.add(old, upd)
    torch.testing.assert_close(back["m"].A, new["m"].A)
    torch.testing.assert_close(back["m"].B, new["m"].B)
    with pytest.raises(ValueError, match="only in"):
        lora.subtract(new, {"other": old["m"]})


def test_from_peft_matches_peft_delta_with_mixed_ranks():
    model = peft_mlp(rank_pattern={"fc2": 2})
    adapters = lora.from_peft(model)
    assert lora.ranks(adapters) == {"base_model.model.fc1": 4, "base_model.model.fc2": 2}
    assert lora.scales(adapters) == {"base_model.model.fc1": 2.0, "base_model.model.fc2": 4.0}
    for name, module in lora.lora_modules(model).items():
        torch.testing.assert_close(adapters[name].delta(), module.get_delta_weight("default"))


def test_state_dict_round_trip_both_key_styles():
    model = peft_mlp(rank_pattern={"fc2": 2})
    adapters = lora.from_peft(model)
    full = lora.from_state_dict(model.state_dict(), lora.scales(adapters))  # keys with ".default."
    assert set(full) == set(adapters)
    for name in adapters:
        torch.testing.assert_close(full[name].delta(), adapters[name].delta())
    saved = lora.to_state_dict(adapters, adapter_name=None)  # peft's saved-file keys
    assert "base_model.model.fc1.lora_A.weight" in saved
    again = lora.from_state_dict(saved, lora.scales(adapters))
    torch.testing.assert_close(again["base_model.model.fc2"].B, adapters["base_model.model.fc2"].B)
    with pytest.raises(ValueError, match="no LoRA factors"):
        lora.from_state_dict(model.state_dict(), 1.0, adapter_name="other")
    with pytest.raises(ValueError, match="no scaling given"):
        lora.from_state_dict(model.state_dict(), {"base_model.model.fc1": 1.0})


def test_load_into_peft_keeps_delta_under_the_modules_scaling():
    model = peft_mlp(seed=0)
    source = lora.from_peft(peft_mlp(seed=1))
    moved = {name: p.rescaled(10.0) for name, p in source.items()}  # a different s, the same ΔW
    lora.load_into_peft(model, moved)
    for name, module in lora.lora_modules(model).items():
        torch.testing.assert_close(module.get_delta_weight("default"), source[name].delta())
        assert module.scaling["default"] == 2.0  # the model's own scaling is untouched


def test_load_into_peft_refuses_other_ranks_and_modules():
    model = peft_mlp()
    other = lora.from_peft(peft_mlp(rank_pattern={"fc2": 2}))
    with pytest.raises(ValueError, match="base_model.model.fc2: the model's adapter has rank 4"):
        lora.load_into_peft(model, other)
    with pytest.raises(ValueError, match="only in the model: base_model.model.fc2"):
        lora.load_into_peft(model, {"base_model.model.fc1": other["base_model.model.fc1"]})


def test_fold_into_base_equals_merged_forward():
    model = peft_mlp()
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(x)  # base + adapters
    adapters = lora.from_peft(model)
    lora.fold_into_base(model, lora.deltas(adapters))
    zero = {name: LoraPair(p.A, torch.zeros_like(p.B), p.scale) for name, p in adapters.items()}
    lora.load_into_peft(model, zero)  # adapters now add nothing: the base alone carries ΔW
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="no LoRA layer named nope"):
        lora.fold_into_base(model, {"nope": torch.zeros(1, 1)})


def test_from_peft_refuses_dora():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["fc1"], r=2, use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        lora.from_peft(model)


def test_round_trip_on_a_plait_llama():
    """Extract, load and fold on peft LoRA over a tiny Plait Llama's wq/wv: the logits of
    base + folded ΔW with zeroed adapters equal those of the adapted model."""
    from trainer.config import ModelConfig
    from trainer.models import build_model

    cfg = ModelConfig(name="llama_test", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=48, max_seq_len=16)
    model = get_peft_model(build_model(cfg, seed=0), LoraConfig(target_modules=["wq", "wv"], r=4, lora_alpha=8,
                                                                rank_pattern={"wv": 2}, init_lora_weights=False))
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)
    adapters = lora.from_peft(model)
    assert lora.ranks(adapters) == {f"base_model.model.layers.{i}.attention.{w}": r
                                    for i in range(2) for w, r in (("wq", 4), ("wv", 2))}
    lora.fold_into_base(model, lora.deltas(adapters))
    lora.load_into_peft(model, {n: LoraPair(p.A, torch.zeros_like(p.B), p.scale) for n, p in adapters.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)


def test_payload_bytes_counts_both_factors():
    adapters = {"a": pair(5, 7, 3), "b": LoraPair(torch.zeros(2, 4), torch.zeros(6, 2))}  # float64, float32
    assert lora.payload_bytes(adapters) == 3 * (5 + 7) * 8 + 2 * (4 + 6) * 4
