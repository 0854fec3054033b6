"""rlhf/groups: registered methods bound on a worker group, futures across groups, and failures
that name the role and rank with the worker's own traceback, leaving no process behind."""

import time

import psutil
import pytest
import torch

from rlhf.batch import Batch
from rlhf.config import RLHFOptions
from rlhf.data.prompts import build_vocabulary, prompt_batch
from rlhf.groups.base import WorkerFailure
from rlhf.groups.local import LocalWorkerGroup
from rlhf.workers import ActorWorker, ReferenceWorker
from rlhf.workers.actor import TEACHER_FORCED
from rlhf.workers.base import WorkerSpec
from rlhf_harness import ray_session  # noqa: F401 (fixture)
from trainer.config import ModelConfig, OptimConfig, ParallelConfig

MODEL = ModelConfig(name="llama_groups", vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    max_seq_len=32)


def spec(role: str, **layout) -> WorkerSpec:
    par = ParallelConfig(**layout)
    world = par.dp_shard * par.dp_replicate * par.tp
    return WorkerSpec(role=role, rank=0, world_size=world, model=MODEL, layout=par, optim=OptimConfig(),
                      options=RLHFOptions(max_new_tokens=4), seed=0, device="cpu")


def prompts(n: int = 6) -> Batch:
    vocab = build_vocabulary(RLHFOptions().prompts)
    b = prompt_batch([{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(n)], vocab)
    return Batch(b.select("prompts", "prompt_mask").tensors, meta={"iteration": 1})


def test_local_group_binds_the_registered_methods():
    group = LocalWorkerGroup("actor", ActorWorker, spec("actor")).start()
    out = group.generate(prompts())
    assert out["responses"].shape == (6, 4)
    lp = group.compute_log_prob(out.select(*TEACHER_FORCED))
    assert torch.allclose(lp["old_log_probs"][out["response_mask"]], out["log_probs"][out["response_mask"]], atol=1e-5)
    # a future is accepted wherever its value is: it is waited for first
    chained = group.compute_log_prob(group.generate.future(prompts()))
    torch.testing.assert_close(chained["old_log_probs"], lp["old_log_probs"], rtol=0, atol=0)
    with pytest.raises(AttributeError, match="registered"):
        group.not_a_method


def test_ray_group_splits_by_dp_rank_pads_and_passes_futures(ray_session):
    from rlhf.groups.ray_group import RayWorkerGroup

    actor = RayWorkerGroup("actor", ActorWorker, spec("actor", dp_shard=2), num_cpus=0.5).start()
    reference = RayWorkerGroup("reference", ReferenceWorker, spec("reference"), num_cpus=0.5).start()
    try:
        assert [i.dp_rank for i in actor.infos] == [0, 1] and all(i.is_collector for i in actor.infos)
        out = actor.generate(prompts(5))  # 5 rows over 2 workers: padded to 6, one row dropped after
        assert len(out) == 5
        view = out.select(*TEACHER_FORCED)
        pending = actor.compute_log_prob.future(view)  # returns at once
        ref = reference.compute_ref_log_prob(pending.result().union(view).select(*view.keys()))
        mask = out["response_mask"]
        # same weights at iteration 0 (same init seed): the reference reproduces the actor's log-probs
        torch.testing.assert_close(ref["ref_log_probs"][mask], pending.result()["old_log_probs"][mask], atol=1e-5, rtol=0)
    finally:
        actor.close()
        reference.close()


def test_a_failing_worker_is_named_with_its_traceback_and_leaves_no_process(ray_session):
    from rlhf.groups.ray_group import RayWorkerGroup

    actor = RayWorkerGroup("actor", ActorWorker, spec("actor", dp_shard=2), num_cpus=0.5).start()
    pids = list(actor.pids)
    try:
        with pytest.raises(WorkerFailure) as failure:
            actor.generate(Batch({"not_prompts": torch.zeros(4, 3, dtype=torch.long)}, meta={"iteration": 1}))
        assert failure.value.role == "actor" and failure.value.rank in (0, 1)
        assert "Traceback" in failure.value.detail and "KeyError" in failure.value.detail
        assert "prompts" in failure.value.detail  # the worker's own error, not Ray's wrapper
    finally:
        actor.close()
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, f"worker processes {pids} still alive after close()"
        time.sleep(0.2)
