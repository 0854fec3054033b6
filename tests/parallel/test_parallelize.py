"""The composing step (parallel/parallelize.py): what each technique leaves on the model and in which
order (split -> TP -> AC -> FSDP -> allocate and initialise the local shards), a materialised model
sharded as it is, and the refusals, each message naming what is wrong."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from parallel.mesh import build_mesh
from parallel.parallelize import parallelize, parallelize_problem
from parallel.pipeline import ChunksView
from parallel.planner import Layout
from trainer.config import ModelConfig
from trainer.models import build_model, cross_entropy_loss

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)


def _composed(layout: Layout) -> dict:
    """What parallelize leaves on a meta-built Llama under `layout`, described."""
    mesh = build_mesh(layout, "cpu")
    model, parts, pipeline = parallelize(build_model(CFG, device="meta"), mesh, layout, loss_fn=cross_entropy_loss,
                                         device="cpu", seed=0)
    part = parts[0]
    block = next(iter(part.layers.values()))
    wq = next(p for n, p in part.named_parameters() if n.endswith("attention.wq.weight"))
    return {
        "model": type(model).__name__ if model is not None else None,
        "part": type(part).__name__,
        "pipeline": pipeline is not None,
        "block": type(block).__name__,  # AC's wrapper, FSDP'd (FSDP after AC)
        "block_fsdp": isinstance(block, FSDPModule),
        "root_fsdp": isinstance(part, FSDPModule),
        "wq_mesh": wq.device_mesh.mesh_dim_names if isinstance(wq, DTensor) else None,  # TP before FSDP
        "meta": any(p.is_meta for p in part.parameters()),
        "layers": sorted(part.layers, key=int),
        "devices": {str(p.device) for p in part.parameters()},
    }


def test_tp_then_ac_then_fsdp_then_local_init(run_ranks):
    got = run_ranks(4, _composed, Layout(tp=2, dp_shard=2, activation_checkpoint="full"))[0]
    assert got == {"model": "FSDPLlama", "part": "FSDPLlama", "pipeline": False, "block": "FSDPCheckpointWrapper",
                   "block_fsdp": True, "root_fsdp": True, "wq_mesh": ("dp_shard", "tp"), "meta": False,
                   "layers": ["0", "1", "2", "3"], "devices": {"cpu"}}


def test_pipeline_chunks_hold_their_layers_under_whole_model_names(run_ranks):
    layout = Layout(pp=2, dp_shard=2, virtual_stages=2, schedule="interleaved_1f1b", microbatches=2)
    first, *_, last = run_ranks(4, _composed, layout)  # pp-major: ranks 0-1 pp rank 0, 2-3 pp rank 1
    assert first["model"] is None and first["pipeline"] and first["part"] == "ChunksView"
    assert first["layers"] == ["0", "2"] and last["layers"] == ["1", "3"]
    assert not first["meta"] and first["block_fsdp"] and first["wq_mesh"] == ("dp_shard",)


def _ddp_wraps_materialised(layout: Layout) -> tuple[bool, bool]:
    mesh = build_mesh(layout, "cpu")
    model, parts, _ = parallelize(build_model(CFG, device="meta"), mesh, layout, device="cpu", seed=0)
    return isinstance(model, DistributedDataParallel), any(p.is_meta for p in parts[0].parameters())


def test_ddp_wraps_an_already_materialised_model(run_ranks):
    assert run_ranks(2, _ddp_wraps_materialised, Layout(dp_shard=2, dp_backend="ddp")) == [(True, False)] * 2


def test_single_process_applies_ac_and_initialises():
    model, parts, pipeline = parallelize(build_model(CFG, device="meta"), None, Layout(activation_checkpoint="full"),
                                         seed=3)
    assert parts == [model] and pipeline is None
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model.layers.values())
    reference = build_model(CFG, seed=3)
    for (n, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), n


def _materialised_sharded_as_is(layout: Layout) -> bool:
    mesh = build_mesh(layout, "cpu")
    model = build_model(CFG, seed=5)
    whole = {n: p.detach().clone() for n, p in model.named_parameters()}
    parallelize(model, mesh, layout)
    return all(torch.equal(p.full_tensor(), whole[n]) for n, p in model.named_parameters())


def test_a_materialised_model_keeps_its_weights(run_ranks):
    assert run_ranks(4, _materialised_sharded_as_is, Layout(tp=2, dp_shard=2)) == [True] * 4


class NoPlan(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)


FAKE_MESH = object()  # the refusals are decided before any collective: no process group needed


@pytest.mark.parametrize("model, mesh, layout, loss_fn, words", [
    (NoPlan(), None, Layout(dp_backend="zero"), None, ["parallel.dp_backend='zero'", "fsdp, ddp, deepspeed"]),
    (NoPlan(), FAKE_MESH, Layout(dp_shard=2), None, ["NoPlan declares no `stage_structure`", "FSDP"]),
    (NoPlan(), None, Layout(activation_checkpoint="full"), None, ["activation checkpointing"]),
    (NoPlan(), FAKE_MESH, Layout(tp=2), None, ["parallel.tp=2", "NoPlan declares no `tp_plan"]),
    (build_model(CFG, device="meta"), FAKE_MESH, Layout(pp=2, microbatches=2), None, ["needs loss_fn"]),
], ids=["backend", "fsdp-no-structure", "ac-no-structure", "tp-no-plan", "pp-no-loss"])
def test_refusals_name_the_problem(model, mesh, layout, loss_fn, words):
    problem = parallelize_problem(model, mesh, layout, loss_fn)
    for word in words:
        assert word in problem, (word, problem)
    with pytest.raises(ValueError, match="declares|needs|allowed"):
        parallelize(model, mesh, layout, loss_fn=loss_fn)


def test_a_meta_model_without_an_init_rule_is_refused():
    with torch.device("meta"):
        model = NoPlan()
    assert "declares no `init_param" in parallelize_problem(model, None, Layout(), None)


def test_a_valid_layout_has_no_problem():
    for layout in (Layout(), Layout(tp=2, dp_shard=2), Layout(pp=2, microbatches=2)):
        assert parallelize_problem(build_model(CFG, device="meta"), FAKE_MESH, layout, cross_entropy_loss) is None
