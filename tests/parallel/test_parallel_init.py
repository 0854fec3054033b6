"""Start-up without the whole model (parallel/init.py, parallel/parallelize.py): a model built on the
meta device and parallelized holds, on every layout, exactly the global weights one process
initialises from the same seed; each rank's start-up peak of live tensor bytes is its shards plus
one whole parameter, well under the model, and what `plait-plan` counts (parallel/planner)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.distributed.tensor import distribute_tensor
from torch.profiler import ProfilerActivity, profile, record_function

from layout_harness import BASE, world_of
from parallel.activation_checkpoint import unwrapped_fqn
from parallel.init import local_shard, param_seed
from parallel.mesh import build_mesh
from parallel.parallelize import parallelize
from parallel.planner import Layout, startup_bytes, total_params
from tensor_memory import WINDOW, peak_in_window
from trainer.config import ModelConfig, validate
from trainer.models import build_model, cross_entropy_loss
from trainer.pretrain import parallel_dims


def build_parallel(cfg_dict: dict):
    """(parts, mesh) as trainer/pretrain.py builds them: meta model, parallelize, local init."""
    cfg = validate(cfg_dict)
    mesh = build_mesh(parallel_dims(cfg), "cpu")
    model = build_model(cfg.model, device="meta")
    _, parts, _ = parallelize(model, mesh, cfg.parallel, cfg.trainer.precision, loss_fn=cross_entropy_loss,
                              device="cpu", seed=cfg.seed)
    return parts, mesh


def global_weights(cfg_dict: dict) -> dict[str, np.ndarray]:
    """Every parameter and buffer this rank holds, whole (DTensors gathered), by FQN."""
    parts, _ = build_parallel(cfg_dict)
    out = {}
    for part in [c for part in parts for c in getattr(part, "chunks", [part])]:  # a ChunksView's chunks
        for name, t in [*part.named_parameters(), *part.named_buffers()]:
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[unwrapped_fqn(name)] = t.detach().numpy().copy()
    return out


LAYOUTS = [
    ["parallel.dp_shard=2"],
    ["parallel.tp=2"],
    ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.pp=2", "parallel.microbatches=2"],
    ["parallel.tp=2", "parallel.dp_shard=2"],
    ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b", "parallel.microbatches=2"],
    ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2", "parallel.microbatches=2"],
    ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.activation_checkpoint=full"],
    ["parallel.dp_shard=2", "parallel.dp_backend=ddp"],
    ["parallel.dp_shard=2", "model.tie_embeddings=true"],
    ["parallel.tp=2", "model.tie_embeddings=true"],
    ["parallel.tp=2", "parallel.dp_shard=2", "model.name=llama_value"],
]
IDS = ["fsdp2", "tp2", "tp2-sp", "pp2", "tp2-fsdp2", "pp2-interleaved", "3d", "hsdp-ac", "ddp2", "fsdp2-tied",
       "tp2-tied", "value-tp2-fsdp2"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_same_seed_same_global_weights_on_every_layout(tiny_cfg, run_ranks, layout):
    """Bitwise: every parameter (and the RoPE tables) equals what one process builds from the seed."""
    cfg = tiny_cfg(*BASE, *layout)
    model_cfg = ModelConfig(**cfg["model"])
    single = build_model(model_cfg, seed=cfg["seed"])
    reference = {k: t.detach().numpy() for k, t in [*single.named_parameters(), *single.named_buffers()]}
    merged: dict[str, np.ndarray] = {}
    for rank in run_ranks(world_of(layout), global_weights, cfg):
        for k, v in rank.items():
            assert k not in merged or np.array_equal(merged[k], v), k  # replicas agree
            merged[k] = v
    assert merged.keys() == reference.keys(), sorted(merged.keys() ^ reference.keys())
    different = [k for k in reference if not np.array_equal(merged[k], reference[k])]
    assert not different, different


def test_another_seed_other_weights():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    a, b = build_model(cfg, seed=0), build_model(cfg, seed=1)
    assert all(not torch.equal(p, q) for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters())
               if "norm" not in n)
    assert param_seed(0, "layers.0.attention.wq.weight") != param_seed(0, "layers.1.attention.wq.weight")


def _shards_agree(cfg_dict: dict) -> list[str]:
    """local_shard's view of each whole tensor against DTensor's own distribute_tensor (what
    pins the private offset helper local_shard uses)."""
    parts, _ = build_parallel(cfg_dict)
    bad = []
    for part in parts:
        for name, p in part.named_parameters():
            full = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
            ours = local_shard(full, p)
            theirs = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            if not torch.equal(ours, theirs) or ours.untyped_storage().data_ptr() != full.untyped_storage().data_ptr():
                bad.append(f"{name} {p.placements}")
    return bad


def test_local_shard_is_a_view_equal_to_distribute_tensor(tiny_cfg, run_ranks):
    cfg = tiny_cfg(*BASE, "parallel.tp=2", "parallel.dp_shard=2")
    assert run_ranks(4, _shards_agree, cfg) == [[], [], [], []]


# --- the start-up peak, measured and estimated --------------------------------------------------

# 8 layers: the largest parameter (the 512 x 64 embedding) is 9% of the model
STARTUP = ("model.n_layers=8",)


def startup_peak(cfg_dict: dict) -> tuple[int, int, int]:
    """(pp rank, peak live tensor bytes while building and parallelizing, bytes of the local shards)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function(WINDOW):
            parts, mesh = build_parallel(cfg_dict)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for part in parts for p in part.parameters())
    return (mesh["pp"].get_local_rank() if mesh is not None else 0), peak_in_window(prof), local


@pytest.mark.parametrize("layout, bound", [
    ([], 1.2),
    (["parallel.dp_shard=2"], 0.65),
    (["parallel.tp=2"], 0.65),
    (["parallel.tp=2", "parallel.dp_shard=2"], 0.4),
    (["parallel.pp=2", "parallel.microbatches=2"], 0.65),
], ids=["single", "fsdp2", "tp2", "tp2-fsdp2", "pp2"])
def test_startup_peak_is_the_shards_plus_one_parameter(tiny_cfg, run_ranks, layout, bound):
    """Measured on each rank: at most `bound` x the whole fp32 model (0.65 under dp_shard=2 or
    tp=2: half the model plus the whole embedding being drawn), and within 5% of `startup_bytes`."""
    cfg = tiny_cfg(*BASE, *STARTUP, *layout)
    model = ModelConfig(**cfg["model"])
    whole = 4 * total_params(model)
    world = world_of(layout)
    measured = [startup_peak(cfg)] if world == 1 else run_ranks(world, startup_peak, cfg)
    fields = {f.name for f in dataclasses.fields(Layout)}
    lay = Layout(**{k: v for k, v in cfg["parallel"].items() if k in fields})
    for pp_rank, peak, local in measured:
        assert peak <= bound * whole, (peak / whole, bound)
        assert local < peak
    for pp_rank in {m[0] for m in measured}:
        worst = max(peak for r, peak, _ in measured if r == pp_rank)
        estimate = startup_bytes(model, lay, pp_rank)
        assert abs(estimate / worst - 1) <= 0.05, (pp_rank, worst, estimate)
