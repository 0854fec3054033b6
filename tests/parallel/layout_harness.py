"""Shared by the tests of parallel/: train a few steps under a layout through the real loop and
collect, per optimizer step, the global loss and every full gradient keyed by its FQN.

`steps(cfg_dict)` runs in each forked rank (or in the test process for the single-process
reference); `merge` joins what the ranks of a pipeline return; `assert_same` compares.
"""

from __future__ import annotations

from typing import Iterator

import torch

from parallel.activation_checkpoint import unwrapped_fqn
from parallel.mesh import build_mesh, dp_coords
from parallel.parallelize import parallelize
from parallel.tensor import tp_loss_context
from trainer.config import validate
from trainer.loop import LoopParts, TrainLoop
from trainer.models import build_model
from trainer.models.loss import cross_entropy_loss
from trainer.optim import build_optimizer, build_scheduler
from trainer.pretrain import parallel_dims
from trainer.checkpoint.state import ModelState, OptimizerState, Progress

RTOL = 1e-5
# 4 layers so pipelines have chunks to cut. Adam's first steps move each weight by ~lr * g/(|g|+eps):
# for gradient entries at fp32's noise floor the default eps=1e-8 turns summation-order noise into
# O(lr) weight differences, which later steps compare as gradient differences of ~1e-5; a larger
# eps keeps the comparison about the layout (grads before any update agree to ~5e-7 either way).
BASE = ("model.n_layers=4", "optim.warmup_steps=1", "optim.eps=1e-5")
_references: dict = {}


def batches(cfg, dp_rank: int, dp_size: int, seed: int = 1) -> Iterator:
    """Deterministic token batches: every optimizer step draws one global batch; data-parallel rank r
    takes its share of each grad-accumulation micro-step (the same rows overall as one process)."""
    t, seq, vocab = cfg.trainer, cfg.data.seq_len, cfg.model.vocab_size
    local = t.batch_size // (dp_size * t.grad_accum)
    gen = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, vocab, (t.batch_size, seq + 1), generator=gen)
        for micro in range(t.grad_accum):
            start = (micro * dp_size + dp_rank) * local
            chunk = rows[start:start + local]
            yield chunk[:, :-1], chunk[:, 1:]


def full_grads(parts) -> dict[str, torch.Tensor]:
    out = {}
    for part in parts:
        for name, p in part.named_parameters():
            if p.grad is not None:
                g = p.grad
                g = g.full_tensor() if hasattr(g, "full_tensor") else g
                # numpy, not tensors: torch would pass tensors between processes as shared-memory
                # handles that die with the rank
                out[unwrapped_fqn(name)] = g.detach().numpy().copy()
    return out


