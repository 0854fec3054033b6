"""Llama's KV cache: cached decoding equals full recomputation, also for left-padded batches."""

import torch

from rlhf.rollout import left_pad
from trainer.config import ModelConfig
from trainer.models import build_model
from trainer.models.llama import KVCache


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name="llama_kv", vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=96, max_seq_len=64, init_std=0.2)
    return build_model(cfg).eval()


@torch.no_grad()
def test_cached_logits_equal_recomputation_each_step():
    model = tiny_model()
    tokens = torch.randint(0, 64, (3, 7))
    cache = KVCache(3, 7 + 8)
    logits = model(tokens, cache=cache)
    torch.testing.assert_close(logits, model(tokens), rtol=0, atol=1e-5)
    for _ in range(8):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat((tokens, nxt), dim=1)
        logits = model(nxt, cache=cache)
        torch.testing.assert_close(logits[:, -1], model(tokens)[:, -1], rtol=0, atol=1e-5)
    assert cache.length == tokens.size(1)


@torch.no_grad()
def test_left_padded_batch_decodes_as_each_prompt_alone():
    model = tiny_model()
    prompts = [[5, 9, 3, 17, 40, 2], [11], [7, 8, 60]]
    tokens, mask = left_pad(prompts)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    steps = 6
    cache = KVCache(len(prompts), tokens.size(1) + steps)
    logits = model(tokens, cache=cache, positions=positions, attention_mask=mask)[:, -1]
    pos, out, step_logits = positions[:, -1:], [], [logits]
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        pos = pos + 1
        logits = model(nxt, cache=cache, positions=pos, attention_mask=torch.ones_like(nxt, dtype=torch.bool))[:, -1]
        step_logits.append(logits)
    batched = torch.cat(out, dim=1)
    for i, p in enumerate(prompts):
        alone = torch.tensor([p])
        for t in range(steps + 1):
            ref = model(alone)[0, -1]
            torch.testing.assert_close(step_logits[t][i], ref, rtol=0, atol=1e-5)
            if t < steps:
                nxt = ref.argmax()
                assert int(nxt) == int(batched[i, t])
                alone = torch.cat((alone, nxt.view(1, 1)), dim=1)


@torch.no_grad()
def test_mask_without_padding_equals_training_forward():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 9))
    full = model(tokens, attention_mask=torch.ones_like(tokens, dtype=torch.bool))
    torch.testing.assert_close(full, model(tokens), rtol=0, atol=1e-5)
