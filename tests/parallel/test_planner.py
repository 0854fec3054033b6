"""Layout planner (parallel/planner/, trainer/plan_cli.py): formulas against hand counts and
against what autograd saves; the memory estimate against the measured peak of real training steps
(single process and forked gloo ranks) within 20%; the ranking and the `plait-plan` CLI.

Peak tensor memory on CPU is measured from the profiler's allocation events
(tests/parallel/tensor_memory.py): everything the run allocates is created inside the profile
(model, optimizer, pipeline stages), the first optimizer step creates AdamW's moments, and the
second step is the one measured: its peak is the steady state. The start-up peak (before the first
step) is measured and checked against the estimate in tests/parallel/test_parallel_init.py.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from layout_harness import BASE, build_loop, world_of
from tensor_memory import WINDOW, peak_in_window
from parallel import planner
from parallel.activation_checkpoint import apply_ac
from parallel.pipeline import split_model
from parallel.planner import (GiB, Hardware, Layout, Workload, bubble_fraction, dtypes, layer_activation_bytes,
                              memory_per_device, microbatches_in_flight, rank_layouts, stage_params, total_params)
from trainer.config import ConfigError, ModelConfig, check_combinations
from trainer.models import build_model, num_params
from trainer.models.llama import TransformerBlock, flops_per_token, rope_cos_sin
from trainer import plan_cli

TOLERANCE = 0.20  # the goal: the estimate within 20% of the measured peak
CPU = Hardware(optimizer_foreach=False)  # torch's AdamW on CPU updates one tensor at a time


# --- measuring ---------------------------------------------------------------------------------

def measure_peak(cfg_dict: dict) -> tuple[int, int]:
    """(pp rank, peak tensor bytes of the second training step) of this rank under the layout."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loop, mesh = build_loop(cfg_dict)
        loop.train_step()
        with record_function(WINDOW):
            loop.train_step()
    pp_rank = mesh["pp"].get_local_rank() if mesh is not None else 0
    return pp_rank, peak_in_window(prof)


def test_measure_counts_live_tensor_bytes():
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        keep = torch.empty(1 << 18, dtype=torch.uint8)
        with record_function(WINDOW):
            a = torch.empty(1 << 20, dtype=torch.uint8)
            b = torch.empty(1 << 19, dtype=torch.uint8)
            del a
            c = torch.empty(1 << 18, dtype=torch.uint8)
            del b, c
    assert peak_in_window(prof) == (1 << 18) + (1 << 20) + (1 << 19)
    del keep


# --- formulas against hand counts --------------------------------------------------------------

TINY = ModelConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


@pytest.mark.parametrize("name", ["llama_tiny", "llama_1b", "llama_8b"])
def test_parameter_count_matches_the_model(name):
    cfg = plan_cli.load_model(name, None)
    assert total_params(cfg) == num_params(build_model(cfg, device="meta"))


def test_stage_params_match_split_and_tensor_shards():
    # by hand: block = wq 64·64 + wk, wv 64·32 each + wo 64·64 + w1, w2, w3 64·128 each + 2 norms
    block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert stage_params(TINY, 1, 1).total == 4 * block + 512 * 64 * 2 + 64 == total_params(TINY)
    model = build_model(TINY, device="meta")
    for pp, v in ((2, 1), (2, 2), (4, 1)):
        for rank in range(pp):
            chunks = [split_model(model, rank + k * pp, pp * v) for k in range(v)]
            assert stage_params(TINY, pp, 1, v, rank).total == sum(num_params(c) for c in chunks), (pp, v, rank)
    # tp=2: matrices and the (vocabulary-parallel) embedding and output halve, norms are replicated
    assert stage_params(TINY, 1, 2).total == 4 * ((block - 128) // 2 + 128) + 512 * 64 + 64


def test_state_bytes_per_parameter():
    # fp32 params + fp32 grads + two fp32 AdamW moments = 16 bytes, all sharded by FSDP
    assert planner.weight_bytes(10, 1, False) + planner.grad_bytes(10, 1, False) \
        + planner.optimizer_bytes(10, 1, False) == 160
    assert planner.weight_bytes(10, 2, True) + planner.grad_bytes(10, 2, True) \
        + planner.optimizer_bytes(10, 2, True) == 80
    assert planner.ddp_bucket_bytes(10, True) == 40


def _saved_by_one_block(precision: str) -> int:
    """Bytes autograd keeps for one TransformerBlock's backward (distinct storages, weights excluded)."""
    torch.manual_seed(0)
    block = TransformerBlock(TINY)
    if precision == "bf16-params":  # what FSDP2's bf16 mixed precision runs: bf16 weights and inputs
        block = block.to(torch.bfloat16)
    dtype = torch.bfloat16 if precision == "bf16-params" else torch.float32
    x = torch.randn(8, 32, 64, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(16, 64, 10000.0)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()} | \
        {t.untyped_storage().data_ptr() for t in (cos, sin)}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        block(x, cos, sin)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-params"])
def test_layer_activations_equal_what_autograd_saves(precision):
    s, b, h, f, a = 32, 8, 64, 128, 4
    sbh, sbf, sb = s * b * h, s * b * f, s * b
    dt = dtypes("fp32" if precision == "fp32" else "bf16", fsdp=precision == "bf16-params")
    expected = {  # the module docstring's per-layer counts, by hand
        "fp32": 40 * sbh + 16 * sbf + (8 + 4 * a) * sb,
        "bf16-autocast": 34 * sbh + 8 * sbf + (8 + 4 * a) * sb,
        "bf16-params": 28 * sbh + 8 * sbf + (8 + 4 * a) * sb,
    }[precision]
    assert layer_activation_bytes(s, b, TINY, dt=dt) == expected
    matrices = planner.block_params(TINY)[0]
    assert _saved_by_one_block(precision) == expected + dt.weight_copy * matrices  # autocast's bf16 weights


def test_recomputation_keeps_only_block_inputs():
    sbh = 32 * 8 * 64
    assert layer_activation_bytes(32, 8, TINY, ac="full") == 4 * sbh
    assert layer_activation_bytes(32, 8, TINY, t=2, sp=True, ac="full") == 4 * sbh / 2
    assert layer_activation_bytes(32, 8, TINY, ac="selective") < layer_activation_bytes(32, 8, TINY) / 1.5
    # what apply_ac actually keeps: fewer saved bytes in the same order
    model = build_model(TINY)
    apply_ac(model, "full")
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model.layers.values())


