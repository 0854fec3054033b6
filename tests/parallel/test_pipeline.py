"""Pipeline parallelism (parallel/pipeline.py): the split, the schedules' numerics against one
process, and the up-front refusals of layouts torch's schedules would crash or hang on."""

import pytest
import torch
import torch.distributed as dist

from layout_harness import check_layout
from parallel.pipeline import SCHEDULES, layer_split, schedule_problem, split_model, stage_ids
from trainer.config import ConfigError, ModelConfig, validate
from trainer.models import build_model


def test_megatron_interleaved_assignment():
    assert [stage_ids(r, 2, 2) for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids(r, 4, 1) for r in range(4)] == [[0], [1], [2], [3]]
    assert [list(c) for c in layer_split(6, 4)] == [[0, 1], [2, 3], [4], [5]]
    assert [list(c) for c in layer_split(4, 4)] == [[0], [1], [2], [3]]


def test_split_keeps_fqns_and_prunes_ends():
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48))
    parts = [split_model(model, c, 3) for c in range(3)]
    assert [list(p.layers) for p in parts] == [["0", "1"], ["2"], ["3"]]
    assert parts[0].tok_embeddings is not None and parts[0].output is None and parts[0].norm is None
    assert parts[1].tok_embeddings is None and parts[1].output is None
    assert parts[2].tok_embeddings is None and parts[2].norm is not None and parts[2].output is not None
    whole = model.state_dict()
    pieces = {k: v for p in parts for k, v in p.state_dict().items()}
    assert pieces.keys() == whole.keys()
    assert all(torch.equal(pieces[k], whole[k]) for k in whole)
    # the stages chained are the model
    tokens = torch.randint(0, 64, (2, 8))
    h = tokens
    for part in parts:
        h = part(h)
    torch.testing.assert_close(h, model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("layout", [
    ["parallel.pp=2", "parallel.microbatches=2"],
    ["parallel.pp=2", "parallel.microbatches=4", "parallel.schedule=gpipe"],
    ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b", "parallel.microbatches=2"],
    # torch 2.13's flexible interleaving: 3 microbatches on 2 ranks (not a multiple of pp)
    ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b", "parallel.microbatches=3",
     "trainer.batch_size=6"],
    # grad accumulation around the schedule: its gradients add up, scaled once
    ["parallel.pp=2", "parallel.microbatches=2", "trainer.grad_accum=2"],
], ids=["1f1b", "gpipe", "interleaved", "interleaved-3-microbatches", "1f1b-grad-accum"])
def test_pipeline_matches_single_process(tiny_cfg, run_ranks, layout):
    """Loss, grad norm (summed over stages), every gradient of 3 steps, and the eval loss (through
    the schedule's forward-only mode) equal one process's."""
    check_layout(tiny_cfg, run_ranks, *layout)


@pytest.mark.parametrize("parallel, words", [
    ({"pp": 2, "microbatches": 1}, ["1f1b needs microbatches >= pp"]),
    ({"pp": 2, "virtual_stages": 2, "schedule": "1f1b", "microbatches": 2}, ["use interleaved_1f1b"]),
    ({"pp": 2, "schedule": "interleaved_1f1b", "microbatches": 2}, ["virtual_stages >= 2"]),
    ({"pp": 2, "virtual_stages": 2, "schedule": "interleaved_1f1b", "microbatches": 5}, ["rounds", "1, 2, 3, 4, 6, 8"]),
    ({"pp": 4, "virtual_stages": 2, "schedule": "interleaved_1f1b", "microbatches": 4}, ["8 pipeline chunks", "4 layers"]),
    ({"pp": 2, "microbatches": 3}, ["not divisible by parallel.microbatches=3"]),
    ({"virtual_stages": 2}, ["needs parallel.pp > 1"]),
    ({"pp": 2, "microbatches": 2, "dp_shard": 2, "dp_backend": "ddp"}, ["dp_backend=ddp", "fsdp"]),
])
def test_bad_pipeline_layouts_fail_before_ranks_start(parallel, words):
    batch = 10 if parallel.get("microbatches") == 5 else 16
    with pytest.raises(ConfigError) as err:
        validate({"parallel": parallel, "trainer": {"batch_size": batch}})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_microbatches_default_to_pp():
    """DESIGN.md's headline command validates as it stands: one microbatch per stage by default."""
    cfg = validate({"parallel": {"pp": 2, "tp": 2, "dp_shard": 2}}, world_size=8)
    assert cfg.parallel.microbatches == 2 and cfg.parallel.schedule == "1f1b"
    assert validate({}).parallel.microbatches == 1


def test_tied_embeddings_refused_under_pipeline():
    with pytest.raises(ConfigError, match="tie_embeddings"):
        validate({"parallel": {"pp": 2, "microbatches": 2}, "model": {"tie_embeddings": True}})


def _torch_accepts(schedule: str, virtual_stages: int, grid: list[int]) -> dict[int, bool]:
    """Whether torch 2.13's schedule class accepts each microbatch count (constructed only)."""
    from torch.distributed.pipelining import PipelineStage

    pp = dist.get_world_size()
    stages = [PipelineStage(torch.nn.Linear(2, 2), s, pp * virtual_stages, torch.device("cpu"))
              for s in stage_ids(dist.get_rank(), pp, virtual_stages)]
    cls = SCHEDULES[schedule]
    out = {}
    for m in grid:
        try:
            cls(stages if virtual_stages > 1 else stages[0], n_microbatches=m, loss_fn=torch.nn.MSELoss())
            out[m] = True
        except ValueError:
            out[m] = False
    return out


@pytest.mark.parametrize("schedule, virtual_stages", [("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2)])
def test_validation_is_exactly_what_torch_requires(run_ranks, schedule, virtual_stages):
    """Pins torch's own rules: our check accepts a microbatch count iff torch's schedule does."""
    grid = list(range(1, 13))
    accepted = run_ranks(2, _torch_accepts, schedule, virtual_stages, grid)[0]
    ours = {m: schedule_problem(schedule, 2, virtual_stages, m, n_layers=8) is None for m in grid}
    assert ours == accepted
    assert not all(accepted.values()) or schedule == "gpipe"
