"""task.rollout_engine (rlhf/rollout_engine.py): an engine of its own network, loaded only through
the interface (`actor.generation_weights()`), as vLLM would be, generates what Plait's KV-cache
engine generates: greedy tokens on one process, under FSDP and through the 3D-HybridEngine, and a
whole GRPO run, bit for bit (new weights reach it every iteration). Bad names are refused."""

import functools
import os

import numpy as np
import pytest

from rlhf.config import RLHFOptions
from rlhf.rollout import sample
from rlhf.rollout_engine import RolloutEngine
from rlhf.workers import ActorWorker
from rlhf.workers.base import WorkerSpec
from rlhf_harness import metrics, rlhf_config, run_in_process
from rlhf.batch import Batch
from test_hybrid_rollout import MODEL, PROMPTS, generate_as_the_group_would, move_weights, one_process, prompts
from trainer.config import ConfigError, OptimConfig, ParallelConfig
from trainer.launch.forked import run_ranks
from trainer.models import build_model

ENGINE = "test_rollout_engine:CopyEngine"


class CopyEngine(RolloutEngine):
    """Its own full network per rank, refilled from the actor's generation weights each rollout."""

    def load_weights(self) -> None:
        self.model = build_model(self.actor.spec.model, device="cpu")
        with self.actor.generation_weights() as weights:
            self.model.load_state_dict(dict(weights))
        self.model.requires_grad_(False)

    def generate(self, prompts, prompt_mask, params, generator):
        return sample(self.model, prompts, params.max_new_tokens, attention_mask=prompt_mask,
                      temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, eos_id=params.eos_id,
                      pad_id=params.pad_id, generator=generator)

    def release(self) -> None:
        self.model = None


def test_an_engine_of_its_own_generates_what_plaits_does_on_one_process():
    spec = WorkerSpec(role="actor", rank=0, world_size=1, model=MODEL, layout=ParallelConfig(), optim=OptimConfig(),
                      options=RLHFOptions(max_new_tokens=5, rollout_engine=ENGINE), seed=7, device="cpu")
    actor = ActorWorker(spec)
    actor.init_model()
    move_weights(actor)
    out = actor.generate(prompts())["responses"].numpy()
    np.testing.assert_array_equal(out, one_process())
    assert actor.rollout_engine().model is None  # released


@pytest.mark.parametrize("tp, rollout_tp, pp, dp_shard", [(2, 1, 1, 1), (1, 0, 1, 2), (1, 1, 2, 1), (1, 1, 1, 2)],
                         ids=["tp2-to-1", "fsdp2-full-weights", "pp2-to-tp1", "fsdp2-to-tp1"])
def test_weights_reach_an_external_engine_from_sharded_layouts(tp, rollout_tp, pp, dp_shard):
    """Generation without tensor parallelism: every rank's weights are whole (under rollout_tp > 1
    they are its generation tensor shard, which a tensor-parallel engine loads)."""
    ref = one_process()
    external = functools.partial(generate_as_the_group_would, rollout_engine=ENGINE)
    for out in run_ranks(tp * pp * dp_shard, external, tp, rollout_tp, pp, dp_shard, init_pg=False):
        np.testing.assert_array_equal(out["responses"], ref)


@pytest.mark.slow
def test_grpo_with_an_external_engine_equals_plaits_engine(tmp_path):
    common = ["task.algorithm=grpo", "task.backend=local", "task.iterations=3"]
    run_in_process(rlhf_config(tmp_path / "plait", *common))
    run_in_process(rlhf_config(tmp_path / "external", *common, f"task.rollout_engine={ENGINE}"))
    assert metrics(tmp_path / "plait") == metrics(tmp_path / "external")


@pytest.mark.parametrize("overrides, words", [
    (["task.rollout_engine=nope"], "allowed: plait"),
    (["task.rollout_engine=os:path"], "not a subclass"),
    (["task.rollout_engine=no_such_module:Engine"], "cannot be imported"),
    ([f"task.rollout_engine={ENGINE}", "task.actor.pp=2"], "set task.rollout_tp"),
])
def test_an_engine_that_cannot_run_is_refused_naming_what_is_allowed(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        rlhf_config(tmp_path, *overrides)


def fsdp_generate(eos_id: int, rows: list[list[str]]) -> dict:
    """FSDP over 2 ranks, generating in the training layout; rank r gets prompts rows[r]."""
    from rlhf.data.prompts import build_vocabulary, prompt_batch

    rank = int(os.environ["RANK"])
    spec = WorkerSpec(role="actor", rank=rank, world_size=2, model=MODEL, layout=ParallelConfig(dp_shard=2),
                      optim=OptimConfig(), options=RLHFOptions(max_new_tokens=5), seed=7, device="cpu", eos_id=eos_id,
                      master_port=int(os.environ["MASTER_PORT"]))
    actor = ActorWorker(spec)
    actor.init_model()
    move_weights(actor)
    vocab = build_vocabulary(RLHFOptions().prompts)
    b = prompt_batch([{"prompt": p, "answer": ""} for p in rows[rank]], vocab)
    out = actor.generate(Batch(b.select("prompts", "prompt_mask").tensors, meta={"iteration": 2, "greedy": True}))
    return {"responses": out["responses"].numpy(), "mask": out["response_mask"].numpy()}


def test_ranks_that_finish_early_keep_decoding_while_their_fsdp_peers_need_them():
    """Rank 0's prompt ends at its first token (made the end token); rank 1's runs on. Stopping
    rank 0 early would leave rank 1 waiting in FSDP's gather forever."""
    first = one_process()[:, 0]
    pairs = [(a, b) for a in range(len(PROMPTS)) for b in range(len(PROMPTS)) if first[a] not in one_process()[b]]
    a, b = pairs[0]
    eos = int(first[a])
    outs = run_ranks(2, fsdp_generate, eos, [[PROMPTS[a]], [PROMPTS[b]]], init_pg=False, timeout=120)
    assert outs[0]["mask"].sum() == 1 and outs[1]["mask"].sum() == 5  # one ended at once, the other ran on
    np.testing.assert_array_equal(outs[1]["responses"], one_process()[b:b + 1])
