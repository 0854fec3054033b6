"""DeepSpeed ZeRO-1/2/3 as parallel.dp_backend=deepspeed (parallel/deepspeed_zero.py): each stage on
2 ranks against one process (loss, grad norm and every gradient of 3 steps, eval loss, lr),
gradient accumulation, bf16 against DDP's, a whole run through trainer/pretrain.py, checkpoints in
the one format (ZeRO -> one process and FSDP2 exactly, ZeRO -> ZeRO bitwise, one process -> ZeRO),
and the layouts it refuses."""

import importlib
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from layout_harness import BASE, assert_same, build_loop, merge, reference, steps
from parallel.activation_checkpoint import unwrapped_fqn
from trainer.checkpoint import Checkpointer, stored_keys
from trainer.config import ConfigError
from trainer.launch.rank import run_rank
from trainer.optim import lr_factor

ZERO = ("parallel.dp_shard=2", "parallel.dp_backend=deepspeed")


@pytest.fixture(scope="module")
def deepspeed_imported():
    """Import DeepSpeed once in this process: forked ranks inherit it instead of paying ~7 s each
    (and `deepspeed.initialize` imports torch's inductor through its Muon optimizer: ~5 s more)."""
    ds = pytest.importorskip("deepspeed")
    try:
        importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
    except ImportError:  # another DeepSpeed version: only slower
        pass
    return ds


def zero_steps(cfg_dict: dict, n_steps: int = 3) -> dict:
    """layout_harness.steps under ZeRO: each step's full gradients are gathered at the accumulation
    boundary, just before the engine's step() clips and frees them, then clipped as it does."""
    from deepspeed.utils import safe_get_full_grad

    world = dist.group.WORLD
    loop, _ = build_loop(cfg_dict)
    engine, clip = loop.p.engine, loop.cfg.optim.grad_clip
    captured = []
    step = engine.step

    def gather_then_step():
        if engine.is_gradient_accumulation_boundary():
            captured.append({unwrapped_fqn(n): safe_get_full_grad(p).detach().clone()
                             for n, p in engine.module.named_parameters()})
        step()

    engine.step = gather_then_step
    history = []
    for _ in range(n_steps):
        loss, norm, _ = loop.train_step()
        scale = min(1.0, clip / (norm.item() + 1e-6)) if clip > 0 else 1.0
        history.append((loop._mean_over_dp(loss), norm.item(),
                        {k: (g * scale).numpy() for k, g in captured.pop().items()}))
    from deepspeed.comm import comm

    # DeepSpeed joined the process group that was up (no second one), without its shm op
    assert dist.group.WORLD is world and comm.cdb.shm_comm_op is None
    # Plait's schedule, stepped once per optimizer step (not per micro-batch), sets the lr applied
    o = loop.cfg.optim
    lr = o.lr * lr_factor(n_steps, o.warmup_steps, loop.cfg.trainer.max_steps, o.schedule, o.min_lr_ratio)
    assert [g["lr"] for g in loop.p.optimizer.param_groups] == [lr, lr]
    return {"steps": history, "eval": loop.evaluate()}


@pytest.mark.usefixtures("deepspeed_imported")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_single_process(tiny_cfg, run_ranks, stage):
    overrides = (*ZERO, f"parallel.zero_stage={stage}")
    results = run_ranks(2, zero_steps, tiny_cfg(*BASE, *overrides))
    assert_same(merge(results), reference(tiny_cfg, overrides))


@pytest.mark.usefixtures("deepspeed_imported")
def test_zero2_gradient_accumulation_matches_single_process(tiny_cfg, run_ranks):
    overrides = (*ZERO, "parallel.zero_stage=2", "trainer.grad_accum=2")
    assert_same(merge(run_ranks(2, zero_steps, tiny_cfg(*BASE, *overrides))), reference(tiny_cfg, overrides))


