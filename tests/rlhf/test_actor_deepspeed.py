"""rlhf/workers with DeepSpeed ZeRO as the data-parallel backend: one actor update on 2 ZeRO-2 and
ZeRO-3 workers equals one process (weights after the step), and generation runs through the engine."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from rlhf.batch import Batch
from rlhf.config import RLHFOptions
from rlhf.data.prompts import build_vocabulary, prompt_batch
from rlhf.losses import loss_scale
from rlhf.workers import ActorWorker
from rlhf.workers.base import WorkerSpec
from trainer.config import ModelConfig, OptimConfig, ParallelConfig
from trainer.launch.forked import run_ranks

MODEL = ModelConfig(name="llama_ds_actor", vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    max_seq_len=32, init_std=0.2)
# eps = 1: Adam's first step is lr·g/(|g| + 1) ≈ lr·g, so a gradient off by any factor would show
OPTIM = OptimConfig(lr=1e-2, eps=1.0, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=0.0)
ROWS = 8


def one_update(layout: ParallelConfig, world: int) -> dict:
    o = RLHFOptions(max_new_tokens=5, responses_per_micro_batch=2)
    micro = ROWS // layout.dp_shard // o.responses_per_micro_batch
    spec = WorkerSpec(role="actor", rank=int(os.environ.get("RANK", 0)), world_size=world, model=MODEL, layout=layout,
                      optim=OPTIM, options=o, seed=7, device="cpu", master_port=int(os.environ.get("MASTER_PORT", 0)),
                      micro_batches=micro)
    actor = ActorWorker(spec)
    actor.init_model()
    vocab = build_vocabulary(o.prompts)
    b = prompt_batch([{"prompt": f"{i}+{2 * i}=", "answer": ""} for i in range(ROWS)], vocab)
    whole = actor.generate(Batch(b.select("prompts", "prompt_mask").tensors, meta={"iteration": 1, "greedy": True}))
    gen = torch.Generator().manual_seed(0)
    whole = whole.union(Batch({"old_log_probs": whole["log_probs"] + 0.05 * torch.randn(whole["log_probs"].shape, generator=gen),
                               "advantages": torch.randn(whole["log_probs"].shape, generator=gen)}))
    whole.meta["scale"] = dataclasses.asdict(loss_scale(whole["response_mask"], 5))
    dp, rank = actor.info.dp_size, actor.info.dp_rank
    part = whole[rank * ROWS // dp:(rank + 1) * ROWS // dp]
    part.meta["scale"] = whole.meta["scale"]
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    before = {k: full(v).detach().clone() for k, v in actor.components()["model"].state_dict().items()}
    actor.update_actor(part)
    state = {k: full(v).detach() for k, v in actor.components()["model"].state_dict().items()}
    moved = max(float((state[k] - before[k]).abs().max()) for k in state)
    return {"responses": whole["responses"].numpy(), "moved": np.array(moved), **{k: v.numpy() for k, v in state.items()}}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_update_equals_one_process(stage):
    one = one_update(ParallelConfig(), 1)
    two = run_ranks(2, one_update, ParallelConfig(dp_shard=2, dp_backend="deepspeed", zero_stage=stage), 2,
                    init_pg=False)
    assert one["moved"] > 1e-4  # the update really moved the weights
    for r in two:
        np.testing.assert_array_equal(r["responses"], one["responses"])  # generation through the engine
        for k in one:
            if k != "responses":
                np.testing.assert_allclose(r[k], one[k], atol=1e-6, err_msg=k)
