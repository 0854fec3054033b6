"""Frozen encoders in front of the Discrete Key-Value Bottleneck, by name (`task.encoder`).

The bottleneck's guarantee (a step changes only the values its inputs selected) needs an encoder
that does not move, so every encoder here is fixed once built:
- `identity`: the raw input (the paper's 2-D toy);
- `random_projection`: z = ReLU(x W), W ~ N(0, 1/d) fixed (a random-features encoder);
- `llama`: a Plait model from trainer/models (a tiny Llama, randomly initialised and frozen) that
  reads each input feature as one token (feature index + quantised level) and mean-pools its
  last hidden states.
No pretrained encoder is packaged offline on this machine (no model hub, no torchvision weights):
the paper's setting (a self-supervised ResNet/ViT on ImageNet) needs one downloaded by the user,
which plugs in as another entry of `ENCODERS`.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.registry import Registry

ENCODERS: Registry[type[nn.Module]] = Registry("encoder", key="task.encoder")


@ENCODERS.register("identity")
class Identity(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, seed: int = 0):
        super().__init__()
        self.dim_out = dim_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@ENCODERS.register("random_projection")
class RandomProjection(nn.Module):
    """z = ReLU(x W),  W ~ N(0, 1/d_in), fixed."""

    def __init__(self, dim_in: int, dim_out: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 7919)
        self.register_buffer("weight", torch.randn(dim_in, dim_out, generator=g) / dim_in ** 0.5)
        self.dim_out = dim_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight)


@ENCODERS.register("llama")
class LlamaEncoder(nn.Module):
    """token_i = i·L + ⌊x_i·(L−1)⌉ (x in [0, 1], L levels); z = mean_i h_i of a frozen tiny Llama."""

    LEVELS = 17

    def __init__(self, dim_in: int, dim_out: int, seed: int = 0):
        super().__init__()
        from trainer.config import ModelConfig
        from trainer.models import build_model

        cfg = ModelConfig(name="llama", vocab_size=dim_in * self.LEVELS, dim=dim_out, n_layers=2, n_heads=4,
                          n_kv_heads=2, ffn_dim=2 * dim_out, max_seq_len=dim_in)
        self.model = build_model(cfg, seed=seed + 104729)
        self.model.requires_grad_(False)
        self.model.eval()
        self.register_buffer("offsets", torch.arange(dim_in) * self.LEVELS)
        self.dim_out = dim_out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x.clamp(0, 1) * (self.LEVELS - 1)).round().long()
        return self.model.hidden(level + self.offsets).mean(dim=1)


def build_encoder(name: str, dim_in: int, dim_out: int, seed: int) -> nn.Module:
    enc = ENCODERS.get(name)(dim_in, dim_out, seed)
    enc.requires_grad_(False)
    return enc
