"""Composed layouts (parallel/parallelize.py): tensor x pipeline x data parallelism on one mesh,
each against a single process; and a whole run (`run_rank`) under pp x tp."""


import pytest

from layout_harness import check_layout
from plait_testing import logged
from trainer.launch.rank import run_rank


@pytest.mark.parametrize("layout", [
    ["parallel.tp=2", "parallel.dp_shard=2"],
    ["parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"],
    ["parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2", "parallel.sequence_parallel=true"],
    ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b",
     "parallel.microbatches=2"],
    ["parallel.pp=2", "parallel.dp_shard=2", "parallel.tp=2", "parallel.virtual_stages=2",
     "parallel.schedule=interleaved_1f1b", "parallel.microbatches=2"],
], ids=["tp2-dp2", "pp2-tp2", "pp2-tp2-sp", "pp2-hsdp2-interleaved", "pp2-dp2-tp2-interleaved-8-ranks"])
def test_layout_matches_single_process(tiny_cfg, run_ranks, layout):
    check_layout(tiny_cfg, run_ranks, *layout)


def test_whole_run_under_pipeline_and_tensor_parallel(tiny_cfg, tmp_path, run_ranks, capfd):
    """`run_rank` end to end on pp=2 x tp=2: rank 0 (first stage) logs the last stage's loss and the
    eval loss, equal to one process's; sampling is skipped with a note; a checkpoint is written."""
    common = ["model.n_layers=4", "trainer.max_steps=3", "trainer.eval_every=3"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_rank(tiny_cfg(*common, run_dir=single))
    capfd.readouterr()
    run_ranks(4, run_rank, tiny_cfg(*common, "parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2",
                                    run_dir=multi), init_pg=False)
    for key in ("loss", "eval/loss", "grad_norm"):
        ref, got = logged(single, key), logged(multi, key)
        assert sorted(got) == sorted(ref) and ref
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (key, step)
    assert (multi / "checkpoints" / "step_000000003" / "plait.json").exists()
    assert "sampling skipped" in capfd.readouterr().out


def test_resume_under_interleaved_pipeline_and_tensor_parallel(tiny_cfg, tmp_path, run_ranks):
    """A pp=2 x tp=2 interleaved run stopped at step 2 resumes bitwise on the same layout, and
    into one process within RTOL (the checkpoint reshards)."""
    layout = ["parallel.pp=2", "parallel.tp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b",
              "parallel.microbatches=2"]
    common = ["model.n_layers=4", "trainer.max_steps=4", "trainer.sample_tokens=0"]
    whole, part, single = tmp_path / "whole", tmp_path / "part", tmp_path / "single"
    run_ranks(4, run_rank, tiny_cfg(*common, *layout, run_dir=whole), init_pg=False)
    run_ranks(4, run_rank, tiny_cfg(*common, *layout, "checkpoint.every=2", "checkpoint.save_final=false",
                                    run_dir=part), init_pg=False)
    ckpt = part / "checkpoints" / "step_000000002"
    (part / "metrics.jsonl").write_text("")
    run_ranks(4, run_rank, tiny_cfg(*common, *layout, f"checkpoint.resume={ckpt}", run_dir=part), init_pg=False)
    run_rank(tiny_cfg(*common, f"checkpoint.resume={ckpt}", run_dir=single))
    ref, resumed, moved = logged(whole, "loss"), logged(part, "loss"), logged(single, "loss")
    assert sorted(resumed) == sorted(moved) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == ref[step]
        assert moved[step] == pytest.approx(ref[step], rel=1e-5)
