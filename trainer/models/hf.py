"""Hugging Face interop: Plait `Llama` <-> transformers `LlamaForCausalLM` configs and state dicts.

Both sides use the same "rotate_half" RoPE layout, so weights convert by renaming keys only (no q/k
permutation, no copies). Works with transformers 4.45+ (`rope_theta`) and 5.x (`rope_parameters`).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from transformers import LlamaConfig

from trainer.config import ModelConfig

# Plait name -> HF name, for the parts of a block ("{}" is the layer index)
_BLOCK_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_TO_HF = {**_TOP_KEYS, **{f"layers.{{}}.{k}": f"model.layers.{{}}.{v}" for k, v in _BLOCK_KEYS.items()}}
_FROM_HF = {v: k for k, v in _TO_HF.items()}
_LAYER = re.compile(r"^((?:model\.)?layers)\.(\d+)\.(.+)$")
# derived buffers that old transformers versions saved; recomputed from the config, so dropped
_HF_DERIVED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _rename(sd: dict[str, Any], table: dict[str, str], side: str) -> dict[str, Any]:
    out, unknown = {}, []
    for key, value in sd.items():
        m = _LAYER.match(key)
        pattern = f"{m.group(1)}.{{}}.{m.group(3)}" if m else key
        if pattern not in table:
            unknown.append(key)
            continue
        out[table[pattern].format(m.group(2)) if m else table[pattern]] = value
    if unknown:
        allowed = ", ".join(sorted(table))
        raise ValueError(f"unknown {side} state-dict key(s): {', '.join(unknown)}; allowed ({{}} = layer): {allowed}")
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plait `Llama` state dict -> `LlamaForCausalLM` state dict (same tensors, renamed keys)."""
    return _rename(sd, _TO_HF, "Plait Llama")


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` state dict -> Plait `Llama` state dict (same tensors, renamed keys).

    A checkpoint with tied embeddings may omit `lm_head.weight`; `output.weight` is then the embedding.
    """
    sd = _rename({k: v for k, v in hf_sd.items() if not _HF_DERIVED.match(k)}, _FROM_HF, "HF LlamaForCausalLM")
    if "output.weight" not in sd and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def _accepts_rope_parameters() -> bool:
    return "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters


def to_hf_config(cfg: ModelConfig) -> LlamaConfig:
    """The `LlamaConfig` of the same architecture (no biases, SiLU, default RoPE)."""
    rope: dict[str, Any] = (
        {"rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}}
        if _accepts_rope_parameters() else {"rope_theta": float(cfg.rope_theta)}
    )
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.dim // cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
        **rope,
    )


def _rope_theta(hf_cfg: LlamaConfig) -> float:
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    scaling = getattr(hf_cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(
            f"HF config uses rope_type={rope_type!r}; Plait's Llama implements only the default RoPE "
            "(ModelConfig has no RoPE-scaling fields)"
        )
    return float(params["rope_theta"] if "rope_theta" in params else hf_cfg.rope_theta)


def from_hf_config(hf_cfg: LlamaConfig, name: str = "llama_hf") -> ModelConfig:
    """The Plait `ModelConfig` of a `LlamaConfig`; ValueError for features the Plait model lacks."""
    bad = {k: getattr(hf_cfg, k, None) for k in ("attention_bias", "mlp_bias") if getattr(hf_cfg, k, False)}
    if hf_cfg.hidden_act != "silu":
        bad["hidden_act"] = hf_cfg.hidden_act
    n_kv = hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    if head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
        bad["head_dim"] = head_dim
    if bad:
        raise ValueError(
            f"HF config not supported by Plait's Llama: {bad}; needs attention_bias=False, mlp_bias=False, "
            "hidden_act='silu', head_dim = hidden_size / num_attention_heads"
        )
    return ModelConfig(
        name=name,
        vocab_size=hf_cfg.vocab_size,
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=n_kv,
        ffn_dim=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        norm_eps=hf_cfg.rms_norm_eps,
        rope_theta=_rope_theta(hf_cfg),
        init_std=hf_cfg.initializer_range,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
    )
