"""Llama model: construction, meta init, pipeline/TP contracts, generation, loss, FLOPs, named sizes."""

import copy
import glob
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

import trainer.models as models
from parallel.init import materialize
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.models import (MODELS, Llama, LlamaValue, build_model, cross_entropy_loss, flops_per_token, generate,
                            model_class, num_params, register_model, value_loss)
from trainer.registry import Registry

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "model")


def tiny(**kw) -> ModelConfig:
    base = dict(name="llama_test", vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2,
                ffn_dim=48, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def test_forward_shape_and_causal():
    torch.manual_seed(0)
    model = build_model(tiny())
    tokens = torch.randint(0, 64, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, 64) and logits.dtype == torch.float32
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 64
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


def test_state_dict_holds_weights_only():
    keys = set(build_model(tiny(n_layers=2), device="meta").state_dict())
    assert "rope_cos" not in keys and "rope_sin" not in keys
    assert {"tok_embeddings.weight", "layers.1.attention.wq.weight", "layers.1.feed_forward.w3.weight",
            "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight", "output.weight"} <= keys


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_matches_direct_build(tie):
    cfg = tiny(tie_embeddings=tie)
    direct = build_model(cfg, seed=3)
    meta = build_model(cfg, device="meta")
    assert meta.tok_embeddings.weight.is_meta
    materialize(meta, torch.device("cpu"), seed=3)
    for (k, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), k
    torch.testing.assert_close(meta.rope_cos, direct.rope_cos, rtol=0, atol=0)
    assert (meta.output.weight is meta.tok_embeddings.weight) == tie
    tokens = torch.randint(0, 64, (1, 8))
    assert torch.equal(meta(tokens), direct(tokens))


def test_seed_decides_the_weights():
    a, b, c = build_model(tiny(), seed=1), build_model(tiny(), seed=1), build_model(tiny(), seed=2)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.layers["0"].attention.wq.weight, c.layers["0"].attention.wq.weight)
    torch.manual_seed(5)  # no seed: one draw from the global generator, so manual_seed decides it
    d = build_model(tiny())
    torch.manual_seed(5)
    assert torch.equal(d.output.weight, build_model(tiny()).output.weight)


def test_init_weights_scales_block_outputs():
    cfg = tiny(dim=128, ffn_dim=256, n_layers=8, init_std=0.02)
    model = build_model(cfg, seed=0)
    block = model.layers["0"]
    assert torch.equal(block.attention_norm.weight, torch.ones(128))
    assert math.isclose(block.attention.wq.weight.std().item(), 0.02, rel_tol=0.05)
    assert math.isclose(block.feed_forward.w2.weight.std().item(), 0.02 / math.sqrt(16), rel_tol=0.05)
    # each parameter from its own stream: no two blocks alike
    assert not torch.equal(block.attention.wq.weight, model.layers["1"].attention.wq.weight)