def test_schedules_in_flight_and_bubble():
    assert microbatches_in_flight("gpipe", 4, 1, 8, 0) == 8
    assert [microbatches_in_flight("1f1b", 4, 1, 8, r) for r in range(4)] == [4, 3, 2, 1]
    # interleaved: Megatron's first stage holds v·p + p - 1 chunk-microbatches (Korthikanti et al.
    # §4.2.3: p microbatches of its layers x (1 + (p-1)/(p·v))), never more than all m·v of them
    assert microbatches_in_flight("interleaved_1f1b", 4, 2, 8, 0) == 2 * 4 + 4 - 1
    assert microbatches_in_flight("interleaved_1f1b", 4, 2, 4, 0) == 4 * 2
    assert microbatches_in_flight("interleaved_1f1b", 4, 2, 8, 3) == 4 + 1
    assert bubble_fraction("1f1b", 4, 1, 8) == bubble_fraction("gpipe", 4, 1, 8) == 3 / 8
    assert bubble_fraction("interleaved_1f1b", 4, 2, 8) == 3 / 16
    # the 0.864: interleaved v=2 over 1f1b step time at p=4, m=8 (m + (p-1)/v units per step)
    assert (1 + 3 / 16) / (1 + 3 / 8) == pytest.approx(0.864, abs=5e-4)
    assert bubble_fraction("1f1b", 1, 1, 8) == 0


# --- the estimate against measured peaks -------------------------------------------------------

SHAPES = {  # the layout tests' tiny model (BASE: 4 layers), and a wider one with a larger vocabulary
    "tiny": [],
    "wide": ["model.vocab_size=2048", "model.dim=128", "model.ffn_dim=352", "data.seq_len=64",
             "model.max_seq_len=128", "trainer.batch_size=4"],
}
LAYOUTS = [
    ("tiny", []),
    ("tiny", ["trainer.precision=bf16"]),
    ("tiny", ["parallel.activation_checkpoint=full"]),
    ("tiny", ["parallel.activation_checkpoint=selective", "trainer.precision=bf16"]),
    ("tiny", ["trainer.grad_accum=2"]),
    ("wide", []),
    ("tiny", ["parallel.dp_shard=2"]),
    ("wide", ["parallel.dp_shard=2", "trainer.precision=bf16", "parallel.activation_checkpoint=full"]),
    ("tiny", ["parallel.dp_shard=2", "parallel.dp_backend=ddp"]),
    ("tiny", ["parallel.tp=2"]),
    ("wide", ["parallel.tp=2", "parallel.sequence_parallel=true", "trainer.precision=bf16"]),
    ("tiny", ["parallel.pp=2", "parallel.microbatches=2"]),
    ("wide", ["parallel.pp=2", "parallel.microbatches=2", "parallel.schedule=gpipe", "trainer.precision=bf16"]),
    ("tiny", ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b",
              "parallel.microbatches=4"]),
    ("tiny", ["parallel.tp=2", "parallel.dp_shard=2"]),
    # Plait sizes ZeRO's buckets to the model (DeepSpeed's 5e8-element default is a 2 GB buffer);
    # DeepSpeed is a dev dependency here: a layout it cannot run fails, it is not skipped
    ("tiny", ["parallel.dp_shard=2", "parallel.dp_backend=deepspeed", "parallel.zero_stage=3"]),
]


