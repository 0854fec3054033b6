"""Llama-style decoder (Llama 3 / torchtitan shape): RMSNorm, RoPE, grouped-query attention, SwiGLU.

RoPE follows Hugging Face's "rotate_half" layout (the two halves of each head are the pairs, not
interleaved neighbours), so `LlamaForCausalLM` weights map 1:1 with no q/k permutation.
Module names are stable for tensor and pipeline parallelism: `layers` is a ModuleDict keyed by the
global layer index, and `tok_embeddings` / `norm` / `output` may be set to None by a pipeline split.
The model declares its own tensor-parallel plan, stage structure and per-parameter initialisation
(parallel/plan.py); parallel/ applies them.

Generation (rlhf/rollout.py) passes a `KVCache` through `forward` with per-token positions and a
key-padding mask, so left-padded prompts of different lengths decode together, one token a step;
without those arguments `forward(tokens)` is the training path, unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

from parallel.plan import StageStructure, TensorParallelPlan
from trainer.config import ModelConfig


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [max_seq_len, head_dim] (Su et al. 2021): angle(t, i) = t * theta^(-2i/head_dim), halves repeated."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by position: x*cos + rotate_half(x)*sin, computed in float32; cos/sin
    are [T, D] (positions 0..T-1, shared) or [B, T, D] (each token's own position)."""
    if cos.dim() == 3:
        cos, sin = cos[:, :, None, :].float(), sin[:, :, None, :].float()
    else:
        cos, sin = cos[None, :, None, :].float(), sin[None, :, None, :].float()
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


class KVCache:
    """Every layer's keys and values for a batch of sequences, preallocated to `max_len` tokens, with
    which cached keys are real tokens (False at left padding). It holds the heads the layer computes,
    so under tensor parallelism each rank caches its local kv heads only.

    `Llama.forward(tokens, cache=...)` appends the new tokens' keys/values at `length` and then
    advances it: prefill once with the prompt, then one token per step."""

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0
        self.keys: dict[str, torch.Tensor] = {}  # layer id -> [B, H_kv_local, max_len, D]
        self.values: dict[str, torch.Tensor] = {}
        self.key_mask: Optional[torch.Tensor] = None  # [B, max_len] bool

    def update(self, layer_id: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] after the cached tokens; return this layer's keys/values so far."""
        end = self.length + k.size(2)
        if layer_id not in self.keys:  # allocated on first use: the local head count and dtype are known here
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.keys[layer_id] = k.new_zeros(shape)
            self.values[layer_id] = v.new_zeros(shape)
        self.keys[layer_id][:, :, self.length:end] = k
        self.values[layer_id][:, :, self.length:end] = v
        return self.keys[layer_id][:, :, :end], self.values[layer_id][:, :, :end]

    def extend_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Record the new tokens' padding mask [B, T]; return the mask of all keys so far [B, length + T]."""
        end = self.length + attention_mask.size(1)
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} tokens; {end} requested")
        if self.key_mask is None:
            self.key_mask = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=attention_mask.device)
        self.key_mask[:, self.length:end] = attention_mask.bool()
        return self.key_mask[:, :end]

    def advance(self, n: int) -> None:
        self.length += n


def decode_mask(key_mask: torch.Tensor, n_queries: int) -> torch.Tensor:
    """SDPA's boolean mask [B, 1, T, S] for the last T = n_queries of S tokens: causal, and only real
    keys; every token also sees itself, so a padding query's row is never empty (no NaN in its
    output, which later layers would read through a zero attention weight)."""
    s = key_mask.size(1)
    q_idx = torch.arange(s - n_queries, s, device=key_mask.device)[:, None]
    k_idx = torch.arange(s, device=key_mask.device)[None, :]
    allowed = (k_idx <= q_idx) & (key_mask[:, None, :] | (k_idx == q_idx))
    return allowed[:, None]