def test_tied_embeddings_share_one_tensor():
    model = build_model(tiny(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    untied = build_model(tiny())
    assert num_params(untied) - num_params(model) == 64 * 32


def test_pipeline_split_composes_to_full_model():
    torch.manual_seed(0)
    full = build_model(tiny())
    first, last = copy.deepcopy(full), copy.deepcopy(full)
    for i in ("2", "3"):
        del first.layers[i]
    first.norm, first.output = None, None
    for i in ("0", "1"):
        del last.layers[i]
    last.tok_embeddings = None
    tokens = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(last(first(tokens)), full(tokens), rtol=0, atol=1e-6)
    assert set(last.state_dict()) >= {"layers.2.attention.wq.weight", "output.weight"}


def test_attention_head_shards_sum_to_full_output():
    """A column-wise shard of wq/wk/wv and the matching row shard of wo run unchanged (TP contract)."""
    torch.manual_seed(0)
    model = build_model(tiny())
    attn = model.layers["0"].attention
    x = torch.randn(2, 8, 32)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    full = attn(x, cos, sin)
    hd, total = 8, torch.zeros_like(full)
    for rank in range(2):  # 2 shards: 2 query heads and 1 kv head each
        shard = copy.deepcopy(attn)
        q, kv = slice(rank * 2 * hd, (rank + 1) * 2 * hd), slice(rank * hd, (rank + 1) * hd)
        shard.wq.weight = torch.nn.Parameter(attn.wq.weight[q])
        shard.wk.weight = torch.nn.Parameter(attn.wk.weight[kv])
        shard.wv.weight = torch.nn.Parameter(attn.wv.weight[kv])
        shard.wo.weight = torch.nn.Parameter(attn.wo.weight[:, q])
        total += shard(x, cos, sin)
    torch.testing.assert_close(total, full, rtol=0, atol=1e-6)


def test_generate_greedy_is_deterministic_and_crops_context():
    torch.manual_seed(0)
    model = build_model(tiny(max_seq_len=16)).eval()
    prompt = torch.randint(0, 64, (2, 8))
    a = generate(model, prompt, max_new_tokens=20, temperature=0)
    b = generate(model, prompt, max_new_tokens=20, temperature=0)
    assert a.shape == (2, 28) and torch.equal(a, b) and torch.equal(a[:, :8], prompt)
    # greedy step = argmax of the last position's logits
    assert torch.equal(a[:, 8], model(prompt)[:, -1].argmax(-1))


class Wrapper(torch.nn.Module):  # stands in for DDP, which keeps the model in .module
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, tokens):
        return self.module(tokens)


def test_generate_through_a_wrapper():
    torch.manual_seed(0)
    model = build_model(tiny(max_seq_len=16)).eval()
    prompt = torch.randint(0, 64, (1, 8))
    assert torch.equal(generate(Wrapper(model), prompt, 10, temperature=0),
                       generate(model, prompt, 10, temperature=0))


def test_generate_sampling_follows_generator_and_top_k():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    prompt = torch.randint(0, 64, (3, 4))
    a = generate(model, prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    one = generate(model, prompt, 1, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(one, generate(model, prompt, 1, temperature=0))


def test_cross_entropy_loss():
    logits = torch.zeros(2, 5, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 16, (2, 5))
    loss = cross_entropy_loss(logits, targets)
    assert loss.dtype == torch.float32 and math.isclose(loss.item(), math.log(16), rel_tol=1e-6)
    logits = torch.randn(1, 3, 16)
    targets = torch.tensor([[1, -100, 2]])
    expected = -(logits[0, 0].log_softmax(-1)[1] + logits[0, 2].log_softmax(-1)[2]) / 2
    torch.testing.assert_close(cross_entropy_loss(logits, targets), expected)


def test_value_loss():
    values, targets = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16), torch.tensor([[0.0, 4.0]])
    loss = value_loss(values, targets)
    assert loss.dtype == torch.float32 and loss.item() == (1 + 4) / 2


def test_flops_per_token_hand_count():
    cfg = tiny()  # dim 32, 4 heads of 8, 2 kv heads, ffn 48, vocab 64, 4 layers
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32  # wq, wk+wv, wo
    block = attn + 3 * 32 * 48 + 2 * 32  # + SwiGLU + two norms
    n = 4 * block + 32 + 32 * 64  # + final norm + output
    assert flops_per_token(cfg, 16) == 6 * n + 12 * 4 * 32 * 16
    assert n == num_params(build_model(cfg, device="meta"), exclude_embeddings=True)
    # tied: the output matmul still runs, so the count is unchanged
    assert flops_per_token(tiny(tie_embeddings=True), 16) == flops_per_token(cfg, 16)


def test_registry(monkeypatch):
    assert MODELS["llama"] is Llama and MODELS["llama_value"] is LlamaValue
    assert model_class("llama_1b") is Llama and model_class("llama") is Llama
    assert model_class("llama_value_1b") is LlamaValue  # the longest registered prefix wins
    with pytest.raises(ConfigError, match=r"model\.name='gpt_small'.*allowed: llama, llama_value"):
        build_model(tiny(name="gpt_small"))
    fresh = Registry("model", key="model.name")
    for name, cls in MODELS.items():
        fresh.add(name, cls)
    monkeypatch.setattr(models, "MODELS", fresh)

    @register_model("llama_moe")
    class Moe(Llama):
        pass

    assert model_class("llama_moe_tiny") is Moe and model_class("llama_tiny") is Llama
    with pytest.raises(ValueError, match="already registered"):
        register_model("llama")(Moe)


def test_value_head_model():
    model = build_model(tiny(name="llama_value_tiny"), seed=0)
    assert isinstance(model, LlamaValue) and model.value_head.weight.shape == (1, 32)
    assert not hasattr(model, "output") and model.stage_structure.last == ("norm", "value_head")
    tokens = torch.randint(0, 64, (2, 10))
    values = model(tokens)
    assert values.shape == (2, 10)
    # the trunk is the language model's, weight for weight under the same seed
    lm = build_model(tiny(), seed=0)
    assert torch.equal(lm.layers["3"].feed_forward.w2.weight, model.layers["3"].feed_forward.w2.weight)
    torch.testing.assert_close(values, model.value_head(lm.hidden(tokens)).squeeze(-1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tie_embeddings"):
        build_model(tiny(name="llama_value", tie_embeddings=True))


EXPECTED_PARAMS = {
    "llama_arith": 188_992,  # the RLHF demo's
    "llama_tiny": 1_262_720,
    "llama_small": 26_089_984,
    "llama_125m": 124_668_672,
    "llama_1b": 1_235_814_400,  # = HF Llama-3.2-1B
    "llama_3b": 3_212_749_824,  # = HF Llama-3.2-3B
    "llama_8b": 8_030_261_248,  # = HF Meta-Llama-3-8B
}


def load_named(name: str) -> ModelConfig:
    raw = OmegaConf.load(os.path.join(CONFIG_DIR, f"{name}.yaml"))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def test_named_sizes():
    names = sorted(os.path.basename(f)[:-5] for f in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
    assert names == sorted(EXPECTED_PARAMS)
    for name, count in EXPECTED_PARAMS.items():
        cfg = load_named(name)
        assert cfg.name == name
        assert num_params(build_model(cfg, device="meta")) == count, name
    assert load_named("llama_tiny") == ModelConfig()  # the schema defaults
