"""A compact continuous-time attention temporal point process and PromptTPP's retrieval prompt pool
(Xue et al., NeurIPS'23, "Prompt-augmented Temporal Point Process for Streaming Event Sequence").

The base model: events (t_j, k_j) are embedded as e_j = E[k_j] + TE(t_j), TE the sinusoidal
continuous-time encoding of AttNHP / THP (TE(t)_{2i} = sin(t/10000^{2i/d}), TE(t)_{2i+1} = cos(...)),
behind a start token at t = 0; causal multi-head self-attention layers give the history state h_j
after event j, and between events the intensity of type k is THP's (Zuo et al. 2020)
λ_k(t) = softplus(w_k·h_j + a_k (t − t_j) + b_k) for t ∈ (t_j, t_{j+1}]. (AttNHP instead re-attends
with a query at every t; that costs an attention pass per integration point, the reason easy-tpp's
AttNHP ran at ~134 ms/step here. This model keeps AttNHP's encoder and THP's intensity.)

The log-likelihood of a sequence on [0, T]: Σ_j log λ_{k_j}(t_j) − ∫_0^T Σ_k λ_k(t) dt, the integral
by the midpoint rule with `integration_points` nodes per interval (deterministic).

The prompt pool: M keys K_m ∈ R^d and prompts P_m ∈ R^{L×d}. At position j the query is the mean of
the first layer's input (the event embeddings) over the events so far (PromptTPP's "mean of the
input", restricted to the past so that the likelihood stays a proper one, and taken once rather
than per layer); the top-N keys by cosine similarity select their
prompts, whose tokens get the time part TE(τ̂_j), τ̂_j = t_j + mean Δt so far (the estimated next event
time); these N·L tokens are prepended to every attention layer's keys and values at j.
Loss = −LL/events − w·mean_j Σ_{n ≤ N} cos(q_j, K_{m_n}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def temporal_encoding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """TE(t)_{2i} = sin(t / 10000^{2i/d}), TE(t)_{2i+1} = cos(t / 10000^{2i/d})   ([..., d])."""
    i = torch.arange(0, dim, 2, dtype=t.dtype, device=t.device)
    angle = t.unsqueeze(-1) / torch.pow(10000.0, i / dim)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)[..., :dim]


@dataclass
class EventBatch:
    times: torch.Tensor  # [B, L] event times, padded
    types: torch.Tensor  # [B, L] event types, padded with 0
    mask: torch.Tensor  # [B, L] True where an event is
    horizon: float  # every sequence is observed on [0, horizon]

    @staticmethod
    def collate(times: list, types: list, horizon: float) -> "EventBatch":
        L = max(1, max(len(t) for t in times))
        B = len(times)
        tt, kk, mm = torch.zeros(B, L), torch.zeros(B, L, dtype=torch.int64), torch.zeros(B, L, dtype=torch.bool)
        for b, (t, k) in enumerate(zip(times, types)):
            n = len(t)
            tt[b, :n], kk[b, :n], mm[b, :n] = torch.tensor(t, dtype=torch.float32), torch.tensor(k), True
        return EventBatch(tt, kk, mm, horizon)

    @property
    def num_events(self) -> int:
        return int(self.mask.sum())


class PromptPool(nn.Module):
    """M (key, prompt) pairs; `select(query)` → the top-N prompts' indices and cosine similarities."""

    def __init__(self, size: int, top_n: int, length: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 31)
        self.keys = nn.Parameter(torch.rand(size, dim, generator=g) * 2 - 1)
        self.prompts = nn.Parameter((torch.rand(size, length, dim, generator=g) * 2 - 1) * 0.1)
        self.top_n = top_n

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B, T, d] → (indices [B, T, N], similarities [B, T, N]):  cos(q, K_m) for the top N."""
        sim = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T  # [B, T, M]
        top = sim.topk(self.top_n, dim=-1)
        return top.indices, top.values

    def tokens(self, idx: torch.Tensor, time_part: torch.Tensor) -> torch.Tensor:
        """The selected prompts' tokens with the time part added: [B, T, N·L, d]."""
        p = self.prompts[idx]  # [B, T, N, L, d]
        B, T, N, L, d = p.shape
        return (p + time_part[:, :, None, None, :]).reshape(B, T, N * L, d)


