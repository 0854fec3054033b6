"""federated/server.py and run.serve in task.mode=local: rounds, dropped clients, resume equality."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from federated.run import serve
from federated.server import local_transport
from trainer.checkpoint import Checkpointer
from trainer.config import validate

MODEL = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "max_seq_len": 16}


def config(run_dir, resume="none", **task):
    base = {"_target_": "federated.run.run", "name": "federated", "mode": "local", "num_clients": 3, "rounds": 3,
            "train_samples": 240, "test_samples": 96, "seq_len": 12, "local_steps": 3, "batch_choices": [8],
            "rank_choices": [2, 4], "max_modules": 2, "plan_modules": "importance", "plots": False,
            "base_pretrain_steps": 0}  # the seed's base: these tests are of the rounds, not of pretraining
    return validate({"task": {**base, **task}, "model": MODEL, "seed": 0, "run_dir": str(run_dir),
                     "checkpoint": {"every": 1, "resume": resume, "keep_last": 0}, "logger": {"progress": False}})


def run_local(cfg):
    return serve(cfg, lambda spec, log: local_transport(cfg.task, cfg.model, cfg.seed))


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def server_state(run_dir, tmp_path, step):
    out = tmp_path / f"{run_dir.name}-{step}.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / f"step_{step:09d}"), str(out))
    return torch.load(out, weights_only=False)


def assert_same(a, b, prefix=""):
    assert a.keys() == b.keys(), prefix
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k], f"{prefix}{k}.")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{prefix}{k} differs"
        else:
            assert a[k] == b[k], f"{prefix}{k} differs"


KEYS = ("accuracy", "train_loss", "aggregation_error", "bytes_up", "bytes_down")


@pytest.mark.parametrize("strategy", ["svd", "flora"])
def test_resume_at_saved_round_equals_uninterrupted(tmp_path, strategy):
    whole = run_local(config(tmp_path / "whole", strategy=strategy))
    first = run_local(config(tmp_path / "cut", strategy=strategy, rounds=1))
    assert first["rounds"] == 1
    rest = run_local(config(tmp_path / "cut", strategy=strategy, resume="latest"))
    assert rest["accuracy_per_round"] == whole["accuracy_per_round"]
    a, b = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    assert [[r[k] for k in KEYS] for r in a] == [[r[k] for k in KEYS] for r in b]
    assert_same(server_state(tmp_path / "whole", tmp_path, 3), server_state(tmp_path / "cut", tmp_path, 3))
    assert whole["accuracy"] > 0.4  # four classes: chance is 0.25


def test_dropped_client_keeps_its_state_and_catches_up(tmp_path):
    """Client 1 raises in round 2: dropped, the round proceeds; in round 3 it gets the dense base delta."""
    out = run_local(config(tmp_path / "run", strategy="flora", faults=["raise:1:2"]))
    r = rows(tmp_path / "run")
    assert [x["participants"] for x in r] == [3, 2, 3]
    assert "client1/bytes_up" not in r[1] and "client1/bytes_up" in r[2]
    # in round 3 client 1 (out of step) receives the whole running base, the others round 2's factors
    assert r[2]["client1/bytes_down"] > r[2]["client0/bytes_down"]
    assert out["clients"]["1"]["dropped"] == 1 and out["clients"]["0"]["rounds"] == 3
    assert r[2]["aggregation_error"] < 1e-5  # FLoRA stays exact with a dropped client (weight 0)


def test_too_few_clients_stop_with_a_clear_message(tmp_path):
    out = run_local(config(tmp_path / "run", faults=["raise:0:2", "raise:1:2"], min_clients=2))
    assert out["rounds"] == 1
    assert "round 2: 1 of 3 clients replied, fewer than task.min_clients=2" in out["stopped"]
    assert "client 0: raised RuntimeError: injected fault" in out["stopped"]


def test_final_checkpoint_holds_the_merged_model(tmp_path):
    run_local(config(tmp_path / "run", rounds=2))
    latest = Checkpointer(str(tmp_path / "run" / "checkpoints")).latest()
    manifest = json.loads((latest / "plait.json").read_text())
    assert "model" in manifest["components"] and manifest["config"]["model"]["dim"] == 32


@pytest.mark.parametrize("strategy", ["svd", "hetlora", "flora"])
def test_mixed_ranks_travel_and_aggregate(tmp_path, strategy):
    """task.client_ranks: each client trains and receives its own rank; FLoRA stays exact."""
    out = run_local(config(tmp_path / "run", strategy=strategy, planner="uniform", client_ranks=[2, 4, 8],
                           target_modules=["wq", "wv"], rounds=2))
    assert [p["ranks"]["layers.0.attention.wq"] for p in out["plan"]] == [2, 4, 8]
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["plans"] == out["plan"]
    r = rows(tmp_path / "run")
    assert r[0]["client0/bytes_up"] < r[0]["client1/bytes_up"] < r[0]["client2/bytes_up"]
    if strategy == "flora":
        assert max(x["aggregation_error"] for x in r) < 1e-5
    else:  # truncation to each client's rank loses what the higher ranks added
        assert r[-1]["aggregation_error"] > 1e-4


def test_hugging_face_base_gives_the_plait_base_results(tmp_path):
    """task.base=hf: the same weights as a LlamaForCausalLM (HF module names), the same metrics, and a
    final `model` component under Plait's names (what plait-ckpt export reads)."""
    plait = run_local(config(tmp_path / "plait", strategy="flora", rounds=2))
    hf = run_local(config(tmp_path / "hf", strategy="flora", rounds=2, base="hf"))
    assert all(m.startswith("model.layers.") for m in hf["plan"][0]["ranks"])
    a, b = rows(tmp_path / "plait"), rows(tmp_path / "hf")
    assert [[r[k] for k in KEYS] for r in a] == [[r[k] for k in KEYS] for r in b]
    sa, sb = server_state(tmp_path / "plait", tmp_path, 2), server_state(tmp_path / "hf", tmp_path, 2)
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


