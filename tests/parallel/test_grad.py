"""Gradient norm and clipping across meshes (parallel/grad.py) against one process: plain tensors,
DTensors on FSDP x TP meshes, a mix of the two (TP without FSDP), and a sum over pipeline stages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from parallel.grad import clip_grad_norm, grad_norm
from parallel.mesh import build_mesh
from parallel.parallelize import parallelize
from parallel.planner import Layout
from trainer.config import ModelConfig
from trainer.models import build_model, cross_entropy_loss

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
TOKENS = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))


def _clipped(layout: Layout, max_norm: float) -> tuple[float, dict[str, np.ndarray]]:
    """(‖g‖ before clipping, every full gradient after) of one step on TOKENS under `layout`."""
    mesh = build_mesh(layout, "cpu") if layout.world_size > 1 else None
    model, parts, _ = parallelize(build_model(CFG, device="meta"), mesh, layout, device="cpu", seed=0)
    tokens = TOKENS
    if mesh is not None:  # this data-parallel rank's rows
        dp = mesh["dp"]
        rows = len(TOKENS) // dp.size()
        tokens = TOKENS[dp.get_local_rank() * rows:(dp.get_local_rank() + 1) * rows]
    from parallel.tensor import tp_loss_context

    with tp_loss_context(layout.tp > 1):
        cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    params = list(parts[0].parameters())
    norm = clip_grad_norm(params, max_norm)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).numpy().copy()
             for n, p in parts[0].named_parameters()}
    return norm.item(), grads


@pytest.mark.parametrize("layout, world", [
    (Layout(tp=2, dp_shard=2), 4),  # every gradient a DTensor on the (dp_shard, tp) mesh
    (Layout(tp=2), 2),  # matrices DTensors on tp, norms plain tensors: two foreach groups
    (Layout(dp_shard=2), 2),
], ids=["fsdp-x-tp", "tp-mixed-plain", "fsdp"])
def test_norm_and_clip_match_one_process(run_ranks, layout, world):
    ref_norm, ref = _clipped(Layout(), 0.0)  # unclipped: the reference gradients and their norm
    expected = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in ref.values()))
    assert ref_norm == pytest.approx(expected, rel=1e-6)
    max_norm = ref_norm / 4  # clipping scales every gradient by max_norm / ‖g‖
    for norm, grads in run_ranks(world, _clipped, layout, max_norm):
        assert norm == pytest.approx(ref_norm, rel=1e-6)
        for k, g in ref.items():
            np.testing.assert_allclose(grads[k], g * (max_norm / ref_norm), rtol=2e-5, atol=1e-9, err_msg=k)


def _per_stage_norm() -> tuple[float, float]:
    """Rank r holds one parameter with gradient (r + 1)·1: its own norm, and the norm over both stages."""
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), float(dist.get_rank() + 1))
    return grad_norm([p]).item(), grad_norm([p], pp_group=dist.group.WORLD).item()


def test_pipeline_stages_sum_their_squares(run_ranks):
    (own0, both0), (own1, both1) = run_ranks(2, _per_stage_norm)
    assert (own0, own1) == (2.0, 4.0)  # ‖(1,1,1,1)‖, ‖(2,2,2,2)‖
    assert both0 == both1 == pytest.approx(math.sqrt(4 + 16))


def test_no_gradients_and_no_clipping():
    p = torch.nn.Parameter(torch.ones(3))
    assert grad_norm([p]).item() == 0.0  # no .grad at all
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_grad_norm([p], 0.0).item() == 5.0 and torch.equal(p.grad, torch.tensor([3.0, 4.0, 0.0]))
    assert clip_grad_norm([p], 1.0).item() == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]))
