"""LoRA adapter algebra for federated fine-tuning: a client's update as per-module factors
(A: [r, in], B: [out, r]) with a scaling s, so that the weight update is ΔW = s·B·A (Hu et al.,
LoRA, 2021; peft's `scaling` is α/r, or α/√r with rsLoRA).

`Adapters` maps a module's name (as `model.named_modules()` spells it, e.g.
`base_model.model.fc1`) to its `LoraPair`. Clients may hold different ranks, per module and per
client. Helpers move adapters in and out of a peft model (`lora_A.<adapter>.weight` /
`lora_B.<adapter>.weight`) and in and out of plain state dicts, and fold a weight delta into the
frozen base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

DEFAULT_ADAPTER = "default"  # peft's adapter name when none is given
# <module>.lora_A[.<adapter>].weight: model.state_dict() keeps the adapter name,
# peft's get_peft_model_state_dict() drops it.
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """One module's adapter: A [r, in], B [out, r], scaling s; ΔW = s·B·A."""

    A: Tensor
    B: Tensor
    scale: float = 1.0

    def __post_init__(self):
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ValueError(f"LoRA factors are matrices; got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"rank mismatch: A is {tuple(self.A.shape)} (r × in), B is "
                             f"{tuple(self.B.shape)} (out × r)")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the shape of the weight it updates."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> Tensor:
        """ΔW = s·B·A  ([out, in])."""
        return self.scale * (self.B @ self.A)

    def absorbed(self) -> "LoraPair":
        """(A, s·B, 1): the same ΔW with the scaling folded into B."""
        return LoraPair(self.A, self.scale * self.B, 1.0)

    def rescaled(self, scale: float) -> "LoraPair":
        """(A, (s/s')·B, s'): the same ΔW under another scaling s'."""
        return LoraPair(self.A, (self.scale / scale) * self.B, float(scale))


Adapters = dict[str, LoraPair]


def deltas(adapters: Mapping[str, LoraPair]) -> dict[str, Tensor]:
    """{module: s·B·A}."""
    return {name: pair.delta() for name, pair in adapters.items()}


def ranks(adapters: Mapping[str, LoraPair]) -> dict[str, int]:
    """{module: r}."""
    return {name: pair.rank for name, pair in adapters.items()}


def payload_bytes(adapters: Mapping[str, LoraPair]) -> int:
    """Σ_m (|A_m| + |B_m|)·bytes per element: what sending the factors costs (r·(in + out) per module)."""
    return sum(p.A.numel() * p.A.element_size() + p.B.numel() * p.B.element_size() for p in adapters.values())


def subtract(new: Mapping[str, LoraPair], old: Mapping[str, LoraPair]) -> Adapters:
    """(A_new − A_old, B_new − B_old) per module: a client's update in factor space (same ranks, same s)."""
    _same_modules(new, old, "subtract")
    out = {}
    for name, n in new.items():
        o = old[name]
        if n.A.shape != o.A.shape or n.B.shape != o.B.shape or n.scale != o.scale:
            raise ValueError(f"module {name}: cannot subtract adapters of rank {o.rank} (s={o.scale}) "
                             f"from rank {n.rank} (s={n.scale})")
        out[name] = LoraPair(n.A - o.A, n.B - o.B, n.scale)
    return out


def add(base: Mapping[str, LoraPair], update: Mapping[str, LoraPair]) -> Adapters:
    """(A + ΔA, B + ΔB) per module: the inverse of `subtract`."""
    _same_modules(base, update, "add")
    return {name: LoraPair(b.A + update[name].A, b.B + update[name].B, b.scale) for name, b in base.items()}


def zero_pad(pair: LoraPair, rank: int) -> LoraPair:
    """A → [A; 0] ([rank, in]), B → [B, 0] ([out, rank]): the same ΔW at a larger rank (HetLoRA)."""
    if rank < pair.rank:
        raise ValueError(f"cannot zero-pad a rank-{pair.rank} adapter down to rank {rank}")
    extra = rank - pair.rank
    A = torch.cat([pair.A, pair.A.new_zeros(extra, pair.A.shape[1])], dim=0)
    B = torch.cat([pair.B, pair.B.new_zeros(pair.B.shape[0], extra)], dim=1)
    return LoraPair(A, B, pair.scale)


def truncate(pair: LoraPair, rank: int) -> LoraPair:
    """A → A[:rank], B → B[:, :rank]: the first `rank` components (HetLoRA's per-client download)."""
    if not 1 <= rank <= pair.rank:
        raise ValueError(f"cannot truncate a rank-{pair.rank} adapter to rank {rank}")
    return LoraPair(pair.A[:rank], pair.B[:, :rank], pair.scale)


def svd_factor(delta: Tensor, rank: int, scale: float = 1.0,
               svd: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> LoraPair:
    """ΔW ≈ s·B·A, B = U_r·√(Σ_r/s), A = √(Σ_r/s)·V_rᵀ: the best rank-r approximation (Eckart–Young).

    `svd`: ΔW's (U, Σ, Vᵀ) when already computed (one SVD, truncated for many clients)."""
    if rank < 1:
        raise ValueError(f"an adapter needs rank >= 1, got {rank}")
    U, S, Vh = svd if svd is not None else torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, S.numel())
    root = torch.sqrt(S[:r] / scale)
    A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
    if r < rank:  # ΔW has fewer components than the client's rank: pad with zeros, keep its shape
        return zero_pad(LoraPair(A, B, scale), rank)
    return LoraPair(A, B, float(scale))


