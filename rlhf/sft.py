"""Task runner of `task=sft`: supervised fine-tuning on prompt/response pairs, the loss on the
response tokens only, on any parallel layout. Pretraining's composing step (trainer/pretrain.py)
with the pairs as its data; afterwards the held-out exact match of greedy responses is reported."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.config import SFTOptions
from rlhf.data.files import load_rows
from rlhf.data.prompts import build_vocabulary, prompt_batch, prompt_records
from rlhf.pairs import PairBatches, encode_pair, eval_batches, pair_tensors
from rlhf.rollout import sample
from trainer import pretrain
from trainer.config import PlaitConfig
from trainer.data import DataBundle
from trainer.launch.distributed import DistEnv


def pairs_of(o: SFTOptions, split: str, seed: int) -> list[tuple[str, str]]:
    d = o.data
    if d.source == "arithmetic":
        return [(r["prompt"], r["answer"]) for r in prompt_records(d, split, seed, "task.data")]
    rows = load_rows(d.source, {d.prompt_field: "task.data.prompt_field", o.response_field: "task.response_field"},
                     "task.data.source")
    pairs = [(str(r[d.prompt_field]), str(r[o.response_field])) for r in rows]
    cut = max(1, len(pairs) // 20)
    return pairs[:-cut] if split == "train" and len(pairs) > 1 else pairs[-cut:]


def sft_data(cfg: PlaitConfig, env: DistEnv, dp_rank: int, dp_size: int) -> tuple[DataBundle, str, int]:
    o: SFTOptions = cfg.task
    vocab = build_vocabulary(o.data, "task.data.tokenizer")
    encoded = {split: [encode_pair(vocab, p, r, o.max_length) for p, r in pairs_of(o, split, cfg.seed)]
               for split in ("train", "heldout")}
    width = max(len(t) for pairs in encoded.values() for t, _ in pairs)
    train = PairBatches(*pair_tensors(encoded["train"], width, vocab.pad_id),
                        batch_size=cfg.trainer.batch_size // (dp_size * cfg.trainer.grad_accum),
                        dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed)
    val_in, val_tgt = pair_tensors(encoded["heldout"], width, vocab.pad_id)
    bundle = DataBundle(tokenizer=vocab.tokenizer, train=train,
                        val=lambda: eval_batches(val_in, val_tgt, cfg.trainer.batch_size),
                        eos_id=vocab.eos_id, num_tokens=None)
    return bundle, f"pairs {o.data.source}: {len(encoded['train'])} train, {len(encoded['heldout'])} held out", width


@torch.no_grad()
def heldout_exact_match(cfg: PlaitConfig, model: torch.nn.Module, limit: int = 256) -> dict:
    """The share of held-out prompts whose greedy response is exactly the reference (every rank runs it)."""
    o: SFTOptions = cfg.task
    vocab = build_vocabulary(o.data, "task.data.tokenizer")
    pairs = pairs_of(o, "heldout", cfg.seed)[:limit]
    batch = prompt_batch([{"prompt": p, "answer": r} for p, r in pairs], vocab)
    longest = max(len(vocab.tokenizer.encode(r).ids) for _, r in pairs) + 1
    model.eval()
    out = sample(model, batch["prompts"].to(next(model.parameters()).device), longest,
                 attention_mask=batch["prompt_mask"], temperature=0.0, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
    model.train()
    texts = [vocab.decode_response(r[m].tolist()) for r, m in zip(out["responses"].cpu(), out["response_mask"].cpu())]
    hits = sum(t.strip() == r.strip() for t, (_, r) in zip(texts, pairs))
    return {"eval/exact_match": hits / len(pairs)}


def run(cfg: PlaitConfig, env: DistEnv) -> dict:
    def finish(model, data) -> dict:
        result = heldout_exact_match(cfg, model)
        if env.is_main:
            print(f"plait: sft held-out exact match {result['eval/exact_match']:.3f} (greedy)", flush=True)
            (Path(cfg.run_dir) / "sft_eval.json").write_text(f'{{"exact_match": {result["eval/exact_match"]}}}\n')
        return result

    return pretrain.run(cfg, env, data_fn=sft_data, finish=finish)
