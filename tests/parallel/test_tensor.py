"""Tensor parallelism (parallel/tensor.py): every gradient and loss equal a single process's."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from layout_harness import check_layout
from parallel.mesh import ParallelDims, build_mesh
from parallel.tensor import FullLogits, apply_tp
from trainer.config import ModelConfig
from trainer.models import build_model
from trainer.models.llama import generate


@pytest.mark.parametrize("layout", [
    ["parallel.tp=2"],
    ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.tp=2", "model.tie_embeddings=true"],
], ids=["tp2", "tp2-sequence-parallel", "tp2-tied-embeddings"])
def test_tensor_parallel_matches_single_process(tiny_cfg, run_ranks, layout):
    check_layout(tiny_cfg, run_ranks, *layout)


CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)


def _sharded_and_sampled(sequence_parallel: bool):
    torch.manual_seed(0)
    model = build_model(CFG)
    mesh = build_mesh(ParallelDims(tp=2), "cpu")
    apply_tp(model, mesh["tp"], sequence_parallel=sequence_parallel)
    attn, ffn = model.layers["0"].attention, model.layers["0"].feed_forward
    shapes = {
        "wq": attn.wq.weight.to_local().shape, "wk": attn.wk.weight.to_local().shape,
        "wo": attn.wo.weight.to_local().shape, "w2": ffn.w2.weight.to_local().shape,
        "emb": model.tok_embeddings.weight.to_local().shape, "out": model.output.weight.to_local().shape,
    }
    logits = model(torch.arange(8).view(1, 8))
    assert isinstance(logits, DTensor) and logits.to_local().shape == (1, 8, CFG.vocab_size // 2)
    # odd lengths, which sequence parallelism cannot split over 2 ranks: padded on the right
    tokens = generate(FullLogits(model, pad_to=2 if sequence_parallel else 1).eval(),
                      torch.tensor([[3, 1, 4]]), 6, temperature=0)
    return shapes, tokens.tolist(), dist.get_rank()


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_plan_shards_heads_and_vocab_and_sampling_sees_whole_logits(run_ranks, sequence_parallel):
    results = run_ranks(2, _sharded_and_sampled, sequence_parallel)
    shapes, tokens, _ = results[0]
    hd = CFG.dim // CFG.n_heads
    assert shapes == {"wq": (2 * hd, 32), "wk": (1 * hd, 32), "wo": (32, 2 * hd), "w2": (32, 24),
                      "emb": (32, 32), "out": (32, 32)}
    torch.manual_seed(0)
    single = generate(build_model(CFG).eval(), torch.tensor([[3, 1, 4]]), 6, temperature=0)
    assert tokens == results[1][1] == single.tolist()
