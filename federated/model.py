"""The model a client fine-tunes: a Plait Llama, or the same network as a Hugging Face
`LlamaForCausalLM` (`task.base=hf`; both built from `model.*` and the seed with the same weights, no
download), with the round's base delta folded in, its frozen base weight-only quantized with
optimum-quanto (int8 or int4; bits=32 leaves it in float), and peft LoRA on the planned modules at
the client's ranks.

The task reads the logits at the last position restricted to the label tokens (federated/data.py).
Module names here are the plain model's (`layers.0.attention.wq`, or HF's
`model.layers.0.self_attn.q_proj`); peft's carry `base_model.model.`.
"""

from __future__ import annotations

import json
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from federated.lora import Adapters, LoraPair, from_peft, load_into_peft
from trainer.config import ModelConfig
from trainer.errors import ConfigError

PEFT_PREFIX = "base_model.model."
HEADS = ("output", "lm_head")  # the LM head (Plait's, HF's): never quantized, never adapted
# task.target_modules may name Plait's or HF's projections either way
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
            "w3": "up_proj"}
_BASES: dict[str, dict[str, Tensor]] = {}  # (config, seed) → initial weights, built once per process


def base_weights(cfg: ModelConfig, seed: int, pretrain=None) -> dict[str, Tensor]:
    """W0 (Plait's names), the same in every process: the initial weights of `cfg` under `seed`, or
    with `pretrain` (a federated.pretrain.Pretraining, `task.base_pretrain_steps`) those after it."""
    from dataclasses import asdict

    from trainer.models import build_model

    key = json.dumps([asdict(cfg), seed, asdict(pretrain) if pretrain else None], sort_keys=True)
    if key not in _BASES:
        if pretrain is None:
            _BASES[key] = {k: v.detach().clone() for k, v in build_model(cfg, seed=seed).state_dict().items()}
        else:
            from federated.pretrain import pretrained_weights

            _BASES[key] = pretrained_weights(cfg, seed, pretrain)
    return _BASES[key]


def build_base(cfg: ModelConfig, seed: int, base_delta: Optional[Mapping[str, Tensor]] = None,
               kind: str = "plait", pretrain=None) -> nn.Module:
    """W0 + ΔW_base (module name → delta of its weight), in float32; kind: plait | hf (LlamaForCausalLM)."""
    if kind == "hf":
        from transformers import LlamaForCausalLM

        from trainer.models.hf import to_hf_config, to_hf_state_dict

        with torch.device("meta"):
            model = LlamaForCausalLM(to_hf_config(cfg))
        model.to_empty(device="cpu")
        missing, _ = model.load_state_dict(to_hf_state_dict(base_weights(cfg, seed, pretrain)), strict=False)
        model.model.rotary_emb.__init__(model.config)  # its inv_freq buffer is not in any state dict
        if [k for k in missing if "rotary" not in k]:
            raise ValueError(f"the HF model has weights the Plait one lacks: {missing[:5]}")
    elif kind == "plait":
        from trainer.models import build_model

        model = build_model(cfg, device="meta")
        model.to_empty(device="cpu")
        model.load_state_dict(base_weights(cfg, seed, pretrain), strict=False)
        model.init_buffers()
    else:
        raise ConfigError(f"task.base={kind!r} is not allowed; choose one of: plait, hf")
    if base_delta:
        fold(model, base_delta)
    return model


@torch.no_grad()
def fold(model: nn.Module, deltas: Mapping[str, Tensor]) -> None:
    """W ← W + ΔW for each named Linear of a plain model."""
    modules = dict(model.named_modules())
    for name, delta in deltas.items():
        if name not in modules or not isinstance(modules[name], nn.Linear):
            raise ValueError(f"no Linear named {name} to fold a delta into")
        modules[name].weight.add_(delta.to(modules[name].weight.dtype))


def adaptable_modules(model: nn.Module) -> list[str]:
    """Every Linear but the head, in model order: what the planner may adapt."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in HEADS]


def weight_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of every adaptable Linear."""
    mods = dict(model.named_modules())
    return {n: tuple(mods[n].weight.shape) for n in adaptable_modules(model)}


def select(model: nn.Module, suffixes: list[str]) -> list[str]:
    """The adaptable modules whose name ends with one of `suffixes` (`task.target_modules`)."""
    wanted = set(suffixes) | {HF_NAMES[s] for s in suffixes if s in HF_NAMES} | \
        {k for k, v in HF_NAMES.items() if v in suffixes}
    names = [n for n in adaptable_modules(model) if any(n == s or n.endswith("." + s) for s in wanted)]
    if not names:
        raise ConfigError(f"task.target_modules={suffixes} matches no Linear of the model; its modules end in: "
                          f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in adaptable_modules(model)}))}")
    return names