def _estimate(cfg: dict, pp_rank: int):
    model = ModelConfig(**cfg["model"])
    fields = {f.name for f in dataclasses.fields(Layout)}
    layout = Layout(**{k: v for k, v in cfg["parallel"].items() if k in fields},
                    grad_accum=cfg["trainer"]["grad_accum"])
    work = Workload(cfg["data"]["seq_len"], cfg["trainer"]["batch_size"], cfg["trainer"]["precision"])
    return memory_per_device(model, layout, work, CPU, pp_rank)


@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=[f"{s}:{' '.join(o) or 'single'}" for s, o in LAYOUTS])
def test_estimate_within_20_percent_of_measured_peak(tiny_cfg, run_ranks, shape, layout):
    """Every rank's measured peak within TOLERANCE of the estimate (pytest -s prints each pair)."""
    cfg = tiny_cfg(*BASE, *SHAPES[shape], *layout)
    world = world_of(layout)
    measured = [measure_peak(cfg)] if world == 1 else run_ranks(world, measure_peak, cfg)
    for rank, (pp_rank, peak) in enumerate(measured):
        est = _estimate(cfg, pp_rank)
        print(f"{shape} {' '.join(layout) or 'single process'} rank {rank}: measured {peak / 2**20:.3f} MiB, "
              f"estimate {est.peak / 2**20:.3f} MiB ({est.peak / peak - 1:+.1%}, {est.phase})")
        assert abs(est.peak / peak - 1) <= TOLERANCE, (rank, peak, est)


# --- ranking and the CLI -----------------------------------------------------------------------

def test_ranked_layouts_pass_the_config_checks_and_fit_first():
    model = plan_cli.load_model("llama_1b", None)
    work = Workload(4096, 64, "bf16")
    hw = Hardware(gpus_per_node=8, memory_bytes=40 * GiB)
    from collections import Counter

    rejected: Counter = Counter()
    plans = rank_layouts(model, 16, work, hw, flops_per_token(model, 4096),
                         plan_cli.layout_checker(model, work, 16, rejected))
    assert plans and rejected  # llama_1b ties its embeddings: every pp > 1 layout is refused
    fits = [p.fits for p in plans]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)
    times = [p.time.total for p in plans if p.fits]
    assert times == sorted(times)
    for p in plans[:50]:
        lay = p.layout
        assert lay.world_size == 16 and lay.tp <= 8 and lay.pp == 1
        check_combinations(plan_cli.plait_config(model, lay, work), 16)  # does not raise
        assert p.fits == (max(p.memory.peak, p.memory.startup) <= 0.9 * 40 * GiB)
        assert 0 < p.memory.startup < p.memory.peak  # FSDP/TP shards + one whole parameter
    with pytest.raises(ConfigError):  # the checker and `plait` agree on a refused layout
        check_combinations(plan_cli.plait_config(model, Layout(pp=2, dp_shard=8, microbatches=2), work), 16)


def test_cli_prints_a_table_and_json(capsys):
    argv = ["--model", "llama_8b", "--devices", "64", "--gpus-per-node", "8", "--memory-gb", "80",
            "--seq-len", "8192", "--batch-size", "512", "--precision", "bf16", "--microbatch-sizes", "1"]
    plan_cli.main(argv + ["--top", "5"])
    out = capsys.readouterr().out
    assert "llama_8b" in out and "layout" in out and "bubble" in out and "peak" in out and "start" in out
    assert len(re.findall(r"(?m)^\s*\d+\s+tp=\d", out)) == 5
    plan_cli.main(argv + ["--json", "--top", "3"])
    data = json.loads(capsys.readouterr().out)
    assert data["fit"] > 0 and len(data["plans"]) == 3
    best = data["plans"][0]
    assert best["fits"] and best["layout"]["tp"] <= 8
    assert set(best["memory_gib"]) >= {"params", "grads", "optimizer", "activations", "other", "peak", "startup"}


def test_cli_model_from_a_yaml_file(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text("name: mine\nvocab_size: 1024\ndim: 256\nn_layers: 8\nn_heads: 8\nn_kv_heads: 4\n"
                    "ffn_dim: 512\nmax_seq_len: 512\n")
    plan_cli.main(["--model-config", str(path), "--devices", "4", "--memory-gb", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["name"] == "mine" and data["workload"]["seq_len"] == 512 and data["plans"]


@pytest.mark.parametrize("argv,says", [
    (["--model", "llama_99b", "--devices", "8"], "unknown model"),
    (["--devices", "12", "--gpus-per-node", "8"], "not divisible"),
    (["--devices", "8", "--memory-gb", "0"], "must be > 0"),
    (["--devices", "0"], "must be >= 1"),
    (["--devices", "8", "--seq-len", "4096"], "exceeds model.max_seq_len"),
    (["--devices", "8", "--batch-size", "3", "--microbatch-sizes", "2"], "no valid layout"),
    (["--model-config", "/nonexistent.yaml", "--devices", "8"], "no such file"),
])
def test_cli_bad_input_exits_2(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_:
        plan_cli.main(argv)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("plait-plan") == "trainer.plan_cli:main"