# ---------------------------------------------------------------- plain state dicts


def from_state_dict(state: Mapping[str, Tensor], scale: Union[float, Mapping[str, float]],
                    adapter_name: str = DEFAULT_ADAPTER) -> Adapters:
    """Adapters from `<module>.lora_A[.<adapter>].weight` / `lora_B` keys; other keys are ignored.

    `scale` is one s for every module or {module: s} (a state dict does not hold peft's scaling)."""
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None or (m["adapter"] is not None and m["adapter"] != adapter_name):
            continue
        factors.setdefault(m["module"], {})[m["factor"]] = value
    if not factors:
        raise ValueError(f"no LoRA factors (…lora_A[.{adapter_name}].weight) in a state dict of {len(state)} keys")
    out = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"module {module} has lora_{next(iter(ab))} but no lora_{'B' if 'A' in ab else 'A'}")
        if isinstance(scale, Mapping):
            if module not in scale:
                raise ValueError(f"no scaling given for module {module}; known: {', '.join(sorted(scale))}")
            s = scale[module]
        else:
            s = scale
        out[module] = LoraPair(ab["A"], ab["B"], float(s))
    return out


def to_state_dict(adapters: Mapping[str, LoraPair], adapter_name: Optional[str] = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """{`<module>.lora_A.<adapter>.weight`: A, …lora_B…: B} (adapter_name=None: peft's saved-file keys)."""
    mid = f".{adapter_name}" if adapter_name else ""
    out = {}
    for module, pair in adapters.items():
        out[f"{module}.lora_A{mid}.weight"] = pair.A
        out[f"{module}.lora_B{mid}.weight"] = pair.B
    return out


def scales(adapters: Mapping[str, LoraPair]) -> dict[str, float]:
    """{module: s}: what `to_state_dict` leaves out."""
    return {name: pair.scale for name, pair in adapters.items()}


# ---------------------------------------------------------------- peft models


def lora_modules(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, nn.Module]:
    """{name: peft LoRA layer} of every module that holds adapter `adapter_name`."""
    out = {}
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict) and adapter_name in lora_A:
            if getattr(module, "use_dora", {}).get(adapter_name, False):
                raise ValueError(f"module {name} uses DoRA: its update is not s·B·A; federated LoRA "
                                 f"aggregation needs plain LoRA (use_dora=False)")
            out[name] = module
    return out


def from_peft(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> Adapters:
    """The adapters of a peft model (detached copies), with each module's own scaling."""
    modules = lora_modules(model, adapter_name)
    if not modules:
        raise ValueError(f"the model has no LoRA adapter named {adapter_name!r}")
    return {name: LoraPair(m.lora_A[adapter_name].weight.detach().clone(),
                           m.lora_B[adapter_name].weight.detach().clone(),
                           float(m.scaling[adapter_name]))
            for name, m in modules.items()}


@torch.no_grad()
def load_into_peft(model: nn.Module, adapters: Mapping[str, LoraPair],
                   adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Write A and (s/s_module)·B into each LoRA layer, so that its ΔW equals the pair's."""
    modules = lora_modules(model, adapter_name)
    _same_modules(adapters, modules, "load into the model", "adapters", "model")
    for name, pair in adapters.items():
        m = modules[name]
        A, B = m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight
        if A.shape != pair.A.shape or B.shape != pair.B.shape:
            raise ValueError(f"module {name}: the model's adapter has rank {A.shape[0]} "
                             f"(A {tuple(A.shape)}, B {tuple(B.shape)}), the update has rank "
                             f"{pair.rank} (A {tuple(pair.A.shape)}, B {tuple(pair.B.shape)})")
        A.copy_(pair.A)
        B.copy_(pair.rescaled(float(m.scaling[adapter_name])).B)


@torch.no_grad()
def fold_into_base(model: nn.Module, weight_deltas: Mapping[str, Tensor],
                   adapter_name: str = DEFAULT_ADAPTER) -> None:
    """W_base ← W_base + ΔW in each named LoRA layer's frozen base (a merge with no adapter left)."""
    modules = lora_modules(model, adapter_name)
    missing = sorted(set(weight_deltas) - set(modules))
    if missing:
        raise ValueError(f"no LoRA layer named {', '.join(missing)} to fold a delta into")
    for name, delta in weight_deltas.items():
        weight = modules[name].get_base_layer().weight
        if getattr(modules[name], "fan_in_fan_out", False):  # GPT-2's Conv1D stores W as [in, out]
            delta = delta.T
        if weight.shape != delta.shape:
            raise ValueError(f"module {name}: base weight is {tuple(weight.shape)}, delta is {tuple(delta.shape)}")
        weight.add_(delta.to(weight.dtype))


def _same_modules(left: Mapping, right: Mapping, what: str, left_name: str = "first",
                  right_name: str = "second") -> None:
    only_left, only_right = sorted(set(left) - set(right)), sorted(set(right) - set(left))
    if only_left or only_right:
        raise ValueError(f"cannot {what}: modules only in the {left_name}: {', '.join(only_left) or '-'}; "
                         f"only in the {right_name}: {', '.join(only_right) or '-'}")
