"""federated/client.py, model.py, data.py: a client's round on a quantized base, its state on disk,
DP on its update, the partitions; and the merged model's export to Hugging Face."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from federated import model as fm
from federated.client import Plan, Request, train_round
from federated.config import FederatedConfig
from federated.data import TaskSpec, label_counts, partitions
from federated.lora import subtract
from federated.privacy import global_norm
from trainer.config import ModelConfig

MC = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
MODS = ["layers.0.attention.wq", "layers.1.feed_forward.w2"]


def options(**kw):
    base = dict(_target_="federated.run.run", name="federated", num_clients=2, train_samples=200, seq_len=12,
                local_steps=3)
    return FederatedConfig(**{**base, **kw})


def request(tmp_path, rnd=1, accepted=0, bits=8, adapters=None, **kw):
    shapes = fm.weight_shapes(fm.build_base(MC, 0))
    plan = Plan({MODS[0]: 4, MODS[1]: 2}, 8, bits)
    if adapters is None:
        adapters = fm.init_adapters(shapes, [plan.ranks], 2.0, torch.Generator().manual_seed(0))[0]
    return Request(client=0, round=rnd, accepted=accepted, adapters=adapters, base_factors={}, base_dense=None,
                   plan=plan, freeze_A=False, state_dir=str(tmp_path / "client_000"), **kw)


def test_lora_on_an_int8_quantized_frozen_base_trains_only_the_adapters():
    from optimum.quanto import QLinear

    shapes = fm.weight_shapes(fm.build_base(MC, 0))
    ads = fm.init_adapters(shapes, [{MODS[0]: 4}], 2.0, torch.Generator().manual_seed(0))[0]
    net = fm.client_model(MC, 0, {}, 8, ads, 2.0)
    assert isinstance(dict(net.named_modules())["base_model.model.layers.0.attention.wq"].base_layer, QLinear)
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.layers.0.attention.wq.lora_A.default.weight",
                         "base_model.model.layers.0.attention.wq.lora_B.default.weight"]
    assert fm.read_adapters(net)[MODS[0]].scale == 2.0


def test_hf_base_is_the_plait_base_as_llama_for_causal_lm():
    from optimum.quanto import QLinear

    plait, hf = fm.build_base(MC, 0), fm.build_base(MC, 0, kind="hf")
    tokens = torch.randint(0, MC.vocab_size, (3, 12))
    torch.testing.assert_close(fm.logits(hf, tokens, [2, 3, 4, 5]), fm.logits(plait, tokens, [2, 3, 4, 5]),
                               rtol=0, atol=1e-6)
    assert fm.select(hf, ["wq", "v_proj"]) == [f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                               for p in ("q_proj", "v_proj")]
    assert "lm_head" not in " ".join(fm.adaptable_modules(hf))
    q = fm.quantize(hf, 4)
    assert isinstance(q.model.layers[0].mlp.down_proj, QLinear) and not isinstance(q.lm_head, QLinear)


def test_a_client_resumes_its_state_from_its_own_disk(tmp_path):
    """Rounds 1, 2 in one go equal round 1, then round 2 in a fresh process state (module caches cleared)."""
    c = options()
    r1 = train_round(request(tmp_path / "a"), c, MC, 0)
    r2 = train_round(request(tmp_path / "a", rnd=2, accepted=1, adapters=r1.adapters), c, MC, 0)
    import federated.client as fc
    import federated.model as fmod

    fc._DATA.clear()
    fmod._BASES.clear()
    s1 = train_round(request(tmp_path / "b"), c, MC, 0)
    s2 = train_round(request(tmp_path / "b", rnd=2, accepted=1, adapters=s1.adapters), c, MC, 0)
    for m in MODS:
        assert torch.equal(r2.adapters[m].A, s2.adapters[m].A) and torch.equal(r2.adapters[m].B, s2.adapters[m].B)
    # round 2 continued from round 1's AdamW moments and data position: restarting them changes the result
    fresh = train_round(request(tmp_path / "c", rnd=2, accepted=0, adapters=r1.adapters), c, MC, 0)
    assert not torch.equal(fresh.adapters[MODS[1]].B, r2.adapters[MODS[1]].B)
    assert sorted(p.name for p in (tmp_path / "a" / "client_000").glob("step_*")) == ["step_000000001",
                                                                                        "step_000000002"]


def test_dp_clips_the_update_in_adapter_space_and_reports(tmp_path):
    c = options(dp=True, dp_clip_norm=1e-3, dp_noise_multiplier=0.0)
    req = request(tmp_path)
    reply = train_round(req, c, MC, 0)
    assert global_norm(subtract(reply.adapters, req.adapters)) == pytest.approx(1e-3, rel=1e-4)
    assert reply.metrics["dp_clipped"] == 1.0 and reply.metrics["dp_update_norm"] > 1e-3


def test_dp_epsilon_from_dp_accounting_decreases_with_noise():
    from federated.run import dp_epsilon

    loud, quiet = dp_epsilon(options(dp_noise_multiplier=2.0), 10), dp_epsilon(options(dp_noise_multiplier=0.8), 10)
    assert 0 < loud < quiet < float("inf")


def test_partitions_are_flwr_datasets_splits_with_label_skew():
    spec = TaskSpec(4, 12, 64, 0.3)
    iid = partitions(spec, 400, 4, "iid", 1.0, [], seed=0)
    skew = partitions(spec, 400, 4, "dirichlet", 0.1, [], seed=0)
    sized = partitions(spec, 400, 3, "size", 1.0, [50, 100, 250], seed=0)
    assert [len(y) for _, y in iid] == [100] * 4 and [len(y) for _, y in sized] == [50, 100, 250]
    spread = lambda parts: max(max(label_counts(y, 4)) / len(y) for _, y in parts)
    assert spread(skew) > 0.6 > spread(iid)  # α = 0.1: some client is dominated by one topic
    assert sum(len(y) for _, y in skew) == 400
    again = partitions(spec, 400, 4, "dirichlet", 0.1, [], seed=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(skew, again))


@pytest.mark.slow
def test_merged_model_exports_to_hugging_face(tmp_path):
    from test_federated_server import config, run_local

    run_local(config(tmp_path / "run", rounds=1))
    out = subprocess.run([str(Path(sys.executable).with_name("plait-ckpt")), "export",
                          str(tmp_path / "run" / "checkpoints"), "--to", "hf", str(tmp_path / "hf")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 32
    # the exported weights are W0 + the running base delta + Σ_k p_k s_k B_k A_k of the server's state
    from test_federated_server import server_state

    st = server_state(tmp_path / "run", tmp_path, 1)["server"]
    w0 = fm.base_weights(MC, 0)
    for name in st["base_total"]:
        delta = st["base_total"][name].clone()
        for k, p in enumerate(st["weights"].tolist()):
            delta += p * 2.0 * st["adapters"][f"c{k}.{name}.B"] @ st["adapters"][f"c{k}.{name}.A"]
        layer, proj = name.split(".")[1], name.split(".")[-1]
        hf_name = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                   "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}[proj]
        got = dict(hf.named_parameters())[f"model.layers.{layer}.{hf_name}.weight"].detach()
        ref = w0[f"{name}.weight"] + delta
        if proj in ("wq", "wk"):  # HF's q/k rows are permuted for its rotary layout: compare as sets of rows
            got, ref = got.sort(dim=0).values, ref.sort(dim=0).values
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        assert not torch.allclose(ref, w0[f"{name}.weight"])
