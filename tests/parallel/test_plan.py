"""Plans kept with the models (parallel/plan.py): parallel/ shards, splits and checkpoints whatever a
model declares, so a Llama with a scalar value head (a critic) runs under tp x dp_shard and pp, a
peft-LoRA-wrapped Llama under FSDP2 and DDP, and a family parallel/ never saw under its own TP plan,
each against one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel.mesh import build_mesh
from parallel.parallelize import parallelize
from parallel.pipeline import split_model
from parallel.plan import StageStructure, TensorParallelPlan, blocks_of, plan_holder, structure_of, tp_plan_of
from parallel.planner import Layout
from trainer.config import ModelConfig
from trainer.models import build_model, cross_entropy_loss, value_loss

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
VALUE = ModelConfig(**{**CFG.__dict__, "name": "llama_value"})
BATCH, SEQ = 4, 16
RTOL = 1e-6


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=gen)
    returns = torch.randn(BATCH, SEQ, generator=gen)
    return tokens, returns


def _dp_slice(mesh, x: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's rows of the global batch."""
    if mesh is None:
        return x
    dp = mesh["dp"]
    rows = x.shape[0] // dp.size()
    return x[dp.get_local_rank() * rows:(dp.get_local_rank() + 1) * rows]


def _loss_and_grads(model: nn.Module, mesh, loss: torch.Tensor) -> tuple[float, dict[str, np.ndarray]]:
    """The global mean loss (mean of the data-parallel ranks' equal-sized shares) and every full gradient."""
    loss.backward()
    value = loss.detach().clone()
    if mesh is not None:
        dist.all_reduce(value, group=mesh["dp"].get_group())
        value /= mesh["dp"].size()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().numpy().copy()
    return value.item(), grads


def value_step(layout: Layout) -> tuple[float, dict[str, np.ndarray]]:
    """One forward/backward of the value model's regression loss under `layout` (meta build, parallelize)."""
    mesh = build_mesh(layout, "cpu") if layout.world_size > 1 else None
    model, _, _ = parallelize(build_model(VALUE, device="meta"), mesh, layout, device="cpu", seed=7)
    tokens, returns = _batch()
    values = model(_dp_slice(mesh, tokens)[:, :-1])
    assert values.shape == (BATCH // (layout.dp if mesh else 1), SEQ) and not hasattr(values, "full_tensor")
    return _loss_and_grads(model, mesh, value_loss(values, _dp_slice(mesh, returns)))


def assert_close(got, ref, rtol: float = RTOL) -> None:
    (loss, grads), (r_loss, r_grads) = got, ref
    assert abs(loss - r_loss) <= rtol * abs(r_loss), (loss, r_loss)
    assert grads.keys() == r_grads.keys(), sorted(grads.keys() ^ r_grads.keys())
    for k in r_grads:
        err = np.linalg.norm(grads[k] - r_grads[k]) / max(np.linalg.norm(r_grads[k]), 1e-30)
        assert err <= rtol, (k, err)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2-fsdp2", "tp2-sp-fsdp2"])
def test_value_head_model_under_tp_and_fsdp_matches_one_process(run_ranks, sequence_parallel):
    layout = Layout(tp=2, dp_shard=2, sequence_parallel=sequence_parallel)
    ref = value_step(Layout())
    assert "value_head.weight" in ref[1] and "output.weight" not in ref[1]
    results = run_ranks(4, value_step, layout)
    for got in results:
        assert_close(got, ref)


def _lora_model():
    """A tiny Plait Llama (seed 0) with LoRA adapters on its attention projections (peft), random B
    too (init_lora_weights=False) so every adapter gets a gradient at the first step."""
    from peft import LoraConfig, get_peft_model

    base = build_model(CFG, seed=0)
    torch.manual_seed(1)  # peft draws the adapters from the global generator: the same on every rank
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                           target_modules=["wq", "wk", "wv", "wo"]))


def lora_step(layout: Layout) -> tuple[float, dict[str, np.ndarray]]:
    mesh = build_mesh(layout, "cpu") if layout.world_size > 1 else None
    model, parts, _ = parallelize(_lora_model(), mesh, layout)
    tokens, _ = _batch()
    local = _dp_slice(mesh, tokens)
    return _loss_and_grads(parts[0], mesh, cross_entropy_loss(model(local[:, :-1]), local[:, 1:]))


@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_lora_model_data_parallel_trains_only_adapters_as_one_process(run_ranks, backend):
    pytest.importorskip("peft")
    ref = lora_step(Layout())
    assert ref[1] and all("lora_A" in k or "lora_B" in k for k in ref[1])
    assert len(ref[1]) == 2 * 4 * CFG.n_layers  # A and B of 4 projections per block
    results = run_ranks(2, lora_step, Layout(dp_shard=2, dp_backend=backend))
    for got in results:
        assert_close(got, ref)