def build_loop(cfg_dict: dict) -> tuple[TrainLoop, object]:
    """The real loop under the layout `cfg_dict` names, on `batches` data; (loop, mesh)."""
    cfg = validate(cfg_dict)
    torch.manual_seed(cfg.seed)
    dims = parallel_dims(cfg)
    mesh = build_mesh(dims, "cpu")
    dp_rank, dp_size = dp_coords(mesh)
    model = build_model(cfg.model, device="meta")  # as trainer/pretrain.py: each rank allocates its shards
    model, parts, pipeline = parallelize(model, mesh, cfg.parallel, cfg.trainer.precision,
                                         loss_fn=cross_entropy_loss, device="cpu", seed=cfg.seed)
    optimizer = build_optimizer(parts, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    engine, model_state, optimizer_state = None, ModelState(parts), OptimizerState(parts, optimizer)
    if cfg.parallel.dp_backend == "deepspeed" and dims.dp > 1:  # as trainer/pretrain.py does
        from parallel.deepspeed_zero import apply_deepspeed

        engine, model_state, optimizer_state = apply_deepspeed(
            model, optimizer, scheduler, mesh["dp"], cfg.parallel.zero_stage,
            micro_batch_size=cfg.trainer.batch_size // (dims.dp * cfg.trainer.grad_accum),
            grad_accum=cfg.trainer.grad_accum, grad_clip=cfg.optim.grad_clip,
            bf16_autocast=cfg.trainer.precision == "bf16")
        model = engine
    loop = TrainLoop(
        cfg,
        LoopParts(
            model=model, parts=parts, optimizer=optimizer, scheduler=scheduler, engine=engine,
            train=batches(cfg, dp_rank, dp_size), make_val=lambda: batches(cfg, dp_rank, dp_size, seed=2),
            loss_fn=cross_entropy_loss, sample_fn=None, flops_per_token=1.0, peak_flops=1.0,
            dp_group=mesh["dp"].get_group() if mesh is not None else None, checkpointer=None,
            components={"model": model_state, "optimizer": optimizer_state}, pipeline=pipeline,
            pp_group=mesh["pp"].get_group() if dims.pp > 1 else None,
            loss_context=lambda: tp_loss_context(dims.tp > 1),
        ),
        torch.device("cpu"), Progress(), None, dims.world_size,
    )
    return loop, mesh


def steps(cfg_dict: dict, n_steps: int = 3, eval_too: bool = False) -> dict:
    """[(loss, grad norm, {fqn: grad}), ...] per optimizer step (grads after clipping), and the
    eval loss after them."""
    loop, _ = build_loop(cfg_dict)
    history = []
    for _ in range(n_steps):
        loss, norm, _ = loop.train_step()
        history.append((loop._mean_over_dp(loss), norm.item(), full_grads(loop.p.parts)))
    out = {"steps": history}
    if eval_too:
        out["eval"] = loop.evaluate()
    return out


def merge(results: list[dict]) -> dict:
    """One rank's view per pipeline stage → the whole model's grads (ranks holding the same
    parameter must agree exactly: replicas of one shard)."""
    merged = {"steps": [], "eval": results[0].get("eval")}
    for i, (loss, norm, _) in enumerate(results[0]["steps"]):
        grads: dict[str, torch.Tensor] = {}
        for r, res in enumerate(results):
            r_loss, r_norm, r_grads = res["steps"][i]
            assert r_loss == loss and r_norm == norm, (i, r, r_loss, loss, r_norm, norm)
            for k, g in r_grads.items():
                g = torch.from_numpy(g)
                if k in grads:
                    torch.testing.assert_close(g, grads[k], rtol=0, atol=0, msg=f"rank {r} {k}")
                grads[k] = g
        merged["steps"].append((loss, norm, grads))
    for r, res in enumerate(results):
        assert res.get("eval") == merged["eval"], (r, res.get("eval"), merged["eval"])
    return merged


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same(got: dict, ref: dict, rtol: float = RTOL) -> None:
    """Loss and grad norm of every step within `rtol`; every gradient within `rtol` (norm-relative)."""
    assert len(got["steps"]) == len(ref["steps"])
    for i, ((loss, norm, grads), (r_loss, r_norm, r_grads)) in enumerate(zip(got["steps"], ref["steps"])):
        assert abs(loss - r_loss) <= rtol * abs(r_loss), (i, loss, r_loss)
        assert abs(norm - r_norm) <= rtol * abs(r_norm), (i, norm, r_norm)
        assert set(grads) == set(r_grads), sorted(set(grads) ^ set(r_grads))
        worst = max((rel_err(grads[k], r_grads[k]), k) for k in r_grads)
        assert worst[0] <= rtol, (i, worst)
    if ref.get("eval") is not None:
        assert abs(got["eval"] - ref["eval"]) <= rtol * abs(ref["eval"]), (got["eval"], ref["eval"])


def run_layout(run_ranks, cfg_dict: dict, world: int, eval_too: bool = False) -> dict:
    return merge(run_ranks(world, steps, cfg_dict, 3, eval_too))


def world_of(overrides) -> int:
    world = 1
    for o in overrides:
        key, _, value = o.partition("=")
        if key in ("parallel.pp", "parallel.tp", "parallel.dp_shard", "parallel.dp_replicate"):
            world *= int(value)
    return world


def reference(tiny_cfg, overrides) -> dict:
    """The single-process run of the same model, data and optimizer (parallel.* dropped), cached."""
    same = tuple(o for o in overrides if not o.startswith("parallel."))
    if same not in _references:
        _references[same] = merge([steps(tiny_cfg(*BASE, *same), 3, True)])
    return _references[same]


def check_layout(tiny_cfg, run_ranks, *overrides: str) -> dict:
    """Loss, grad norm and every gradient of 3 optimizer steps, and the eval loss, under the layout
    `overrides` equal a single process's within RTOL."""
    got = run_layout(run_ranks, tiny_cfg(*BASE, *overrides), world_of(overrides), eval_too=True)
    assert_same(got, reference(tiny_cfg, overrides))
    return got


def report(got: dict, ref: dict) -> list[tuple[float, float, float, str]]:
    """Per step: (loss rel. error, grad-norm rel. error, worst gradient rel. error, its FQN)."""
    out = []
    for (loss, norm, grads), (r_loss, r_norm, r_grads) in zip(got["steps"], ref["steps"]):
        worst = max((rel_err(grads[k], r_grads[k]), k) for k in r_grads)
        out.append((abs(loss - r_loss) / abs(r_loss), abs(norm - r_norm) / abs(r_norm), *worst))
    return out
