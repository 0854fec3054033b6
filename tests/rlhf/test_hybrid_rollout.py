"""task.rollout_tp (the 3D-HybridEngine in the actor): the actor trains under tp and generates
under rollout_tp with tp/rollout_tp times the data parallelism; the generation layout's dispatch
splits prompts by its dp rank and gathers back in order; greedy tokens equal one process."""

import functools
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from rlhf.batch import Batch
from rlhf.config import RLHFOptions
from rlhf.data.prompts import build_vocabulary, prompt_batch
from rlhf.dispatch import collect, dispatch
from rlhf.workers import ActorWorker
from rlhf.workers.base import WorkerSpec
from rlhf_harness import metrics, ray_session, rlhf_config, run_in_process  # noqa: F401 (fixture)
from trainer.config import ModelConfig, OptimConfig, ParallelConfig
from trainer.launch.forked import run_ranks

MODEL = ModelConfig(name="llama_hybrid_actor", vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64,
                    max_seq_len=32, init_std=0.2)
PROMPTS = ("1+2=", "33+4=", "5=", "12+34=", "9+9=", "40+2=")


def prompts() -> Batch:
    vocab = build_vocabulary(RLHFOptions().prompts)
    b = prompt_batch([{"prompt": p, "answer": ""} for p in PROMPTS], vocab)
    return Batch(b.select("prompts", "prompt_mask").tensors, meta={"iteration": 2, "greedy": True})


def move_weights(actor) -> None:
    """An elementwise change of every training weight (as an optimizer step would make; the same
    on any sharding), so generation must see the trained weights, not a fresh initialisation."""
    with torch.no_grad():
        for part in actor.parts:
            for p in part.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(0.05 * torch.sign(local))


def generate_as_the_group_would(tp: int, rollout_tp: int, pp: int = 1, dp_shard: int = 1, virtual_stages: int = 1,
                                model: ModelConfig = MODEL, dp_replicate: int = 1, **options) -> dict:
    """Every rank builds the actor; each generates the chunk the generation-mesh dispatch gives it
    (`options`: more task options)."""
    world = tp * pp * dp_shard * dp_replicate
    layout = ParallelConfig(tp=tp, pp=pp, microbatches=pp, dp_shard=dp_shard, dp_replicate=dp_replicate,
                            virtual_stages=virtual_stages, schedule="interleaved_1f1b" if virtual_stages > 1 else "1f1b")
    spec = WorkerSpec(role="actor", rank=int(os.environ.get("RANK", 0)), world_size=world, model=model,
                      layout=layout, optim=OptimConfig(), seed=7, device="cpu",
                      options=RLHFOptions(max_new_tokens=5, rollout_tp=rollout_tp, **options),
                      master_port=int(os.environ.get("MASTER_PORT", 0)))
    actor = ActorWorker(spec)
    reported = actor.init_model()
    move_weights(actor)
    infos = reported["generation"] if isinstance(reported, dict) else reported
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, infos)  # what the driver learns from init_model
    call = dispatch("dp", prompts(), gathered)
    mine = actor.generate(call.inputs[spec.rank])
    outs = [None] * world
    dist.all_gather_object(outs, mine.select("responses"))
    return {"responses": collect("dp", dict(enumerate(outs)), gathered, pad=call.pad)["responses"].numpy(),
            "dp_size": gathered[0].dp_size}


def one_process(model: ModelConfig = MODEL) -> np.ndarray:
    spec = WorkerSpec(role="actor", rank=0, world_size=1, model=model, layout=ParallelConfig(), optim=OptimConfig(),
                      options=RLHFOptions(max_new_tokens=5), seed=7, device="cpu")
    actor = ActorWorker(spec)
    actor.init_model()
    move_weights(actor)
    return actor.generate(prompts())["responses"].numpy()


@pytest.mark.parametrize("tp, rollout_tp, pp, dp_shard", [(2, 1, 1, 1), (4, 2, 1, 1), (4, 1, 1, 1), (2, 2, 2, 1),
                                                         (1, 1, 2, 1), (1, 2, 1, 4)],
                         ids=["tp2-to-1", "tp4-to-2", "tp4-to-1", "pp2xtp2-to-tp2", "pp2-to-tp1", "fsdp4-to-tp2"])
def test_generation_layout_tokens_equal_one_process(tp, rollout_tp, pp, dp_shard):
    ref = one_process()
    world = tp * pp * dp_shard
    for out in run_ranks(world, generate_as_the_group_would, tp, rollout_tp, pp, dp_shard, init_pg=False):
        assert out["dp_size"] == world // rollout_tp  # generation replicas
        np.testing.assert_array_equal(out["responses"], ref)