class Attention(nn.Module):
    """Causal grouped-query self-attention; local head counts come from the weight shapes (TP-safe)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[KVCache] = None,
                layer_id: str = "", mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """cos/sin [max_seq_len, D] (training: positions 0..T-1, causal) or [B, T, D] per token with
        `mask` [B, 1, T, S] (generation, keys from `cache` when given)."""
        bs, seqlen, _ = x.shape
        if cos.dim() == 2:
            cos, sin = cos[:seqlen], sin[:seqlen]  # x holds the whole sequence, also under sequence parallelism
        # -1, not n_heads: a column-wise shard of wq/wk/wv holds only its local heads
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rope(xq, cos, sin), apply_rope(xk, cos, sin)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))  # [B, H, T, D]
        if cache is not None:
            xk, xv = cache.update(layer_id, xk, xv)
        n_rep = xq.size(1) // xk.size(1)
        if n_rep > 1:  # query head h reads kv head h // n_rep, as in HF's repeat_kv
            xk, xv = xk.repeat_interleave(n_rep, dim=1), xv.repeat_interleave(n_rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(xq, xk, xv, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer 2020): w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **decode) -> torch.Tensor:
        # `decode` (cache, layer_id, mask) goes as keywords: TP's PrepareModuleInput lays out positional inputs only
        h = x + self.attention(self.attention_norm(x), cos, sin, **decode)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Decoder-only transformer: tokens [B, T] -> logits [B, T, vocab] in the output layer's dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads or (cfg.dim // cfg.n_heads) % 2:
            raise ValueError(
                f"model dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}: dim must divide "
                "into n_heads heads of even size, and n_heads must be a multiple of n_kv_heads"
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.build_head(cfg)
        cos, sin = rope_cos_sin(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # derived, not learned: kept out of the state dict so checkpoints hold weights only
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._tie_weights()

    def build_head(self, cfg: ModelConfig) -> None:
        """The language-model head: logits over the vocabulary (a subclass puts its own head here)."""
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def _tie_weights(self) -> None:
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device, recurse: bool = True) -> "Llama":
        # to_empty makes a new tensor per module and so unties shared parameters: tie them again
        super().to_empty(device=device, recurse=recurse)
        self._tie_weights()
        return self

    # --- what parallel/ asks the model (parallel/plan.py) ---------------------------------------

    stage_structure = StageStructure(blocks="layers", first=("tok_embeddings",), last=("norm", "output"))

    def tp_plan(self, sequence_parallel: bool) -> TensorParallelPlan:
        """Megatron's plan: embedding row-wise (vocabulary), q/k/v and w1/w3 column-wise, wo and w2
        row-wise, output column-wise (vocabulary-sharded logits for `loss_parallel`); norms on a
        sequence shard under sequence parallelism, attention and MLP gathering the sequence first."""
        return TensorParallelPlan(root=self.tp_root_plan(sequence_parallel), block=block_tp_plan(sequence_parallel))

    def tp_root_plan(self, sequence_parallel: bool) -> dict[str, object]:
        between = Shard(1) if sequence_parallel else Replicate()
        root: dict[str, object] = {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
            "output": ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False),
        }
        if sequence_parallel:
            root["norm"] = SequenceParallel()
        return root

    @torch.no_grad()
    def init_param(self, fqn: str, weight: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """One parameter, whole, by its name: norms 1; block outputs (wo, w2) normal(0, init_std /
        sqrt(2 n_layers)) (GPT-2: residual branches add up over depth); the rest normal(0, init_std)."""
        if fqn.endswith("norm.weight"):
            weight.fill_(1.0)
        elif fqn.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            nn.init.normal_(weight, 0.0, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers), generator=generator)
        else:
            nn.init.normal_(weight, 0.0, self.cfg.init_std, generator=generator)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The derived RoPE tables, recomputed where the model now lives."""
        cos, sin = rope_cos_sin(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len,
                                self.cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos, self.rope_sin = cos, sin

    def hidden(self, tokens: torch.Tensor, cache: Optional[KVCache] = None, positions: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, dim] on a pipeline stage without embeddings) ->
        the blocks' output, after the final norm where this model (chunk) has it. See `forward`."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if cache is not None or positions is not None or attention_mask is not None:
            return self._decode_hidden(h, cache, positions, attention_mask)
        seqlen = h.shape[1]
        if seqlen > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {seqlen} exceeds model.max_seq_len={self.rope_cos.shape[0]}")
        # whole tables: attention slices them, since h may hold one sequence shard (sequence parallel)
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.norm(h) if self.norm is not None else h

    def _decode_hidden(self, h: torch.Tensor, cache: Optional[KVCache], positions: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        bs, seqlen = h.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(bs, seqlen, dtype=torch.bool, device=h.device)
        key_mask = cache.extend_mask(attention_mask) if cache is not None else attention_mask.bool()
        if positions is None:  # HF's position_ids: real tokens counted from each row's first one
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seqlen:]
        if int(positions.max()) >= self.rope_cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} exceeds model.max_seq_len={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, T, D]: each token's own angle
        mask = decode_mask(key_mask, seqlen)
        for layer_id, layer in self.layers.items():
            h = layer(h, cos, sin, cache=cache, layer_id=layer_id, mask=mask)
        if cache is not None:
            cache.advance(seqlen)
        return self.norm(h) if self.norm is not None else h

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None, positions: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]; a chunk without the output returns hidden states.

        Training calls `forward(tokens)`: positions 0..T-1, causal attention. Generation may pass a
        `cache` (keys/values of the earlier tokens, appended to), `positions` [B, T] (each token's
        RoPE position; by default counted from each row's first real token) and `attention_mask`
        [B, T] (the new tokens: 1 real, 0 padding; earlier tokens' mask is in the cache)."""
        h = self.hidden(tokens, cache, positions, attention_mask)
        return self.output(h) if self.output is not None else h


def block_tp_plan(sequence_parallel: bool) -> dict[str, object]:
    """One TransformerBlock's plan: two all-reduces per block forward (reduce-scatter + all-gather
    under sequence parallelism)."""
    between = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, object] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=between),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=between),
        "feed_forward.w3": ColwiseParallel(),
    }
    if sequence_parallel:
        plan.update({
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    return plan


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (a tied weight counts once); optionally without the input embedding."""
    total = sum(p.numel() for p in model.parameters())
    emb = getattr(model, "tok_embeddings", None)
    if exclude_embeddings and emb is not None:
        total -= emb.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, 6*N + 12*n_layers*dim*seq_len (PaLM app. B); N = params but the input embedding."""
    head_dim = cfg.dim // cfg.n_heads
    attn = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    block = attn + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    # the output projection is counted even when tied: its matmul runs either way
    n = cfg.n_layers * block + cfg.dim + cfg.dim * cfg.vocab_size
    return 6 * n + 12 * cfg.n_layers * cfg.dim * seq_len


@torch.no_grad()
def generate(
    model: nn.Module,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Autoregressive sampling (greedy when temperature == 0); returns tokens [B, T + max_new_tokens]."""
    max_len = getattr(model, "module", model).cfg.max_seq_len  # DDP keeps the model in .module
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -max_len:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        tokens = torch.cat((tokens, nxt.to(tokens.dtype)), dim=1)
    return tokens
