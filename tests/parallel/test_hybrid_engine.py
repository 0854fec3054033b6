"""parallel/hybrid_engine.py: the paper's grouping and cost formulas, and the tensor-parallel
transition: generation weights equal training weights exactly, greedy generation under the
generation layout equals one process, bytes moved equal HybridFlow's formula."""

import itertools

import pytest
import torch

from parallel.hybrid_engine import (GenerationShards, HybridLayout, coords, hybrid_groups, hybrid_peak_extra_bytes,
                                    hybrid_transition_bytes, naive_transition_bytes)
from parallel.init import materialize
from parallel.tensor import FullLogits, apply_tp
from trainer.config import ModelConfig
from trainer.launch.forked import run_ranks
from trainer.models import build_model
from trainer.models.llama import generate

CFG = ModelConfig(name="llama_hybrid", vocab_size=64, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=128,
                  max_seq_len=32, init_std=0.2)


def test_the_papers_example():
    g = hybrid_groups(HybridLayout(p=1, t=4, d=2, t_g=2))
    assert sorted(g.generation_tp) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(g.micro_dp) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(g.generation_dp_rank) == sorted(list(range(4)) * 2)  # 4 generation replicas of 2 ranks


@pytest.mark.parametrize("p, t, d, p_g, t_g", [(1, 4, 2, 1, 2), (2, 2, 1, 1, 2), (2, 4, 2, 1, 1), (4, 2, 1, 2, 1),
                                               (2, 8, 1, 2, 2), (1, 2, 3, 1, 1)])