def quantize(model: nn.Module, bits: int) -> nn.Module:
    """Weight-only int8/int4 of every Linear but the head (optimum-quanto), frozen; bits=32: unchanged."""
    if bits == 32:
        return model
    from optimum.quanto import freeze, qint4, qint8, quantize as quanto_quantize

    weights = {8: qint8, 4: qint4}.get(bits)
    if weights is None:
        raise ConfigError(f"quantization bits={bits} is not supported; allowed: 4, 8, 32")
    quanto_quantize(model, weights=weights, exclude=list(HEADS))
    freeze(model)
    return model


def with_lora(model: nn.Module, ranks: Mapping[str, int], alpha_ratio: float) -> nn.Module:
    """peft LoRA on `ranks`' modules, rank r and lora_alpha = ratio·r each (so s = ratio); base frozen."""
    from peft import LoraConfig, get_peft_model

    names = sorted(ranks)
    config = LoraConfig(target_modules=names, r=max(ranks.values()), lora_alpha=alpha_ratio * max(ranks.values()),
                        rank_pattern={n: r for n, r in ranks.items()},
                        alpha_pattern={n: alpha_ratio * r for n, r in ranks.items()},
                        lora_dropout=0.0, bias="none")
    return get_peft_model(model, config)


def client_model(cfg: ModelConfig, seed: int, base_delta: Mapping[str, Tensor], bits: int,
                 adapters: Adapters, alpha_ratio: float, kind: str = "plait", pretrain=None) -> nn.Module:
    """The model a client trains this round: W0 + ΔW_base, quantized, with `adapters` loaded."""
    model = quantize(build_base(cfg, seed, base_delta, kind, pretrain), bits)
    model = with_lora(model, {n: p.rank for n, p in adapters.items()}, alpha_ratio)
    load_into_peft(model, {PEFT_PREFIX + n: p for n, p in adapters.items()})
    return model


def read_adapters(model: nn.Module) -> Adapters:
    """The peft model's adapters under plain module names."""
    return {n[len(PEFT_PREFIX):]: p for n, p in from_peft(model).items()}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{plain name of the factor (`layers.0.attention.wq.A`): parameter}, sorted: the optimizer's order."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            module, factor = name[len(PEFT_PREFIX):].split(".lora_")
            out[f"{module}.{factor.split('.')[0]}"] = p
    return dict(sorted(out.items()))


def logits(model: nn.Module, tokens: Tensor, label_tokens: list[int]) -> Tensor:
    """[B, C]: the last position's logits over the label tokens."""
    out = model(tokens)
    out = getattr(out, "logits", out)  # a Hugging Face model returns a ModelOutput
    return out[:, -1, label_tokens].float()


def loss(model: nn.Module, tokens: Tensor, labels: Tensor, label_tokens: list[int]) -> Tensor:
    """Cross-entropy of the label at the last position."""
    return F.cross_entropy(logits(model, tokens, label_tokens), labels)


@torch.no_grad()
def accuracy(model: nn.Module, tokens: Tensor, labels: Tensor, label_tokens: list[int], batch: int = 256) -> float:
    model.eval()
    right = 0
    for i in range(0, len(tokens), batch):
        right += int((logits(model, tokens[i:i + batch], label_tokens).argmax(-1) == labels[i:i + batch]).sum())
    return right / len(tokens)


def merged(cfg: ModelConfig, seed: int, delta: Mapping[str, Tensor], kind: str = "plait", pretrain=None) -> nn.Module:
    """W0 + ΔW in float32, no adapters: the model the federation exports."""
    return build_base(cfg, seed, delta, kind, pretrain)


def plait_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights under Plait's names (what `plait-ckpt export` reads), from either kind of model."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if any(k.startswith("model.layers.") for k in sd):
        from trainer.models.hf import from_hf_state_dict

        sd = from_hf_state_dict({k: v for k, v in sd.items() if "rotary" not in k})
    return sd


def init_adapters(shapes: Mapping[str, tuple[int, int]], client_ranks: list[Mapping[str, int]],
                  alpha_ratio: float, generator: torch.Generator) -> list[Adapters]:
    """LoRA's start, drawn by the server: A ~ U(±1/√in) (peft's Kaiming-uniform), B = 0, per client.

    Client k's A of a module is the first r_k rows of one draw at the largest rank, so clients at
    the same rank start from the same A (what FFA-LoRA needs)."""
    out: list[Adapters] = [{} for _ in client_ranks]
    for name in sorted(client_ranks[0]):
        out_f, in_f = shapes[name]
        r_max = max(ranks[name] for ranks in client_ranks)
        A = (torch.rand(r_max, in_f, generator=generator) * 2 - 1) / in_f ** 0.5
        for k, ranks in enumerate(client_ranks):
            r = ranks[name]
            out[k][name] = LoraPair(A[:r].clone(), torch.zeros(out_f, r), float(alpha_ratio))
    return out
