"""parallel/hybrid_fsdp.py: FSDP2-sharded (× TP) training → generation under tp_g: greedy tokens
and weights equal one process, each rank receives only what its generation shard lacks (exactly
that under FSDP alone), within the predicted peak."""

import pytest
import torch

from parallel.tensor import FullLogits
from test_hybrid_engine import CFG, tp_model
from trainer.launch.forked import run_ranks
from trainer.models import build_model
from trainer.models.llama import generate


def fsdp_transition(dp_shard: int, t: int, t_g: int) -> dict:
    """FSDP (× TP) training → generation under tp_g, weight by weight, each rank receiving only
    the parts of its generation shard that others hold."""
    from parallel.hybrid_fsdp import GatheredGenerationShards
    from parallel.mesh import ParallelDims, build_mesh
    from parallel.parallelize import parallelize
    from trainer.config import ParallelConfig

    mesh = build_mesh(ParallelDims(dp_shard=dp_shard, tp=t), "cpu")
    _, parts, _ = parallelize(build_model(CFG, device="meta"), mesh, ParallelConfig(dp_shard=dp_shard, tp=t),
                              device="cpu", seed=3)
    engine = GatheredGenerationShards(parts[0], dp_shard * t, t_g, tp_model, torch.device("cpu"))
    received = engine.to_generation()
    full = lambda x: x.full_tensor() if hasattr(x, "full_tensor") else x  # noqa: E731
    run = FullLogits(engine.model) if t_g > 1 else engine.model
    largest = max(q.numel() * q.element_size() for q in tp_model(None).parameters())
    n = dp_shard * t
    minimal = 0  # FSDP only: what the generation shard lacks once it contains the training block where it can
    for name, q in engine.model.named_parameters():
        whole = q.numel() * q.element_size()
        dim = engine.gen_dims[name]
        minimal += {None: whole - whole / n, 0: whole / t_g - whole / n}.get(dim, whole / t_g - whole / (n * t_g))
    return {"tokens": generate(run, torch.tensor([[1, 5, 9, 3]]), 6, temperature=0).numpy(),
            "weights": {n: full(q.detach()).numpy() for n, q in engine.model.named_parameters()},
            "peak_ok": engine.peak_piece_bytes <= largest, "dp_size": engine.dp_size, "received": received,
            "generation_bytes": engine.generation_bytes(), "minimal": minimal if t == 1 else None,
            "peak_within_prediction":
            engine.generation_bytes() + engine.peak_piece_bytes <= engine.predicted_peak_bytes()}


@pytest.mark.parametrize("dp_shard, t, t_g", [(4, 1, 2), (2, 2, 1), (2, 1, 2)],
                         ids=["fsdp4-to-tp2", "fsdp2xtp2-to-tp1", "fsdp2-to-tp2"])
def test_fsdp_layout_to_generation_receives_only_its_generation_shard(dp_shard, t, t_g):
    ref_model = tp_model(None)
    ref = generate(ref_model, torch.tensor([[1, 5, 9, 3]]), 6, temperature=0).numpy()
    for out in run_ranks(dp_shard * t, fsdp_transition, dp_shard, t, t_g):
        assert (out["tokens"] == ref).all() and out["peak_ok"] and out["dp_size"] == dp_shard * t // t_g
        assert out["peak_within_prediction"]
        assert 0 < out["received"] < out["generation_bytes"]  # only parts of its generation shard, never a whole weight more
        if out["minimal"] is not None:  # the paper's grouping: the training block sits inside the generation shard
            assert out["received"] == out["minimal"]
        for n, q in ref_model.named_parameters():
            assert (out["weights"][n] == q.detach().numpy()).all(), n