class PromptedAttention(nn.Module):
    """Causal multi-head attention whose keys/values at position j are [prompt tokens at j; h_0..h_j]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"tpp_hidden={dim} must divide by tpp_heads={heads}")
        self.heads, self.dh = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, valid: torch.Tensor, prompt: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, d = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)  # [B, H, T, dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)  # [B, H, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        allowed = causal[None, None] & valid[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if prompt is None:
            return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d))
        P = prompt.shape[2]
        pk, pv = self.qkv(prompt)[..., d:].view(B, T, P, 2, self.heads, self.dh).unbind(3)  # [B, T, P, H, dh]
        pscores = torch.einsum("bhtd,btphd->bhtp", q, pk) / math.sqrt(self.dh)
        w = torch.cat([pscores, scores], dim=-1).softmax(-1)
        out = w[..., P:] @ v + torch.einsum("bhtp,btphd->bhtd", w[..., :P], pv)
        return self.out(out.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = PromptedAttention(dim, heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h, valid, prompt):
        h = self.norm1(h + self.attn(h, valid, prompt))
        return self.norm2(h + self.ffn(h))


class AttentionTPP(nn.Module):
    """The base TPP, optionally with a prompt pool (PromptTPP)."""

    def __init__(self, num_types: int, dim: int = 32, layers: int = 2, heads: int = 2,
                 pool: Optional[PromptPool] = None, integration_points: int = 8, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.type_embedding = nn.Embedding(num_types + 1, dim)  # the last row: the start token
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
            self.head = nn.Linear(dim, num_types)  # w_k, b_k
            self.decay = nn.Parameter(torch.zeros(num_types))  # a_k
        self.pool = pool
        self.num_types, self.dim, self.integration_points = num_types, dim, integration_points

    def history(self, batch: EventBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, L+1, d] after the start token and each event; their times [B, L+1]; the prompt
        similarity term (0 without a pool)."""
        B = batch.times.shape[0]
        t = torch.cat([torch.zeros(B, 1), batch.times], 1)
        k = torch.cat([torch.full((B, 1), self.num_types), batch.types], 1)
        valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), batch.mask], 1)
        h = self.type_embedding(k) + temporal_encoding(t, self.dim)
        prompt, sim_term = None, h.new_zeros(())
        if self.pool is not None:
            prompt, sim_term = self._prompt(h, t, valid)
        for block in self.blocks:
            h = block(h, valid, prompt)
        return h, t, sim_term

    def _prompt(self, x, t, valid):
        """The prompt tokens [B, T, N·L, d] at each position and mean_j Σ_n cos(q_j, K_{m_n})."""
        w = valid.float()
        count = w.cumsum(1).clamp(min=1)
        query = (x * w[..., None]).cumsum(1) / count[..., None]  # mean of the input so far
        idx, sim = self.pool.select(query)
        steps = torch.arange(t.shape[1], dtype=t.dtype).clamp(min=1)
        mean_gap = t / steps  # (t_j − t_0)/j, t_0 = 0: the mean Δt so far
        time_part = temporal_encoding(t + mean_gap, self.dim)
        sim_term = (sim.sum(-1) * w).sum() / w.sum()
        return self.pool.tokens(idx, time_part), sim_term

    def intensity(self, h: torch.Tensor, elapsed: torch.Tensor) -> torch.Tensor:
        """λ_k(t_j + s) = softplus(w_k·h_j + a_k s + b_k):  h [..., d], s [..., S] → [..., S, K]."""
        return F.softplus(self.head(h).unsqueeze(-2) + self.decay * elapsed.unsqueeze(-1))

    def log_likelihood(self, batch: EventBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ over the batch of each sequence's log-likelihood on [0, horizon], the similarity term)."""
        h, t, sim_term = self.history(batch)
        B, L = batch.times.shape
        valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), batch.mask], 1)
        # interval j runs from t_j (start token: 0) to t_{j+1}, or to the horizon after the last event
        n = batch.mask.sum(1)
        nxt = torch.cat([batch.times, torch.zeros(B, 1)], 1)
        nxt[torch.arange(B), n] = batch.horizon
        gap = (nxt - t).clamp(min=0) * valid  # [B, L+1]
        S = self.integration_points
        nodes = (torch.arange(S, dtype=t.dtype) + 0.5) / S  # midpoints of S equal parts
        lam = self.intensity(h, gap[..., None] * nodes)  # [B, L+1, S, K]
        integral = (lam.sum(-1).mean(-1) * gap).sum()
        at_event = self.intensity(h[:, :-1], gap[:, :-1, None])[..., 0, :]  # λ(t_{j+1}) from h_j: [B, L, K]
        log_lam = torch.log(at_event.gather(-1, batch.types[..., None]).squeeze(-1) + 1e-9)
        return (log_lam * batch.mask).sum() - integral, sim_term

    @torch.no_grad()
    def predict_next(self, batch: EventBatch, window: float, points: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """For each event of the batch, from the history before it: the expected time and the
        most likely type of the next event, E[t] = ∫ t f(t) dt and argmax_k ∫ λ_k/λ f dt with
        f(t) = λ(t) exp(−∫λ) on (t_{j−1}, t_{j−1} + window] (normalised there), on a grid of `points`."""
        h, t, _ = self.history(batch)
        s = (torch.arange(points, dtype=t.dtype) + 0.5) * (window / points)
        lam = self.intensity(h[:, :-1], s.expand(*h.shape[:1], h.shape[1] - 1, points))  # [B, L, P, K]
        total = lam.sum(-1)
        density = total * torch.exp(-total.cumsum(-1) * (window / points))
        density = density / density.sum(-1, keepdim=True).clamp(min=1e-12)
        when = t[:, :-1] + (density * s).sum(-1)
        kind = ((lam / total[..., None]) * density[..., None]).sum(-2).argmax(-1)
        return when, kind
