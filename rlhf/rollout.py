"""Rollout: batched sampling with a KV cache for the RLHF actor (prefill once, then one token a step).

Prompts of different lengths are left-padded into one batch; positions count from each prompt's
first real token (HF's `position_ids = cumsum(mask) - 1`), so a padded prompt decodes as it would
alone. The per-token log-probs are verl's: log-softmax of the model's logits divided by the
temperature, without top-k / top-p filtering, so the actor's teacher-forced recomputation in
training (`log_softmax(logits / temperature)` gathered at the sampled tokens) reproduces them.

    out = sample(model, [[5, 7, 9], [3]], max_new_tokens=32, temperature=1.0, top_p=0.9, eos_id=2, n=4)
    out["responses"], out["response_mask"], out["log_probs"]   # [B*n, 32], right-padded
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from parallel.tensor import plain_tensor
from rlhf.batch import Batch
from trainer.models.llama import KVCache


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (tokens [B, P], mask [B, P] bool), each prompt aligned to the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = True
    return tokens, mask


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Top-k then nucleus (top-p, Holtzman et al. 2020) filtering: logits outside the k largest, or
    outside the smallest set of most likely tokens whose probability reaches p, become -inf (the
    most likely token always stays)."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass of the tokens strictly more likely already reaches p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class CachedDecoder:
    """One model, one KV cache: `decoder(tokens, positions, mask)` runs the new tokens and returns
    the last position's logits [B, V] (under TP only those are gathered whole from the shards)."""

    def __init__(self, model: nn.Module, rows: int, max_len: int):
        self.model, self.cache = model, KVCache(rows, max_len)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(tokens, cache=self.cache, positions=positions, attention_mask=mask)
        return plain_tensor(out[:, -1:])[:, 0].float()


Decoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def all_done(done: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> bool:
    """Every row finished, here and (with `group`) on every rank of the group."""
    if group is None:
        return bool(done.all())
    pending = (~done).any().to(torch.int32).reshape(1)
    dist.all_reduce(pending, op=dist.ReduceOp.MAX, group=group)
    return not bool(pending.item())


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: Union[Sequence[Sequence[int]], torch.Tensor],
    max_new_tokens: int,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    stop_ids: Sequence[int] = (),
    n: int = 1,
    pad_id: int = 0,
    generator: Optional[torch.Generator] = None,
    decoder: Optional[Callable[[int, int], Decoder]] = None,
    device: Optional[torch.device] = None,
    agree_group: Optional[dist.ProcessGroup] = None,
) -> Batch:
    """Sample `n` responses per prompt (rows i*n .. i*n+n-1 answer prompt i); greedy when
    temperature == 0 (ReMax's baseline; its log-probs are then those of the unscaled logits).

    `prompts` are token lists, or a left-padded tensor [B, P] with `attention_mask` [B, P] (1 real).
    A response ends after `eos_id` or any of `stop_ids` (that token kept, with mask 1) or at
    `max_new_tokens`. Returns a Batch of B*n rows with
      prompts, prompt_mask [B*n, P]                    left-padded
      responses, response_mask, log_probs [B*n, R]     right-padded with pad_id / 0 / 0, R = max_new_tokens
      input_ids, attention_mask, position_ids [B*n, P+R]  prompt + response, for teacher forcing
    and meta {"temperature", "top_k", "top_p"}; log_probs[t] = log_softmax(logits / T)[response[t]].
    `decoder(rows, max_len)` makes what runs the model (default: `CachedDecoder` on `model`;
    rlhf/pipeline_decode.py's through pipeline stages, where `model` is None and `device` is given).
    `agree_group`: ranks whose forward passes communicate (FSDP's gathers) but which hold different
    prompts; decoding stops early only once every one of them is done, so none waits on a peer
    that has stopped.
    """
    if max_new_tokens < 1 or n < 1 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 1, n >= 1, temperature >= 0; got {max_new_tokens}, {n}, {temperature}")
    device = device if device is not None else next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        tokens = prompts.long()
        mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    else:
        tokens, mask = left_pad(prompts, pad_id)
    tokens, mask = tokens.to(device).repeat_interleave(n, dim=0), mask.to(device).repeat_interleave(n, dim=0)
    rows, width = tokens.shape
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted({*stop_ids, *([eos_id] if eos_id is not None else [])}), dtype=torch.long,
                         device=device)

    responses = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(rows, max_new_tokens, dtype=torch.bool, device=device)
    log_probs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)

    run = (decoder or (lambda r, length: CachedDecoder(model, r, length)))(rows, width + max_new_tokens)
    logits = run(tokens, positions, mask)  # prefill: the whole prompt once
    pos = positions[:, -1:]
    for t in range(max_new_tokens):
        scaled = logits / temperature if temperature > 0 else logits
        if temperature > 0:
            probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = scaled.argmax(dim=-1)
        live = ~done
        responses[:, t] = torch.where(live, nxt, pad_id)
        response_mask[:, t] = live
        log_probs[:, t] = torch.where(live, scaled.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1), 0.0)
        done |= live & torch.isin(nxt, stops)
        if t == max_new_tokens - 1 or all_done(done, agree_group):
            break
        pos = pos + 1
        # finished rows keep decoding padding: their outputs are masked, and it keeps the batch whole
        logits = run(responses[:, t:t + 1], pos, torch.ones_like(pos, dtype=torch.bool))

    response_pos = positions[:, -1:] + 1 + torch.arange(max_new_tokens, device=device)
    return Batch({
        "prompts": tokens, "prompt_mask": mask,
        "responses": responses, "response_mask": response_mask, "log_probs": log_probs,
        "input_ids": torch.cat((tokens, responses), dim=1),
        "attention_mask": torch.cat((mask, response_mask), dim=1),
        "position_ids": torch.cat((positions, response_pos), dim=1),
    }, meta={"temperature": temperature, "top_k": top_k, "top_p": top_p})