@pytest.mark.usefixtures("deepspeed_imported")
def test_zero2_bf16_matches_ddp_bf16(tiny_cfg, run_ranks):
    """trainer.precision=bf16 means fp32 weights and gradient reduction, bf16 matmuls (torch
    autocast): ZeRO-2 gives what DDP gives."""
    bf16 = ("parallel.dp_shard=2", "trainer.precision=bf16")
    ddp = merge(run_ranks(2, steps, tiny_cfg(*BASE, *bf16, "parallel.dp_backend=ddp"), 3, True))
    zero = merge(run_ranks(2, zero_steps, tiny_cfg(*BASE, *bf16, "parallel.dp_backend=deepspeed",
                                                   "parallel.zero_stage=2")))
    assert_same(zero, ddp)


def _train(loop, n: int, skip: int = 0) -> float:
    """`n` optimizer steps after skipping `skip` steps' worth of batches; the last loss."""
    for _ in range(skip * loop.cfg.trainer.grad_accum):
        next(loop.p.train)
    for _ in range(n):
        loss, _, _ = loop.train_step()
    return loop._mean_over_dp(loss)


def _numpy(state: dict) -> dict:
    return {k: v.numpy().copy() for k, v in state.items() if torch.is_tensor(v)}


def zero_save_and_resume(cfg_dict: dict, zero_ckpt, single_ckpt) -> dict:
    """Under ZeRO: 2 steps, save, a 3rd step; the same 3rd step after loading that checkpoint into
    a fresh engine, and after loading the single process's step-2 checkpoint."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    loop, _ = build_loop(cfg_dict)
    _train(loop, 2)
    Checkpointer(zero_ckpt).save(2, loop.p.components)
    params = dict(loop.p.engine.module.named_parameters())
    # the optimizer's own fp32 partitions, gathered: what the checkpoint must hold (after the
    # save, which links the optimizer's per-parameter views: see ZeroOptimizerState._materialize)
    live = {"weights": {k: safe_get_full_fp32_param(p).numpy().copy() for k, p in params.items()},
            "exp_avg_sq": {k: safe_get_full_optimizer_state(p, "exp_avg_sq").numpy().copy()
                           for k, p in params.items()}}
    out = {"live": live, "loss3": _train(loop, 1), "weights3": _numpy(loop.p.components["model"].state_dict())}
    for name, ckpt in (("resumed", zero_ckpt), ("from_single", single_ckpt)):
        fresh, _ = build_loop(cfg_dict)
        Checkpointer(ckpt).load(Checkpointer(ckpt).latest(), fresh.p.components)
        out[name] = _train(fresh, 1, skip=2)
        if name == "resumed":
            out["resumed_weights3"] = _numpy(fresh.p.components["model"].state_dict())
    return out


def fsdp_load(cfg_dict: dict, ckpt) -> dict:
    """Under FSDP2: load a checkpoint, then the 3rd step; the full weights as loaded, and its loss."""
    loop, _ = build_loop(cfg_dict)
    checkpointer = Checkpointer(ckpt)
    checkpointer.load(checkpointer.latest(), loop.p.components)
    weights = {k: v.full_tensor().numpy().copy() for k, v in loop.p.components["model"].state_dict().items()}
    return {"weights": weights, "loss3": _train(loop, 1, skip=2)}


@pytest.mark.usefixtures("deepspeed_imported")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_loads_in_one_process_and_resumes(tiny_cfg, run_ranks, tmp_path, stage):
    """One format both ways: a ZeRO checkpoint holds the optimizer's exact fp32 weights and Adam
    moments by FQN, under the keys a single process saves; it loads into one process and under
    FSDP2, and resumes under ZeRO bitwise; a single process's checkpoint resumes under ZeRO. Each
    continuation's loss equals the uninterrupted run's."""
    single_cfg = tiny_cfg(*BASE)
    single, _ = build_loop(single_cfg)
    _train(single, 2)
    Checkpointer(tmp_path / "single").save(2, single.p.components)
    single_loss3 = _train(single, 1)

    zero = run_ranks(2, zero_save_and_resume, tiny_cfg(*BASE, *ZERO, f"parallel.zero_stage={stage}"),
                     tmp_path / "zero", tmp_path / "single")[0]
    assert zero["resumed"] == zero["loss3"]
    for k, w in zero["weights3"].items():
        np.testing.assert_array_equal(zero["resumed_weights3"][k], w, err_msg=k)
    assert zero["from_single"] == pytest.approx(single_loss3, rel=1e-5)
    assert zero["loss3"] == pytest.approx(single_loss3, rel=1e-5)

    assert stored_keys(Checkpointer(tmp_path / "zero").latest()) == stored_keys(tmp_path / "single" / "step_000000002")
    one, _ = build_loop(single_cfg)
    checkpointer = Checkpointer(tmp_path / "zero")
    checkpointer.load(checkpointer.latest(), one.p.components)
    weights = one.p.components["model"].state_dict()
    moments = one.p.components["optimizer"].state_dict()
    assert set(weights) == set(zero["live"]["weights"])
    for k, w in zero["live"]["weights"].items():
        np.testing.assert_array_equal(weights[k].numpy(), w, err_msg=k)
        np.testing.assert_array_equal(moments[f"state.{k}.exp_avg_sq"].numpy(), zero["live"]["exp_avg_sq"][k],
                                      err_msg=k)
        assert moments[f"state.{k}.step"].item() == 2
    assert _train(one, 1, skip=2) == pytest.approx(zero["loss3"], rel=1e-5)

    fsdp = run_ranks(2, fsdp_load, tiny_cfg(*BASE, "parallel.dp_shard=2"), tmp_path / "zero")[0]
    for k, w in zero["live"]["weights"].items():
        np.testing.assert_array_equal(fsdp["weights"][k], w, err_msg=k)
    assert fsdp["loss3"] == pytest.approx(zero["loss3"], rel=1e-5)


def _logged(run_dir, key) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.usefixtures("deepspeed_imported")
def test_whole_run_under_zero3(tiny_cfg, tmp_path, run_ranks, capfd):
    """`plait parallel.dp_backend=deepspeed parallel.zero_stage=3` end to end (trainer/pretrain.py):
    logged loss, grad norm, lr and eval loss equal one process's; sampling runs through the
    partitioned weights; the checkpoint is written."""
    common = ["trainer.max_steps=3", "trainer.eval_every=3", "optim.eps=1e-5"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_rank(tiny_cfg(*common, run_dir=single))
    capfd.readouterr()
    run_ranks(2, run_rank, tiny_cfg(*common, *ZERO, "parallel.zero_stage=3", run_dir=multi), init_pg=False)
    for key in ("loss", "grad_norm", "lr", "eval/loss"):
        ref, got = _logged(single, key), _logged(multi, key)
        assert sorted(got) == sorted(ref) and ref, key
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (key, step)
    assert "sample: " in capfd.readouterr().out
    assert (multi / "checkpoints" / "step_000000003" / "plait.json").exists()


@pytest.mark.parametrize("overrides, said", [
    (["parallel.tp=2"], ["parallel.tp=2", "DTensor", "parallel.tp=1", "parallel.dp_backend=fsdp"]),
    (["parallel.pp=2", "parallel.microbatches=2"], ["parallel.pp=2", "interleaved", "parallel.pp=1"]),
    (["parallel.dp_replicate=2"], ["parallel.dp_replicate=2", "parallel.dp_replicate=1", "dp_shard"]),
    (["parallel.zero_stage=4"], ["parallel.zero_stage=4", "1, 2, 3"]),
    (["parallel.zero_stage=3", "trainer.precision=bf16"], ["trainer.precision=bf16", "parallel.zero_stage=3",
                                                          "trainer.precision=fp32", "parallel.zero_stage=1 or 2"]),
])
def test_deepspeed_refuses_what_does_not_compose(tiny_cfg, overrides, said):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(*ZERO, *overrides)
    for words in said:
        assert words in str(err.value), (words, str(err.value))


def test_zero_stage_needs_deepspeed_backend(tiny_cfg):
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=2 applies to parallel.dp_backend=deepspeed only"):
        tiny_cfg("parallel.dp_shard=2", "parallel.zero_stage=2")


def test_deepspeed_backend_needs_the_package(tiny_cfg, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the deepspeed package.*plait\[deepspeed\]"):
        tiny_cfg(*ZERO)
