"""HF interop: Plait Llama and transformers' LlamaForCausalLM give the same logits after conversion."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.config import ModelConfig
from trainer.models import build_model
from trainer.models.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict


def hf_config(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                       tie_word_embeddings=tie)


def randomize(model: torch.nn.Module) -> None:
    """Every weight random, norms included, so a swapped key cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() == 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_to_plait_logits_match(tie):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config(tie)).eval()
    randomize(hf)
    cfg = from_hf_config(hf.config)
    assert cfg.tie_embeddings == tie and cfg.rope_theta == 5e5 and cfg.n_kv_heads == 2
    plait = build_model(cfg)
    plait.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    plait.eval()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(plait(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_plait_to_hf_logits_match(tie, tmp_path):
    cfg = ModelConfig(name="llama_test", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=96, max_seq_len=64, rope_theta=5e5, tie_embeddings=tie)
    torch.manual_seed(0)
    plait = build_model(cfg).eval()
    randomize(plait)
    hf = LlamaForCausalLM(to_hf_config(cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(plait.state_dict()), strict=True)
    # through a saved checkpoint too: safetensors drops the tied lm_head, reload restores it
    hf.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = plait(tokens)
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=0, atol=1e-5)


def test_tied_checkpoint_without_lm_head():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config(tie=True))
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by old transformers
    plait_sd = from_hf_state_dict(sd)
    assert plait_sd["output.weight"] is plait_sd["tok_embeddings.weight"]
    build_model(from_hf_config(hf.config)).load_state_dict(plait_sd, strict=True)


def test_config_round_trip():
    cfg = ModelConfig(name="llama_x", vocab_size=320, dim=96, n_layers=3, n_heads=6, n_kv_heads=3,
                      ffn_dim=160, max_seq_len=128, norm_eps=1e-6, rope_theta=5e5, init_std=0.01,
                      tie_embeddings=True)
    hf_cfg = to_hf_config(cfg)
    assert not hf_cfg.attention_bias and not hf_cfg.mlp_bias and hf_cfg.hidden_act == "silu"
    assert from_hf_config(hf_cfg, name="llama_x") == cfg


def test_unknown_keys_are_named():
    sd = build_model(ModelConfig(n_layers=1), device="meta").state_dict()
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wqkv\.weight"):
        to_hf_state_dict({**sd, "layers.0.attention.wqkv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias.*allowed"):
        from_hf_state_dict({"model.layers.0.self_attn.q_proj.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown.*layers\.0\.mlp\.gate_proj\.weight"):
        from_hf_state_dict({"layers.0.mlp.gate_proj.weight": torch.zeros(1)})  # base LlamaModel keys


def test_unsupported_hf_configs_are_refused():
    scaled = hf_config()
    scaled.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    with pytest.raises(ValueError, match="llama3"):
        from_hf_config(scaled)
    biased = hf_config()
    biased.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf_config(biased)
