"""Task runner of `task=rm`: a reward model trained on chosen/rejected pairs with the
Bradley–Terry loss, on any parallel layout (pretraining's composing step, a value head, this loss).

A batch holds the chosen responses of b pairs then their rejected ones: inputs [2b, W] right-padded,
targets [2b] the index of each row's last real token, where the scalar head is read."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.config import RMOptions
from rlhf.data.files import load_rows
from rlhf.data.prompts import build_vocabulary, prompt_records
from rlhf.pairs import PairBatches, encode_pair, eval_batches
from trainer import pretrain
from trainer.config import PlaitConfig
from trainer.data import DataBundle
from trainer.launch.distributed import DistEnv
from parallel.tensor import plain_tensor


def bradley_terry_loss(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """−mean log σ(r_c − r_r), r = the head's value at each row's last token (chosen rows first)."""
    r = plain_tensor(values).float().gather(1, last[:, None]).squeeze(1)
    chosen, rejected = r.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A near miss: the answer with one digit changed."""
    i = rng.randrange(len(answer))
    digit = rng.choice([d for d in "0123456789" if d != answer[i]])
    return answer[:i] + digit + answer[i + 1:]


def triples(o: RMOptions, split: str, seed: int) -> list[tuple[str, str, str]]:
    d = o.data
    if d.source == "arithmetic":  # chosen: the answer; rejected: a near miss
        rng = random.Random(seed + (split == "heldout"))
        return [(r["prompt"], r["answer"], wrong_answer(r["answer"], rng)) for r in prompt_records(d, split, seed, "task.data")]
    fields = {d.prompt_field: "task.data.prompt_field", o.chosen_field: "task.chosen_field",
              o.rejected_field: "task.rejected_field"}
    rows = load_rows(d.source, fields, "task.data.source")
    out = [(str(r[d.prompt_field]), str(r[o.chosen_field]), str(r[o.rejected_field])) for r in rows]
    cut = max(1, len(out) // 20)
    return out[:-cut] if split == "train" and len(out) > 1 else out[-cut:]


def pair_rows(vocab, items: list[tuple[str, str, str]], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """inputs [N, 2, W] (chosen, rejected) right-padded, last-token indices [N, 2]."""
    enc = [[encode_pair(vocab, p, c, max_length)[0], encode_pair(vocab, p, r, max_length)[0]] for p, c, r in items]
    width = max(len(t) for pair in enc for t in pair)
    inputs = torch.full((len(enc), 2, width), vocab.pad_id, dtype=torch.long)
    last = torch.zeros(len(enc), 2, dtype=torch.long)
    for i, pair in enumerate(enc):
        for j, t in enumerate(pair):
            inputs[i, j, :len(t)] = torch.tensor(t)
            last[i, j] = len(t) - 1
    return inputs, last, width


def chosen_then_rejected(inputs: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat((inputs[:, 0], inputs[:, 1])), torch.cat((last[:, 0], last[:, 1]))


def rm_data(cfg: PlaitConfig, env: DistEnv, dp_rank: int, dp_size: int) -> tuple[DataBundle, str, int]:
    o: RMOptions = cfg.task
    vocab = build_vocabulary(o.data, "task.data.tokenizer")
    train_in, train_last, width = pair_rows(vocab, triples(o, "train", cfg.seed), o.max_length)
    val_in, val_last, _ = pair_rows(vocab, triples(o, "heldout", cfg.seed), o.max_length)
    train = PairBatches(train_in, train_last, batch_size=cfg.trainer.batch_size // (dp_size * cfg.trainer.grad_accum),
                        dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed, collate=chosen_then_rejected)
    bundle = DataBundle(tokenizer=vocab.tokenizer, train=train, eos_id=vocab.eos_id, num_tokens=None,
                        val=lambda: eval_batches(val_in, val_last, cfg.trainer.batch_size, chosen_then_rejected))
    return bundle, f"preference pairs {o.data.source}: {len(train_in)} train, {len(val_in)} held out", width


def run(cfg: PlaitConfig, env: DistEnv) -> dict:
    o: RMOptions = cfg.task
    cfg.model.name = "llama_value"  # the trunk of model.*, a scalar head

    @torch.no_grad()
    def finish(model, data) -> dict:
        vocab = build_vocabulary(o.data, "task.data.tokenizer")
        inputs, last, _ = pair_rows(vocab, triples(o, "heldout", cfg.seed), o.max_length)
        x, idx = chosen_then_rejected(inputs, last)
        model.eval()
        r = plain_tensor(model(x.to(next(model.parameters()).device))).float().gather(1, idx[:, None].to(x.device))
        chosen, rejected = r.squeeze(1).chunk(2)
        accuracy = float((chosen > rejected).float().mean())
        if env.is_main:
            print(f"plait: rm held-out pairwise accuracy {accuracy:.3f}", flush=True)
            (Path(cfg.run_dir) / "rm_eval.json").write_text(f'{{"pairwise_accuracy": {accuracy}}}\n')
        return {"eval/pairwise_accuracy": accuracy}

    return pretrain.run(cfg, env, data_fn=rm_data, finish=finish, loss_fn=bradley_terry_loss)
