"""rlhf/workers/actor.py under tensor parallelism: log-probs from vocabulary-parallel logits (no
full-vocabulary gather) and greedy generation equal one process with the same weights."""

import os

import numpy as np

from rlhf.batch import Batch
from rlhf.config import RLHFOptions
from rlhf.data.prompts import build_vocabulary, prompt_batch
from rlhf.workers import ActorWorker
from rlhf.workers.base import WorkerSpec
from trainer.config import ModelConfig, OptimConfig, ParallelConfig
from trainer.launch.forked import run_ranks

MODEL = ModelConfig(name="llama_tp_actor", vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    max_seq_len=32, init_std=0.2)


def actor_outputs(tp: int, world: int) -> dict[str, np.ndarray]:
    spec = WorkerSpec(role="actor", rank=int(os.environ.get("RANK", 0)), world_size=world, model=MODEL,
                      layout=ParallelConfig(tp=tp), optim=OptimConfig(), options=RLHFOptions(max_new_tokens=5),
                      seed=7, device="cpu", master_port=int(os.environ.get("MASTER_PORT", 0)))
    worker = ActorWorker(spec)
    worker.init_model()
    vocab = build_vocabulary(RLHFOptions().prompts)
    b = prompt_batch([{"prompt": p, "answer": ""} for p in ("1+2=", "33+4=", "5=")], vocab)
    prompts = Batch(b.select("prompts", "prompt_mask").tensors, meta={"iteration": 3, "greedy": True})
    out = worker.generate(prompts)
    lp = worker.compute_log_prob(out)
    return {"responses": out["responses"].numpy(), "mask": out["response_mask"].numpy(),
            "old_log_probs": lp["old_log_probs"].numpy(), "entropy": lp["entropy"].numpy()}


def test_tp2_log_probs_and_greedy_tokens_equal_one_process():
    one = actor_outputs(tp=1, world=1)
    two = run_ranks(2, actor_outputs, 2, 2, init_pg=False)
    for rank_out in two:
        np.testing.assert_array_equal(rank_out["responses"], one["responses"])
        m = one["mask"]
        np.testing.assert_allclose(rank_out["old_log_probs"][m], one["old_log_probs"][m], atol=1e-5)
        np.testing.assert_allclose(rank_out["entropy"][m], one["entropy"][m], atol=1e-5)