def value_pipeline_step(layout: Layout) -> tuple[float, dict[str, np.ndarray]]:
    """One pipelined step of the value model: its stage structure puts the value head on the last stage."""
    mesh = build_mesh(layout, "cpu")
    _, parts, pipeline = parallelize(build_model(VALUE, device="meta"), mesh, layout, loss_fn=value_loss,
                                     device="cpu", seed=7)
    tokens, returns = _batch()
    loss = pipeline.step(tokens[:, :-1], returns)
    dist.all_reduce(loss, group=mesh["pp"].get_group())  # the last stage's loss, 0 elsewhere
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).numpy().copy()
             for n, p in parts[0].named_parameters() if p.grad is not None}
    return loss.item(), grads


def test_value_head_model_under_pipeline_matches_one_process(run_ranks):
    ref = value_step(Layout())
    first, last = run_ranks(2, value_pipeline_step, Layout(pp=2, microbatches=2))
    assert "tok_embeddings.weight" in first[1] and "value_head.weight" in last[1]
    assert_close((first[0], {**first[1], **last[1]}), ref)


def _peft_refused(layout: Layout) -> str:
    mesh = build_mesh(layout, "cpu")
    with pytest.raises(ValueError) as err:
        parallelize(_lora_model(), mesh, layout)
    return str(err.value)


def test_lora_model_under_tp_is_refused_with_the_reason(run_ranks):
    pytest.importorskip("peft")
    message = run_ranks(2, _peft_refused, Layout(tp=2))[0]
    assert "parallel.tp=2" in message and "wrapped model" in message and "data-parallel only" in message


# --- the plan a model declares ------------------------------------------------------------------

def test_plan_lookup_reaches_through_a_peft_wrapper():
    pytest.importorskip("peft")
    model = _lora_model()
    holder = plan_holder(model)
    assert type(holder).__name__ == "Llama" and holder is model.get_base_model()
    assert list(blocks_of(model)) == ["0", "1"] and structure_of(model).last == ("norm", "output")


def test_value_model_declares_its_own_head():
    model = build_model(VALUE, device="meta")
    assert structure_of(model) == StageStructure("layers", ("tok_embeddings",), ("norm", "value_head"))
    assert "value_head" not in tp_plan_of(model, False).root  # replicated: one output unit
    assert "value_head" in tp_plan_of(model, True).root  # gathers the sequence shard first
    last = split_model(model, 1, 2)
    assert last.value_head is not None and last.tok_embeddings is None and list(last.layers) == ["1"]


class Mlp(nn.Module):
    """A model family parallel/ has never heard of: its own block list, ends and plan."""

    stage_structure = StageStructure(blocks="stack", first=("inp",), last=("out",))

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.stack = nn.ModuleDict({str(i): nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for i in range(4)})
        self.out = nn.Linear(8, 2)

    def tp_plan(self, sequence_parallel: bool) -> TensorParallelPlan:
        """Hidden units of `inp` and of each block's first Linear split over the tp ranks."""
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return TensorParallelPlan(root={"inp": ColwiseParallel(output_layouts=Replicate())},
                                  block={"0": ColwiseParallel(output_layouts=Replicate())})

    def forward(self, x):
        x = self.inp(x) if self.inp is not None else x
        for block in self.stack.values():
            x = block(x)
        return self.out(x) if self.out is not None else x


def test_split_follows_the_declared_structure_and_copies_only_the_chunk():
    model = Mlp()
    parts = [split_model(model, c, 3) for c in range(3)]
    assert [list(p.stack) for p in parts] == [["0", "1"], ["2"], ["3"]]
    assert parts[0].out is None and parts[1].inp is None and parts[1].out is None and parts[2].inp is None
    x = torch.randn(3, 4)
    h = x
    for p in parts:
        h = p(h)
    torch.testing.assert_close(h, model(x), rtol=0, atol=0)
    whole = {id(p) for p in model.parameters()}
    assert not any(id(p) in whole for part in parts for p in part.parameters())  # copies, not shared
    # what a chunk does not keep is not copied: its parameters are exactly the chunk's own
    assert sum(p.numel() for part in parts for p in part.parameters()) == sum(p.numel() for p in model.parameters())


def _mlp_step(layout: Layout) -> tuple[list, dict[str, np.ndarray]]:
    mesh = build_mesh(layout, "cpu") if layout.world_size > 1 else None
    torch.manual_seed(0)
    model, _, _ = parallelize(Mlp(), mesh, layout)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    out = model(x)
    out.square().sum().backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).numpy().copy()
             for n, p in model.named_parameters()}
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    return out.detach().numpy().tolist(), grads, kinds


def test_a_new_family_is_tensor_parallel_by_its_own_plan(run_ranks):
    out, ref, _ = _mlp_step(Layout())
    for got_out, grads, kinds in run_ranks(2, _mlp_step, Layout(tp=2)):
        assert kinds == ["DTensor", "Parameter"]  # its plan shards some weights, not others
        np.testing.assert_allclose(got_out, out, rtol=1e-6)
        for k in ref:
            np.testing.assert_allclose(grads[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