def test_planner_keeps_the_target_modules_unless_told_to_choose(tmp_path):
    """task.plan_modules=target: the MILP plans ranks, batch and bits on exactly task.target_modules;
    =importance (the default): it picks up to task.max_modules by importance."""
    from federated.run import make_plan

    plans, pb, _ = make_plan(config(tmp_path / "t", plan_modules="target", target_modules=["wq", "wv"]),
                             lambda s: None)
    want = {f"layers.{i}.attention.{m}" for i in range(2) for m in ("wq", "wv")}
    assert all(set(p.ranks) == want for p in plans)
    assert set(pb.importance) == want and abs(sum(pb.importance.values()) - 1) < 1e-9
    plans, pb, _ = make_plan(config(tmp_path / "i", plan_modules="importance", max_modules=2), lambda s: None)
    top = sorted(pb.importance, key=pb.importance.get, reverse=True)
    assert 1 <= len(plans[0].ranks) <= 2 and set(plans[0].ranks) <= set(top)


def test_a_pretrained_base_is_the_one_planned_trained_and_exported(tmp_path):
    """task.base_pretrain_steps: the planner scores, the clients train and the final `model` holds the
    pretrained base (+ the federation's delta), not the seed's initialisation."""
    from federated import model as fm
    from federated.pretrain import of as pretraining
    from federated.run import make_plan

    cfg = config(tmp_path / "run", rounds=1, base_pretrain_steps=30, strategy="flora")
    _, pb, _ = make_plan(cfg, lambda s: None)
    _, pb0, _ = make_plan(config(tmp_path / "seed", rounds=1, strategy="flora"), lambda s: None)
    assert pb.importance != pb0.importance
    run_local(cfg)
    state = server_state(tmp_path / "run", tmp_path, 1)
    delta = state["server"]["base_total"]  # FLoRA merges every round: the adapters restart at B = 0
    want = fm.merged(cfg.model, 0, delta, pretrain=pretraining(cfg.task, cfg.model)).state_dict()
    for k, v in state["model"].items():
        assert torch.equal(v, want[k]), k
