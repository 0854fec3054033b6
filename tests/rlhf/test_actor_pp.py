"""rlhf/workers under pipeline parallelism (pp=2, and pp=2 × tp=2): greedy generation through the
stages, log-probs, values and the policy gradient equal one process with the same weights."""

import os

import numpy as np
import pytest
import torch

from rlhf.batch import Batch
from rlhf.config import RLHFOptions
from rlhf.data.prompts import build_vocabulary, prompt_batch
from rlhf.losses import loss_scale
from rlhf.workers import ActorWorker, CriticWorker
from rlhf.workers.actor import policy_gradients
from rlhf.workers.base import WorkerSpec
from rlhf.workers.critic import value_config
from trainer.config import ModelConfig, OptimConfig, ParallelConfig
from trainer.launch.forked import run_ranks

MODEL = ModelConfig(name="llama_pp_actor", vocab_size=32, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    max_seq_len=32, init_std=0.2)


def worker(cls, layout: ParallelConfig, world: int, model=MODEL):
    spec = WorkerSpec(role="actor", rank=int(os.environ.get("RANK", 0)), world_size=world, model=model, layout=layout,
                      optim=OptimConfig(), options=RLHFOptions(max_new_tokens=5, responses_per_micro_batch=4),
                      seed=7, device="cpu", master_port=int(os.environ.get("MASTER_PORT", 0)))
    w = cls(spec)
    w.init_model()
    return w


def prompts() -> Batch:
    vocab = build_vocabulary(RLHFOptions().prompts)
    b = prompt_batch([{"prompt": p, "answer": ""} for p in ("1+2=", "33+4=", "5=", "12+34=", "9+9=")], vocab)
    return Batch(b.select("prompts", "prompt_mask").tensors, meta={"iteration": 3, "greedy": True})


def everything(layout: ParallelConfig, world: int) -> dict:
    actor = worker(ActorWorker, layout, world)
    out = actor.generate(prompts())
    lp = actor.compute_log_prob(out)
    result = {"responses": out["responses"].numpy(), "mask": out["response_mask"].numpy()}
    if "old_log_probs" in lp:
        result["old_log_probs"] = lp["old_log_probs"].numpy()
    gen = torch.Generator().manual_seed(0)
    batch = out.union(Batch({"old_log_probs": out["log_probs"] + 0.05 * torch.randn(out["log_probs"].shape, generator=gen),
                             "advantages": torch.randn(out["log_probs"].shape, generator=gen)}))
    actor.set_train(True)
    policy_gradients(lambda t, p, fn: actor.run_objective(t, p, fn, train=True), batch, actor.spec.options,
                     loss_scale(batch["response_mask"], 5), actor.info.dp_size)
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731
    result["grads"] = {n: full(p.grad).numpy() for part in actor.parts for n, p in part.named_parameters()
                       if p.grad is not None}
    critic = worker(CriticWorker, layout, world, value_config(MODEL))
    values = critic.compute_values(out)
    if "values" in values:
        result["values"] = values["values"].numpy()
    return result


@pytest.mark.parametrize("layout, world", [(ParallelConfig(pp=2, microbatches=2), 2),
                                           (ParallelConfig(pp=2, tp=2, microbatches=2), 4)],
                         ids=["pp2", "pp2xtp2"])
def test_pipeline_layout_equals_one_process(layout, world):
    one = everything(ParallelConfig(), 1)
    ranks = run_ranks(world, everything, layout, world, init_pg=False)
    m = one["mask"]
    for r in ranks:  # every rank of the pipeline sampled the same tokens
        np.testing.assert_array_equal(r["responses"], one["responses"])
    last = [r for r in ranks if "old_log_probs" in r]
    assert last, "no rank returned log-probs (the last stage's collector should)"
    for r in last:
        np.testing.assert_allclose(r["old_log_probs"][m], one["old_log_probs"][m], atol=1e-5)
        np.testing.assert_allclose(r["values"][m], one["values"][m], atol=1e-5)
    grads = {}
    for r in ranks:
        grads.update(r["grads"])
    assert grads.keys() == one["grads"].keys()
    for name, g in one["grads"].items():
        np.testing.assert_allclose(grads[name], g, atol=1e-6, err_msg=name)