@pytest.mark.parametrize("tp, rollout_tp", [(2, 1), (2, 2)], ids=["tp2xdp2-to-tp1", "tp2xdp2-to-tp2"])
def test_replicated_actor_generates_as_one_process(tp, rollout_tp):
    """(tp=2, dp_replicate=2: FSDP2's replicas) → (tp_gen, 4/tp_gen replicas), weights copied (FSDP2
    owns the training storage) rather than aliased."""
    ref = one_process()
    run = functools.partial(generate_as_the_group_would, dp_replicate=2)
    for out in run_ranks(2 * tp, run, tp, rollout_tp, init_pg=False):
        assert out["dp_size"] == 2 * tp // rollout_tp
        np.testing.assert_array_equal(out["responses"], ref)


@pytest.mark.parametrize("pp, tp, virtual_stages, rollout_pp, rollout_tp",
                         [(2, 2, 1, 2, 1), (4, 1, 1, 2, 1), (2, 2, 2, 2, 1), (4, 2, 1, 2, 2)],
                         ids=["pp2xtp2-to-pp2", "pp4-to-pp2", "pp2xtp2-interleaved-to-pp2", "pp4xtp2-to-pp2xtp2"])
def test_generation_with_pipeline_stages_equals_one_process(pp, tp, virtual_stages, rollout_pp, rollout_tp):
    """task.rollout_pp: generation stage g decodes the layers of training stages [g·pp/rollout_pp, ...)
    (interleaved: their chunks), stage to stage; pp·tp/(rollout_pp·rollout_tp) times the replicas."""
    model = replace(MODEL, n_layers=4)
    ref = one_process(model)
    world = tp * pp
    run = functools.partial(generate_as_the_group_would, rollout_pp=rollout_pp)
    for out in run_ranks(world, run, tp, rollout_tp, pp, 1, virtual_stages, model, init_pg=False):
        assert out["dp_size"] == world // (rollout_pp * rollout_tp)
        np.testing.assert_array_equal(out["responses"], ref)


@pytest.mark.slow
def test_grpo_with_the_hybrid_engine_on_ray(tmp_path, ray_session):
    common = ["task.algorithm=grpo", "task.actor.tp=2", "task.rollout_tp=1", "checkpoint.every=1"]
    run_in_process(rlhf_config(tmp_path, *common, "task.iterations=2"))
    result = run_in_process(rlhf_config(tmp_path, *common, "task.iterations=3", "checkpoint.resume=latest"))
    rows = metrics(tmp_path)  # resumed into the resident (aliased) training shards
    assert result["iterations"] == 3 and all(rows[i]["logprob_mismatch_max"] < 1e-4 for i in (1, 2, 3))


def test_rollout_tp_that_does_not_divide_is_refused(tmp_path):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="task.rollout_tp=3 must divide task.actor.tp=2"):
        rlhf_config(tmp_path, "task.actor.tp=2", "task.rollout_tp=3")


@pytest.mark.slow
def test_ppo_with_a_pipeline_actor_generating_without_stages_on_ray(tmp_path, ray_session):
    result = run_in_process(rlhf_config(tmp_path, "task.algorithm=ppo", "task.iterations=1", "task.actor.pp=2",
                                        "task.rollout_tp=1"))
    assert result["iterations"] == 1 and metrics(tmp_path)[1]["logprob_mismatch_max"] < 1e-4


@pytest.mark.slow
def test_grpo_generating_with_fewer_pipeline_stages_on_ray(tmp_path, ray_session, capsys):
    """Actor pp=2 × tp=2 → generation pp=2 × tp=1 (two replicas): the sampled log-probs equal the
    training layout's recomputation; the log names both layouts."""
    result = run_in_process(rlhf_config(tmp_path, "task.algorithm=grpo", "task.iterations=1", "task.actor.pp=2",
                                        "task.actor.tp=2", "task.rollout_tp=1", "task.rollout_pp=2"))
    assert result["iterations"] == 1 and metrics(tmp_path)[1]["logprob_mismatch_max"] < 1e-4
    assert "actor trains under pp=2 × tp=2 × dp=1 and generates under pp=2 × tp=1 × dp=2" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["task.actor.pp=2", "task.rollout_pp=2"], "needs task.rollout_tp set"),
    (["task.actor.pp=2", "task.rollout_tp=1", "task.rollout_pp=4"], "must divide task.actor.pp=2"),
    (["task.actor.pp=2", "task.rollout_tp=1", "task.rollout_pp=2", "task.rollout_engine=rlhf.rollout_engine:KVCacheEngine"],
     "generate with task.rollout_pp=1"),
])
def test_bad_rollout_pp_is_refused(tmp_path, overrides, message):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        rlhf_config(tmp_path, *overrides)


@pytest.mark.parametrize("overrides", [["task.actor.tp=2", "task.rollout_tp=1"],
                                       ["task.actor.dp_shard=2", "task.rollout_tp=2", "task.placement=colocate"]])
def test_the_driver_is_one_process_whatever_the_roles_need(tmp_path, overrides):
    """validate_run's world size is the CLI's spawn count: the driver alone (it starts the workers)."""
    from hydra import compose, initialize_config_dir

    from trainer.cli import CONFIG_DIR
    from trainer.config import validate_run

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("plait", overrides=["task=rlhf", f"run_dir={tmp_path}", *overrides])
    assert validate_run(raw, None)[1] == 1
