"""Networks of stream-x: LayerNorm without learnable parameters before every LeakyReLU, sparse
initialization; an MLP (2×128 for continuous control, 2×32 for classic control) or a conv torso
(16 3×3 filters → 128, for MinAtar's 10×10×C frames); heads for values, Q-values and policies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from streaming_rl.init import sparse_init_module_


class MLPTorso(nn.Module):
    """(Linear → LayerNorm → LeakyReLU) × layers. The forward calls the functional ops directly:
    with one sample per step, module-call overhead is a visible share of the step."""

    def __init__(self, in_dim: int, hidden: int, layers: int, layer_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_dim if i == 0 else hidden, hidden) for i in range(layers))
        self.layer_norm = layer_norm
        self.shape = (hidden,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.linear(x, layer.weight, layer.bias)
            if self.layer_norm:
                x = F.layer_norm(x, self.shape)
            x = F.leaky_relu(x)
        return x


class ConvTorso(nn.Module):
    """(H, W, C) frames → Conv 3×3 (16) → LayerNorm → LeakyReLU → Linear (hidden) → LayerNorm →
    LeakyReLU. Takes one frame (H, W, C) or a batch (N, H, W, C), as MinAtar gives them."""

    def __init__(self, obs_shape: tuple[int, ...], hidden: int, layer_norm: bool, channels: int = 16):
        super().__init__()
        h, w, c = obs_shape
        self.conv = nn.Conv2d(c, channels, 3)
        self.conv_shape = (channels, h - 2, w - 2)
        self.linear = nn.Linear(math.prod(self.conv_shape), hidden)
        self.layer_norm = layer_norm
        self.shape = (hidden,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 3
        x = (x.unsqueeze(0) if single else x).permute(0, 3, 1, 2)
        x = self.conv(x)
        if self.layer_norm:
            x = F.layer_norm(x, self.conv_shape)
        x = F.linear(F.leaky_relu(x).flatten(1), self.linear.weight, self.linear.bias)
        if self.layer_norm:
            x = F.layer_norm(x, self.shape)
        x = F.leaky_relu(x)
        return x.squeeze(0) if single else x


def torso(obs_shape: tuple[int, ...], hidden: int, layers: int, layer_norm: bool) -> tuple[nn.Module, int]:
    """An MLP for flat observations, the conv torso for images; returns it and its width."""
    if len(obs_shape) == 3:
        return ConvTorso(obs_shape, hidden, layer_norm), hidden
    if len(obs_shape) != 1:
        raise ValueError(f"observations of shape {obs_shape}: only flat vectors and (H, W, C) frames")
    return MLPTorso(obs_shape[0], hidden, layers, layer_norm), hidden


def initialize_(module: nn.Module, init: str, sparsity: float) -> nn.Module:
    """`sparse`: stream-x's sparse init; `default`: PyTorch's own (Kaiming-uniform)."""
    if init == "sparse":
        sparse_init_module_(module, sparsity)
    elif init != "default":
        raise ValueError(f"init={init!r}; allowed: sparse, default")
    return module


class ValueNetwork(nn.Module):
    """v(s) (out=1) or q(s, ·) (out = number of actions): torso + a linear head."""

    def __init__(self, obs_shape: tuple[int, ...], out: int, hidden: int, layers: int = 2,
                 layer_norm: bool = True):
        super().__init__()
        self.torso, width = torso(obs_shape, hidden, layers, layer_norm)
        self.head = nn.Linear(width, out)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return F.linear(self.torso(obs), self.head.weight, self.head.bias)


class GaussianPolicy(nn.Module):
    """π(a|s) = N(μ(s), σ(s)²) per action dimension, σ = softplus(head) (independent dimensions)."""

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, hidden: int, layers: int = 2,
                 layer_norm: bool = True):
        super().__init__()
        self.torso, width = torso(obs_shape, hidden, layers, layer_norm)
        self.mean = nn.Linear(width, action_dim)
        self.pre_std = nn.Linear(width, action_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.torso(obs)
        return (F.linear(h, self.mean.weight, self.mean.bias),
                F.softplus(F.linear(h, self.pre_std.weight, self.pre_std.bias)))


class CategoricalPolicy(nn.Module):
    """π(a|s) = softmax(logits(s)) over discrete actions."""

    def __init__(self, obs_shape: tuple[int, ...], n_actions: int, hidden: int, layers: int = 2,
                 layer_norm: bool = True):
        super().__init__()
        self.torso, width = torso(obs_shape, hidden, layers, layer_norm)
        self.logits = nn.Linear(width, n_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return F.linear(self.torso(obs), self.logits.weight, self.logits.bias)
