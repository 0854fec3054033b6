"""End-to-end pretraining: loss falls, data-parallel layouts match one process, resume is exact."""

import json

import pytest

from plait_testing import logged as losses
from trainer.launch.rank import run_rank


def test_single_process_trains_and_checkpoints(tiny_cfg, tmp_path):
    run = tmp_path / "single"
    run_rank(tiny_cfg("trainer.max_steps=12", "trainer.eval_every=6", "optim.lr=1e-2", run_dir=run))
    got = losses(run)
    assert sorted(got) == list(range(1, 13))
    assert got[12] < got[1] - 0.5
    evals = [json.loads(l)["eval/loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if "eval/loss" in l]
    assert len(evals) == 3 and evals[-1] < evals[0]
    manifest = json.loads((run / "checkpoints" / "step_000000012" / "plait.json").read_text())
    assert manifest["counters"]["step"] == 12 and manifest["task"] == "pretrain"
    assert set(manifest["components"]) == {"model", "optimizer", "lr_scheduler", "data", "rng", "progress"}
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000000012"


def test_resume_continues_bitwise(tiny_cfg, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_rank(tiny_cfg("trainer.max_steps=8", run_dir=whole))
    run_rank(tiny_cfg("trainer.max_steps=8", "checkpoint.every=4", "checkpoint.save_final=false", run_dir=part))
    # Drop what the first run logged after its step-4 checkpoint, then resume from it.
    first = losses(part)
    (part / "metrics.jsonl").write_text("")
    ckpt = part / "checkpoints" / "step_000000004"
    run_rank(tiny_cfg("trainer.max_steps=8", f"checkpoint.resume={ckpt}", run_dir=part))
    resumed = losses(part)
    assert sorted(resumed) == [5, 6, 7, 8]
    reference = losses(whole)
    for step in range(5, 9):
        assert resumed[step] == reference[step] == first[step]


@pytest.mark.parametrize("layout", [
    ["parallel.dp_shard=2"],
    ["parallel.dp_shard=2", "parallel.dp_backend=ddp"],
    ["parallel.dp_shard=2", "trainer.grad_accum=2"],
])
def test_data_parallel_matches_single_process(tiny_cfg, tmp_path, run_ranks, layout):
    single, multi = tmp_path / "single", tmp_path / "multi"
    accum = [o for o in layout if "grad_accum" in o]
    run_rank(tiny_cfg("trainer.max_steps=3", *accum, run_dir=single))
    run_ranks(2, run_rank, tiny_cfg("trainer.max_steps=3", *layout, run_dir=multi), init_pg=False)
    ref, got = losses(single), losses(multi)
    assert sorted(got) == [1, 2, 3]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5)


def test_bf16_autocast_and_grad_accumulation_train(tiny_cfg, tmp_path):
    run = tmp_path / "bf16"
    run_rank(tiny_cfg("trainer.max_steps=6", "trainer.precision=bf16", "trainer.grad_accum=2",
                      "optim.lr=1e-2", run_dir=run))
    got = losses(run)
    assert sorted(got) == list(range(1, 7)) and got[6] < got[1]