def test_every_generation_shard_contains_its_training_shard(p, t, d, p_g, t_g):
    lay = HybridLayout(p, t, d, p_g, t_g)
    g = hybrid_groups(lay)
    s, r = p // p_g, t // t_g
    assert sorted(itertools.chain(*g.micro_dp)) == list(range(lay.world))  # a partition of the ranks
    for group in g.micro_dp:
        assert len(group) == lay.micro_dp
        stages = {coords(x, lay)[0] // s for x in group}
        tensor = {coords(x, lay)[2] // r for x in group}
        assert len(stages) == 1 and len(tensor) == 1  # one generation shard: the members' union
    for group in g.generation_tp:
        assert [coords(x, lay)[2] // r for x in group] == list(range(t_g))
        assert len({x % r for x in group}) == 1  # ranks at stride r = t / t_g
    assert len(set(g.generation_dp_rank)) == d * lay.micro_dp


def test_the_papers_cost_formulas():
    lay, m = HybridLayout(p=1, t=8, d=2, t_g=2), 1.0
    assert hybrid_transition_bytes(lay, m) == pytest.approx((8 - 2) / (2 * 8))
    assert naive_transition_bytes(lay, m) == pytest.approx(15 / 16)
    assert hybrid_peak_extra_bytes(lay, m) == pytest.approx(1 / 2 - 1 / 8)
    assert hybrid_transition_bytes(HybridLayout(p=1, t=4, d=1, t_g=4), m) == 0  # same layout: nothing moves


def tp_model(mesh):
    model = build_model(CFG, device="meta")
    if mesh is not None:
        apply_tp(model, mesh)
    materialize(model, torch.device("cpu"), seed=3)
    return model


def transition(t: int, d: int, t_g: int) -> dict:
    import torch.distributed as dist

    from parallel.mesh import ParallelDims, build_mesh

    lay = HybridLayout(p=1, t=t, d=d, t_g=t_g)
    mesh = build_mesh(ParallelDims(dp_replicate=d, tp=t), "cpu")
    train = tp_model(mesh["tp"])
    engine = GenerationShards(train, lay, tp_model, torch.device("cpu"))
    full = lambda x: x.full_tensor() if hasattr(x, "full_tensor") else x  # noqa: E731
    out = {}
    for round_ in range(2):  # and again after the training weights change (an optimizer step)
        received = engine.to_generation()
        gen = dict(engine.model.named_parameters())
        out[f"equal_{round_}"] = all(torch.equal(full(p.detach()), full(gen[n].detach()))
                                     for n, p in train.named_parameters())
        run = FullLogits(engine.model) if t_g > 1 else engine.model
        out[f"tokens_{round_}"] = generate(run, torch.tensor([[1, 5, 9, 3]]), 6, temperature=0).numpy()
        with torch.no_grad():
            for p in train.parameters():  # elementwise: each shard moves as its part of the whole would
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(0.01 * torch.sign(local))
    from torch.distributed.tensor import DTensor, Shard

    sharded = sum(p.numel() * p.element_size() for p in train.parameters()  # full sizes of the TP-sharded ones
                  if isinstance(p, DTensor) and any(isinstance(x, Shard) for x in p.placements))
    out["received"], out["sharded_bytes"] = received, sharded
    out["rank"] = dist.get_rank()
    engine.release()
    return out


def reference_tokens() -> list:
    model = tp_model(None)
    tokens = [generate(model, torch.tensor([[1, 5, 9, 3]]), 6, temperature=0).numpy()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.sign(p))
    return tokens + [generate(model, torch.tensor([[1, 5, 9, 3]]), 6, temperature=0).numpy()]


@pytest.mark.parametrize("t, d, t_g", [(2, 2, 1), (4, 1, 2), (2, 1, 1)], ids=["tp2dp2-to-tp1", "tp4-to-tp2", "tp2-to-tp1"])
def test_generation_weights_and_greedy_tokens_equal_one_process(t, d, t_g):
    ref = reference_tokens()
    for out in run_ranks(t * d, transition, t, d, t_g):
        assert out["equal_0"] and out["equal_1"], out["rank"]
        for round_ in (0, 1):
            assert (out[f"tokens_{round_}"] == ref[round_]).all(), (out["rank"], round_)
        # the bytes a rank received: HybridFlow's (t − t_g)/(t_g·t)·M over the tensor-sharded weights
        lay = HybridLayout(p=1, t=t, d=d, t_g=t_g)
        assert out["received"] == pytest.approx(hybrid_transition_bytes(lay, out["sharded_bytes"]))


def resident_transition(t: int, t_g: int) -> dict:
    """Zero redundancy: the training shards live inside the generation buffers; training still
    trains (forward, backward, AdamW) and the next transition sees its update."""
    from parallel.mesh import ParallelDims, build_mesh
    from parallel.tensor import tp_loss_context
    from trainer.models.loss import cross_entropy_loss

    lay = HybridLayout(p=1, t=t, d=1, t_g=t_g)
    mesh = build_mesh(ParallelDims(tp=t), "cpu")
    train = tp_model(mesh["tp"])
    local = lambda x: x.to_local() if hasattr(x, "to_local") else x  # noqa: E731
    full = lambda x: x.full_tensor() if hasattr(x, "full_tensor") else x  # noqa: E731
    train_bytes = sum(local(p).numel() * local(p).element_size() for p in train.parameters())
    engine = GenerationShards(train, lay, tp_model, torch.device("cpu"), resident=True)
    engine.to_generation()
    storages = {}
    for p in [*train.parameters(), *engine.model.parameters()]:
        st = local(p.detach()).untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    out = {"resident_bytes": sum(storages.values()), "generation_bytes": engine.generation_bytes(),
           "train_bytes": train_bytes}
    optimizer = torch.optim.AdamW(train.parameters(), lr=1e-2)
    tokens = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with tp_loss_context(True):
        cross_entropy_loss(train(tokens[:, :-1]), tokens[:, 1:]).backward()
    optimizer.step()
    engine.to_generation()
    gen = dict(engine.model.named_parameters())
    out["equal_after_step"] = all(torch.equal(full(p.detach()), full(gen[n].detach())) for n, p in train.named_parameters())
    out["tokens"] = generate(FullLogits(engine.model) if t_g > 1 else engine.model, torch.tensor([[1, 5, 9, 3]]), 6,
                             temperature=0).numpy()
    full_after = {n: full(p.detach()).clone() for n, p in train.named_parameters()}
    return {**out, "weights": {n: v.numpy() for n, v in full_after.items()}}


@pytest.mark.parametrize("t, t_g", [(4, 2), (2, 1)], ids=["tp4-to-tp2", "tp2-to-tp1"])
def test_resident_shards_have_no_redundant_copy_and_keep_training(t, t_g):
    outs = run_ranks(t, resident_transition, t, t_g)
    for out in outs:
        assert out["equal_after_step"]
        # one copy of everything: the generation shard, which holds the training shard
        assert out["resident_bytes"] == out["generation_bytes"]
        assert out["resident_bytes"] - out["train_bytes"] <= hybrid_peak_extra_bytes(
            HybridLayout(p=1, t=t, d=1, t_g=t_g), sum(v.nbytes for v in out["weights"].values()))
    # the stepped weights generate as one process with those weights would
    model = tp_model(None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(outs[0]["weights"][n]))
    ref = generate(model, torch.tensor([[1, 5, 9, 3]]), 6, temperature=0).numpy()
    for out in outs:
        assert (out["tokens"] == ref).all()


def staged_transition(p: int, t: int, t_g: int, v: int, resident: bool, p_g: int = 1, n_layers: int = 2) -> dict:
    """Training pp=p × tp=t (split into stages by parallelize) → generation under (pp_g, tp_g); then
    the training weights change in place and generation sees it (resident: through the aliases).
    Greedy tokens are decoded here without generation stages only (rlhf's pipeline decoder runs them)."""
    import dataclasses

    import torch.distributed as dist

    from parallel.hybrid_engine import StagedGenerationShards, generation_network, pipeline_owner
    from parallel.mesh import ParallelDims, build_mesh
    from parallel.parallelize import parallelize
    from trainer.config import ParallelConfig
    from trainer.models.loss import cross_entropy_loss

    cfg = dataclasses.replace(CFG, n_layers=n_layers)
    lay = HybridLayout(p=p, t=t, d=1, p_g=p_g, t_g=t_g)
    layout = ParallelConfig(pp=p, tp=t, virtual_stages=v, microbatches=p,
                            schedule="interleaved_1f1b" if v > 1 else "1f1b")
    mesh = build_mesh(ParallelDims(pp=p, tp=t), "cpu")
    _, parts, _ = parallelize(build_model(cfg, device="meta"), mesh, layout, loss_fn=cross_entropy_loss,
                              device="cpu", seed=3)
    build = lambda tp_mesh, chunks: generation_network(build_model(cfg, device="meta"), tp_mesh, chunks, p * v,  # noqa: E731
                                                       torch.device("cpu"), seed=5)
    engine = StagedGenerationShards(parts[0], lay, build, torch.device("cpu"), pipeline_owner(n_layers, p, v),
                                    resident=resident, virtual_stages=v)
    full = lambda x: x.full_tensor() if hasattr(x, "full_tensor") else x  # noqa: E731
    local = lambda x: x.to_local() if hasattr(x, "to_local") else x  # noqa: E731
    run = FullLogits(engine.model) if t_g > 1 else engine.model
    out = {"rank": dist.get_rank(), "chunks": engine.chunk_ids}
    for round_ in range(2):
        received = engine.to_generation()
        if p_g == 1:
            out[f"tokens_{round_}"] = generate(run, torch.tensor([[1, 5, 9, 3]]), 6, temperature=0).numpy()
        out[f"weights_{round_}"] = {n: full(q.detach()).clone().numpy() for n, q in engine.model.named_parameters()}
        engine.release()
        with torch.no_grad():
            for q in parts[0].parameters():
                local(q).add_(0.01 * torch.sign(local(q)))
    storages = {}
    for q in [*parts[0].parameters(), *engine.model.parameters()]:
        st = local(q.detach()).untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    out.update(received=received, resident_bytes=sum(storages.values()), generation_bytes=engine.generation_bytes())
    return out


def reference_weights(n_layers: int = 2) -> list[dict]:
    """The whole model's weights (seed 3), before and after the test's in-place update."""
    import dataclasses

    model = build_model(dataclasses.replace(CFG, n_layers=n_layers), device="meta")
    materialize(model, torch.device("cpu"), seed=3)
    weights = [{n: q.detach().numpy().copy() for n, q in model.named_parameters()}]
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.01 * torch.sign(q))
    return weights + [{n: q.detach().numpy() for n, q in model.named_parameters()}]


@pytest.mark.parametrize("p, t, t_g, v, resident", [(2, 2, 2, 1, False), (2, 1, 1, 1, False), (2, 2, 1, 2, False),
                                                    (2, 2, 2, 1, True), (2, 2, 1, 2, True)],
                         ids=["pp2xtp2-to-tp2", "pp2-to-tp1", "pp2xtp2-interleaved-to-tp1", "pp2xtp2-to-tp2-resident",
                              "pp2xtp2-interleaved-to-tp1-resident"])
def test_pipeline_layout_to_generation_without_stages(p, t, t_g, v, resident):
    refs, weights = reference_tokens(), reference_weights()
    for out in run_ranks(p * t, staged_transition, p, t, t_g, v, resident):
        for round_ in (0, 1):
            assert (out[f"tokens_{round_}"] == refs[round_]).all(), round_
            for n, w in weights[round_].items():
                assert (out[f"weights_{round_}"][n] == w).all(), (round_, n)
        assert out["received"] > 0
        if resident:  # one copy of everything: the generation shard holds this rank's training shard
            assert out["resident_bytes"] == out["generation_bytes"]


@pytest.mark.parametrize("p, t, t_g, v, p_g", [(2, 2, 1, 1, 2), (4, 1, 1, 1, 2), (2, 2, 1, 2, 2), (4, 1, 1, 2, 2)],
                         ids=["pp2xtp2-to-pp2", "pp4-to-pp2", "pp2xtp2-interleaved-to-pp2", "pp4-interleaved-to-pp2"])
def test_pipeline_layout_to_generation_with_fewer_stages(p, t, t_g, v, p_g):
    """Generation stage g holds the layers of training stages [g·p/p_g, (g+1)·p/p_g) whole
    (interleaved: their chunks), equal to the whole model's, resident (no second copy); the stages
    of a generation pipeline hold every layer once."""
    n_layers = 8 if v > 1 and p == 4 else 4
    weights = reference_weights(n_layers)
    outs = run_ranks(p * t, staged_transition, p, t, t_g, v, True, p_g, n_layers)
    for out in outs:
        pp_i = coords(out["rank"], HybridLayout(p=p, t=t, d=1))[0]
        s = p // p_g
        assert all((c % p) // s == pp_i // s for c in out["chunks"]), out
        for round_ in (0, 1):
            held = out[f"weights_{round_}"]
            assert held and all((held[n] == weights[round_][n]).all() for n in held), (out["rank"], round_)
        assert out["received"] > 0
        assert out["resident_bytes"] == out["generation_bytes"]
    for pipeline in hybrid_groups(HybridLayout(p=p, t=t, d=1, p_g=p_g, t_g=t_g)).generation_pp:
        names = [n for r in pipeline for n in outs[r]["weights_0"]]
        assert sorted(names) == sorted(weights[0]), pipeline  # every weight once over the stages


def bucketed_gathers() -> bool:
    import torch.distributed as dist

    from parallel.hybrid_engine import gather_into

    r, w = dist.get_rank(), dist.get_world_size()
    g, ok = torch.Generator().manual_seed(0), []
    for shape, dim in [((64, 48), 0), ((64, 48), 1), ((8, 12), 0), ((8, 12), 1), ((36,), 0)]:
        full = torch.randn(shape, generator=g)
        local = full.chunk(w, dim)[r].contiguous()
        for bucket in (1, 64, 1 << 30):  # one row per all-gather, a few rows, the whole weight at once
            target = torch.empty_like(full)
            gather_into(target, local, dim, None, w, bucket)
            ok.append(torch.equal(target, full))
        target, n = torch.zeros_like(full), local.shape[dim]  # this rank's shard already in its slot (resident)
        target.narrow(dim, r * n, n).copy_(local)
        gather_into(target, target.narrow(dim, r * n, n), dim, None, w, 64)
        ok.append(torch.equal(target, full))
    return all(ok)


def test_bucketed_gathers_assemble_the_generation_weight_exactly():
    assert all(run_ranks(4, bucketed_gathers))
