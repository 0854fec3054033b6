"""3D-HybridEngine transitions: bytes moved, extra memory and time of the training → generation
weight transition (parallel/hybrid_engine.py) against the naive all-gather of the whole model,
next to HybridFlow's formulas (§5, Table 2), on forked gloo ranks in one run.

For each layout (training tp=t, dp=d → generation tp_g), per rank and transition:
  comm_bytes vs (t − t_g)/(t_g·t)·M (M: the tensor-sharded weights, what moves; replicated norms
  never move), naive_bytes = gathering every weight whole over the tensor group vs (t − 1)/t·M (the
  paper's (t·p·d − 1)/(t·p·d)·M assumes weights sharded over all t·p·d ranks; here the d replicas
  each hold a copy), the time of each (median of --rounds), and the resident engine's extra memory
  vs M/t_g − M/t and its redundancy (bytes of training shards stored twice: 0).
Prints one JSON line; `comm_cut` = 1 − comm/naive (the paper: 55% less transition time on average).

    .venv/bin/python bench/hybrid_engine.py [--dim 256] [--layers 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.hybrid_engine import (GenerationShards, HybridLayout, hybrid_peak_extra_bytes,  # noqa: E402
                                    hybrid_transition_bytes, naive_transition_bytes)
from parallel.init import materialize  # noqa: E402
from parallel.mesh import ParallelDims, build_mesh  # noqa: E402
from parallel.tensor import apply_tp  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.launch.forked import run_ranks  # noqa: E402
from trainer.models import build_model  # noqa: E402


def network(cfg: ModelConfig):
    def build(mesh):
        model = build_model(cfg, device="meta")
        if mesh is not None:
            apply_tp(model, mesh)
        return materialize(model, torch.device("cpu"), seed=0)
    return build


def naive_gather(model, tp_group) -> tuple[int, float]:
    """The baseline: every rank gathers every tensor-sharded weight whole over its tensor group
    (the full model on every rank, then sliced for generation): bytes received, seconds."""
    world, received = dist.get_world_size(tp_group), 0
    start = time.perf_counter()
    for p in model.parameters():
        if not hasattr(p, "to_local"):
            continue  # replicated: already whole
        local = p.to_local().detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=tp_group)
        received += local.numel() * local.element_size() * (world - 1)
    return received, time.perf_counter() - start


def measure(t: int, d: int, t_g: int, cfg: ModelConfig, rounds: int) -> dict:
    torch.set_num_threads(1)
    lay = HybridLayout(p=1, t=t, d=d, t_g=t_g)
    build = network(cfg)
    mesh = build_mesh(ParallelDims(dp_replicate=d, tp=t), "cpu")
    train = build(mesh["tp"])
    local = lambda x: x.to_local() if hasattr(x, "to_local") else x  # noqa: E731
    full_bytes = sum(p.numel() * p.element_size() for p in train.parameters())
    sharded = sum(p.numel() * p.element_size() for p in train.parameters() if hasattr(p, "placements")
                  and any(type(x).__name__ == "Shard" for x in p.placements))
    train_bytes = sum(local(p).numel() * local(p).element_size() for p in train.parameters())
    engine = GenerationShards(train, lay, build, torch.device("cpu"), resident=True)
    engine.to_generation()  # the first transition moves the training shards into place
    times, naive_times = [], []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        comm = engine.to_generation()
        times.append(time.perf_counter() - start)
        dist.barrier()
        naive, seconds = naive_gather(train, mesh["tp"].get_group())
        naive_times.append(seconds)
    storages = {}
    for p in [*train.parameters(), *engine.model.parameters()]:
        st = local(p.detach()).untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    resident = sum(storages.values())
    return {"comm_bytes": comm, "comm_formula": hybrid_transition_bytes(lay, sharded),
            "naive_bytes": naive, "naive_formula": naive_transition_bytes(HybridLayout(p=1, t=t, d=1), sharded),
            "comm_seconds": statistics.median(times), "naive_seconds": statistics.median(naive_times),
            "extra_bytes": resident - train_bytes, "extra_formula": hybrid_peak_extra_bytes(lay, sharded),
            "redundancy_bytes": resident - engine.generation_bytes(), "model_bytes": full_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    cfg = ModelConfig(name="llama_bench_hybrid", vocab_size=2048, dim=a.dim, n_layers=a.layers, n_heads=8, n_kv_heads=4,
                      ffn_dim=a.dim * 11 // 4 // 8 * 8, max_seq_len=64)
    out = {}
    for t, d, t_g in ((2, 2, 1), (4, 1, 2), (4, 1, 1), (2, 1, 1)):
        ranks = run_ranks(t * d, measure, t, d, t_g, cfg, a.rounds)
        r0 = ranks[0]
        out[f"tp{t}_dp{d}_to_tp{t_g}"] = {
            "comm_bytes": r0["comm_bytes"], "comm_formula": round(r0["comm_formula"]),
            "naive_bytes": r0["naive_bytes"], "naive_formula": round(r0["naive_formula"]),
            "comm_cut": round(1 - r0["comm_bytes"] / r0["naive_bytes"], 3),
            "time_cut": round(1 - statistics.median(r["comm_seconds"] for r in ranks)
                              / statistics.median(r["naive_seconds"] for r in ranks), 3),
            "extra_bytes": r0["extra_bytes"], "extra_formula": round(r0["extra_formula"]),
            "redundancy_bytes": max(r["redundancy_bytes"] for r in ranks)}
    cuts = [v["time_cut"] for v in out.values()]
    print(json.dumps({"mean_time_cut": round(statistics.mean(cuts), 3), "layouts": out,
                      "model_bytes": r0["model_bytes"], "rounds": a.rounds, "device": "cpu/gloo"}))


if __name__ == "__main__":
    main()
