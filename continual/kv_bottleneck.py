"""The Discrete Key-Value Bottleneck (Träuble et al., ICML'23): encoder output z → C heads → each
head's nearest key(s) in its codebook → those keys' values → mean over codebooks = class logits.

Keys are fitted on unlabelled data by EMA k-means (VQ-VAE's update, van den Oord et al. 2017, with
dead-code replacement) and then frozen; only the values are trained. A gradient step therefore
changes only the values of the keys its inputs selected, and inputs routed to other keys keep
their predictions: what makes the bottleneck learn a stream of classes without forgetting,
without task boundaries and without replay. Train the values with plain SGD (no momentum, no
weight decay): either would move values the current batch did not select.

Keys, their EMA statistics, the random projections and the values are buffers and a parameter,
so `state_dict()` carries all of them through the one checkpoint format.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from trainer.errors import ConfigError

SPLITTINGS = ("chunk", "random_projection")


def ema_update(stat: torch.Tensor, observed: torch.Tensor, decay: float) -> torch.Tensor:
    """s ← γ·s + (1 − γ)·x   (in place; returns s)."""
    return stat.mul_(decay).add_(observed, alpha=1.0 - decay)


def nearest_keys(heads: torch.Tensor, keys: torch.Tensor, topk: int = 1) -> torch.Tensor:
    """idx[b, c] = argmin_n ‖h[b, c] − k[c, n]‖²  (the topk nearest, nearest first): [B, C, topk]."""
    dist = torch.cdist(heads.transpose(0, 1), keys)  # [C, B, N]
    return dist.topk(topk, dim=-1, largest=False).indices.transpose(0, 1)  # [B, C, topk]


def codebook_voting_logits(selected_values: torch.Tensor) -> torch.Tensor:
    """logits[b] = (1/C) Σ_c v[b, c]   (the non-parametric decoder: values of dimension = classes)."""
    return selected_values.mean(dim=1)


class KeyValueBottleneck(nn.Module):
    """C codebooks of `key_value_pairs_per_codebook` (key, value) pairs over an encoder output of
    width `dim_embed`. `splitting="chunk"` cuts z into C chunks of dim_embed/C (then `dim_keys`, if
    given, must equal it); `"random_projection"` maps z by C fixed random matrices to `dim_keys`.
    Keys start as draws from N(0, 1) and are fitted by `update_keys` until `freeze_keys`."""

    def __init__(self, dim_embed: int, num_codebooks: int, key_value_pairs_per_codebook: int,
                 dim_values: int, dim_keys: Optional[int] = None, decay: float = 0.95,
                 threshold_ema_dead_code: float = 0.0, topk: int = 1, splitting: str = "chunk",
                 seed: int = 0):
        super().__init__()
        if splitting not in SPLITTINGS:
            raise ConfigError(f"splitting={splitting!r} is not a key-value bottleneck splitting; allowed: {', '.join(SPLITTINGS)}")
        for name, value in (("dim_embed", dim_embed), ("num_codebooks", num_codebooks),
                            ("key_value_pairs_per_codebook", key_value_pairs_per_codebook), ("dim_values", dim_values)):
            if value < 1:
                raise ConfigError(f"{name}={value} is out of range; allowed: an integer ≥ 1")
        if splitting == "chunk":
            if dim_embed % num_codebooks:
                divisors = [d for d in range(1, dim_embed + 1) if dim_embed % d == 0]
                raise ConfigError(
                    f"num_codebooks={num_codebooks} does not divide the encoder's output width {dim_embed} when "
                    f"splitting into chunks; allowed: a divisor of {dim_embed} ({', '.join(map(str, divisors[:12]))}"
                    f"{', ...' if len(divisors) > 12 else ''}), or splitting='random_projection'")
            chunk = dim_embed // num_codebooks
            if dim_keys is not None and dim_keys != chunk:
                raise ConfigError(f"dim_keys={dim_keys} must equal dim_embed/num_codebooks={chunk} when splitting "
                                  f"into chunks; allowed: {chunk}, or splitting='random_projection'")
            dim_keys = chunk
        elif dim_keys is None or dim_keys < 1:
            raise ConfigError(f"dim_keys={dim_keys} is required with splitting='random_projection'; allowed: an integer ≥ 1")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay={decay} is out of range; allowed: a number in [0, 1)")
        if threshold_ema_dead_code < 0:
            raise ConfigError(f"threshold_ema_dead_code={threshold_ema_dead_code} is out of range; allowed: a number ≥ 0")
        if not 1 <= topk <= key_value_pairs_per_codebook:
            raise ConfigError(f"topk={topk} is out of range; allowed: 1..{key_value_pairs_per_codebook} "
                              f"(key_value_pairs_per_codebook)")
        self.dim_embed = dim_embed
        self.num_codebooks = num_codebooks
        self.key_value_pairs_per_codebook = key_value_pairs_per_codebook
        self.dim_keys = dim_keys
        self.dim_values = dim_values
        self.decay = decay
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.topk = topk
        self.splitting = splitting

        g = torch.Generator().manual_seed(seed)
        C, N = num_codebooks, key_value_pairs_per_codebook
        if splitting == "random_projection":
            # fixed, never trained: a Gaussian map that keeps distances in expectation
            self.register_buffer("projection", torch.randn(C, dim_embed, dim_keys, generator=g) / dim_keys ** 0.5)
        else:
            self.register_buffer("projection", None)
        self.register_buffer("keys", torch.randn(C, N, dim_keys, generator=g))
        # EMA k-means statistics: per key, the decayed count of inputs it won and their decayed sum
        self.register_buffer("cluster_size", torch.zeros(C, N))
        self.register_buffer("embed_sum", torch.zeros(C, N, dim_keys))
        self.register_buffer("keys_frozen", torch.tensor(False))
        self.values = nn.Parameter(torch.zeros(C, N, dim_values))

    def split(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, dim_embed] → the C heads [B, C, dim_keys]."""
        if z.dim() != 2 or z.shape[1] != self.dim_embed:
            raise ValueError(f"the bottleneck takes encoder outputs [B, {self.dim_embed}], got {tuple(z.shape)}")
        if self.projection is None:
            return z.reshape(z.shape[0], self.num_codebooks, self.dim_keys)
        return torch.einsum("bd,cdk->bck", z.to(self.projection.dtype), self.projection)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """The selected keys' indices [B, C, topk], nearest first."""
        return nearest_keys(self.split(z).detach(), self.keys, self.topk)

    def retrieve(self, z: torch.Tensor) -> torch.Tensor:
        """Each head's value (the mean over its topk keys' values): [B, C, dim_values]."""
        idx = self.lookup(z)  # [B, C, topk]
        codebook = torch.arange(self.num_codebooks, device=idx.device)[None, :, None]
        return self.values[codebook, idx].mean(dim=2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits [B, dim_values]."""
        return codebook_voting_logits(self.retrieve(z))

    @torch.no_grad()
    def update_keys(self, z: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """One EMA k-means step on a batch of unlabelled encoder outputs, then dead-code replacement:
        a key whose EMA count is below `threshold_ema_dead_code` moves onto a random head vector of
        the batch (keys that never won an input count 0, so a threshold > 0 revives them at once)."""
        if bool(self.keys_frozen):
            raise RuntimeError("the keys are frozen (freeze_keys was called); only the values train now")
        heads = self.split(z).float()  # [B, C, K]
        B, C, N = heads.shape[0], self.num_codebooks, self.key_value_pairs_per_codebook
        won = nearest_keys(heads, self.keys, 1)[..., 0]  # [B, C]
        onehot = torch.zeros(C, N, B, device=heads.device).scatter_(1, won.T.unsqueeze(1), 1.0)  # [C, N, B]
        counts = onehot.sum(-1)  # [C, N]
        sums = onehot @ heads.transpose(0, 1)  # [C, N, K]
        ema_update(self.cluster_size, counts, self.decay)
        ema_update(self.embed_sum, sums, self.decay)
        # k = m / n for the keys that won inputs now; for the others m/n is unchanged in exact
        # arithmetic, so they keep their key (no 0/0 for keys that never won, no decayed underflow)
        hit = counts > 0
        self.keys[hit] = self.embed_sum[hit] / self.cluster_size[hit].unsqueeze(-1)
        dead = self.cluster_size < self.threshold_ema_dead_code
        if dead.any():
            self._replace_dead(dead, heads, generator)

    def _replace_dead(self, dead: torch.Tensor, heads: torch.Tensor, generator: Optional[torch.Generator]) -> None:
        """Dead key k ← a random head vector of the batch, with the EMA count of one threshold."""
        codebook, key = dead.nonzero(as_tuple=True)
        pick = torch.randint(heads.shape[0], (codebook.numel(),), generator=generator).to(heads.device)
        samples = heads[pick, codebook]
        self.keys[codebook, key] = samples
        self.cluster_size[codebook, key] = self.threshold_ema_dead_code
        self.embed_sum[codebook, key] = samples * self.threshold_ema_dead_code

    def freeze_keys(self) -> None:
        """From here on the keys are fixed; only the values train."""
        self.keys_frozen.fill_(True)

    def extra_repr(self) -> str:
        return (f"dim_embed={self.dim_embed}, num_codebooks={self.num_codebooks}, "
                f"key_value_pairs_per_codebook={self.key_value_pairs_per_codebook}, dim_keys={self.dim_keys}, "
                f"dim_values={self.dim_values}, decay={self.decay}, "
                f"threshold_ema_dead_code={self.threshold_ema_dead_code}, topk={self.topk}, splitting={self.splitting!r}")
