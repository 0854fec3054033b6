"""Federated LoRA (FedPipe-style, federated/): the issue's five figures in one JSON line, Plait and
its baselines side by side in one run, on the keyword-topic task and the tiny Llama of
configs/task/federated.yaml (0.8M parameters, 4 clients, int8 base unless the planner says else).

(1) bytes_ratio: bytes a round moves (adapters up and down, every client) over what full
    fine-tuning of the same model moves (every parameter up and down, every client). Goal ≤ 1%.
(2) gap_alpha1, gap_alpha0_1: accuracy points of centralized LoRA on the union of the data (one
    client, the same total steps, the same adapters) minus federated (svd strategy) after R rounds,
    at Dirichlet α = 1.0 and α = 0.1. Goals ≤ 2 and ≤ 5 points.
(3) planner_time_cut, planner_acc_delta: clients of 1×, 2× and 4× relative speed; the MILP's plan
    (up to 8 modules chosen by importance, ranks, batch, bits per client: the defaults) against
    uniform ranks (task.rank on wq, wv at task.batch_size and 8 bits for all), each at seeds 0, 1, 2,
    on the pretrained base (task.base_pretrain_steps); `planner.target_modules_*`: the same program
    on the user's wq, wv (plan_modules=target); `planner.uniform_float_*`: uniform on a float base. Round time of a
    client = its measured compute / its speed + adapter bytes / its bandwidth; the cut is
    1 − (slowest client's round time, planner) / (same, uniform), each the mean over rounds 2..R and
    seeds; accuracy: the final round's on 4,096 held-out samples, mean over seeds. Goal ≥ 30% with
    the accuracy within 1 point (delta = planner − uniform, in points).
(4) overhead_ratio: Plait's simulated round (`task.mode=simulation`, Ray: send, aggregate, evaluate,
    checkpoint) over a bare Flower simulation with stock FedAvg (flwr.serverapp.strategy.FedAvg, a
    ClientApp written the plain way with peft + quanto, server-side evaluation each round) doing
    the same client work: median round period over rounds 2..R. Goal ≤ 1.1.
(5) aggregators: each strategy at the same rounds and equal ranks: final accuracy and the mean
    exactness error max_k ‖ΔW_k − ΔW*‖/‖ΔW*‖ over rounds; `aggregators_mixed_ranks`: svd, hetlora
    and flora with client ranks 2, 4, 8, 8.

    .venv/bin/python bench/federated.py [--rounds 10] [--out runs/bench-federated]
        [--only aggregators,gap,planner,overhead]   (gap needs aggregators: it reuses the svd run)
        [--planner-seeds 0,1,2]                     ((3): the seeds each arm runs at)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = {"vocab_size": 256, "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 352,
         "max_seq_len": 64}
MIXED_RANKS = [2, 4, 8, 8]  # (5) again with heterogeneous ranks, for the strategies that take them
TASK = {"_target_": "federated.run.run", "name": "federated", "mode": "local", "num_clients": 4,
        "train_samples": 2048, "test_samples": 512, "local_steps": 10, "planner": "uniform", "rank": 4,
        "target_modules": ["wq", "wv"], "batch_size": 16, "bits": 8, "plots": False}


def config(run_dir: Path, seed: int = 0, **task):
    from trainer.config import validate

    return validate({"task": {**TASK, **task}, "model": MODEL, "seed": seed, "run_dir": str(run_dir),
                     "checkpoint": {"every": 1, "keep_last": 1}, "logger": {"progress": False}})


def run_local(run_dir: Path, seed: int = 0, **task) -> list[dict]:
    """`plait task=federated task.mode=local` in this process; its metrics rows."""
    from federated.run import serve
    from federated.server import local_transport

    cfg = config(run_dir, seed, **task)
    with contextlib.redirect_stdout(sys.stderr):  # the run's own lines; stdout holds the one JSON line
        serve(cfg, lambda spec, log: local_transport(cfg.task, cfg.model, cfg.seed))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(run_dir: Path, overrides: list[str]) -> list[dict]:
    import subprocess

    cmd = [str(Path(sys.executable).with_name("plait")), "task=federated", f"run_dir={run_dir}", "logger.progress=false",
           *[f"model.{k}={v}" for k, v in MODEL.items()], *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def full_finetune_bytes(num_clients: int) -> int:
    from federated import model as fm
    from trainer.config import ModelConfig

    params = sum(p.numel() for p in fm.build_base(ModelConfig(**MODEL), 0).parameters())
    return 2 * 4 * params * num_clients  # float32, up and down, every client


# ---------------------------------------------------------------------------------------------
# The baseline of (4): a bare Flower simulation with stock FedAvg, the client written the plain way.
# ---------------------------------------------------------------------------------------------


def flower_fedavg(rounds: int, out: Path) -> list[float]:
    """Round end times of stock FedAvg on the same clients' work (equal ranks, int8 base, AdamW)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    marks: list[float] = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        model = plain_model()
        arrays = ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k})
        test_tokens, test_labels = plain_test()

        def evaluate(rnd, arrays):
            m = plain_model()
            m.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            with torch.no_grad():
                acc = (m(test_tokens)[:, -1, 2:6].argmax(-1) == test_labels).float().mean().item()
            marks.append(time.perf_counter())
            return MetricRecord({"accuracy": acc})

        FedAvg(fraction_evaluate=0.0, min_available_nodes=TASK["num_clients"], min_train_nodes=TASK["num_clients"]
               ).start(grid, arrays, num_rounds=rounds, evaluate_fn=evaluate)

    client = ClientApp()

    @client.train()
    def train(msg, context):
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        tokens, labels = plain_partition(pid)
        m = plain_model()
        m.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=TASK_LR, weight_decay=0.0)
        g = torch.Generator().manual_seed(pid * 1000 + int(msg.metadata.group_id or 0))
        for _ in range(TASK["local_steps"]):
            idx = torch.randint(0, len(labels), (TASK["batch_size"],), generator=g)
            loss = torch.nn.functional.cross_entropy(m(tokens[idx])[:, -1, 2:6], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        arrays = ArrayRecord({k: v.detach().clone() for k, v in m.state_dict().items() if "lora_" in k})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": len(labels)})}),
                       reply_to=msg)

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(server_app=server, client_app=client, num_supernodes=TASK["num_clients"],
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                                                 "log_to_driver": False}})
    return marks


TASK_LR = 1e-2


def _cache() -> dict:
    """Per process, as Plait's clients cache theirs (the base weights, the partitions). Held by a module
    in sys.modules: Ray unpickles this script's functions by value with fresh globals for every call."""
    import types

    return sys.modules.setdefault("_bench_federated_cache", types.ModuleType("_bench_federated_cache")).__dict__


def plain_model():
    """Base from the seed, quanto int8 on every Linear but the head, peft LoRA r=4 on wq and wv."""
    import copy

    from optimum.quanto import freeze, qint8, quantize
    from peft import LoraConfig, get_peft_model

    from trainer.config import ModelConfig
    from trainer.models import build_model

    cache = _cache()
    if "base" not in cache:  # the base Plait's clients fine-tune (pretrained as task.base_pretrain_steps says)
        from federated.config import FederatedConfig
        from federated.data import TaskSpec
        from federated.model import base_weights
        from federated.pretrain import Pretraining

        steps = TASK.get("base_pretrain_steps", FederatedConfig().base_pretrain_steps)
        cache["base"] = build_model(ModelConfig(**MODEL), seed=0)
        if steps:
            pre = Pretraining(steps, TaskSpec(4, 16, MODEL["vocab_size"], 0.3))
            cache["base"].load_state_dict(base_weights(ModelConfig(**MODEL), 0, pre))
    torch.manual_seed(0)
    model = copy.deepcopy(cache["base"])
    quantize(model, weights=qint8, exclude=["output"])
    freeze(model)
    return get_peft_model(model, LoraConfig(target_modules=["wq", "wv"], r=4, lora_alpha=8))


def plain_partition(pid: int):
    from federated.data import TaskSpec, partitions

    cache = _cache()
    if "parts" not in cache:
        spec = TaskSpec(4, 16, MODEL["vocab_size"], 0.3)
        cache["parts"] = partitions(spec, TASK["train_samples"], TASK["num_clients"], "dirichlet", 1.0, [], seed=0)
    return cache["parts"][pid]


def plain_test():
    from federated.data import TaskSpec, test_set

    return test_set(TaskSpec(4, 16, MODEL["vocab_size"], 0.3), TASK["test_samples"], 0)


def periods(times: list[float]) -> float:
    """Median gap between consecutive round ends, rounds 2..R."""
    return statistics.median(b - a for a, b in zip(times, times[1:]))


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="")
    ap.add_argument("--only", default="aggregators,gap,planner,overhead",
                    help="comma-separated parts: aggregators (also bytes), gap, planner, overhead")
    ap.add_argument("--planner-seeds", default="0,1,2", help="(3): seeds each arm runs at (accuracy: their mean)")
    ap.add_argument("--base-pretrain-steps", type=int, default=None,
                    help="task.base_pretrain_steps of every run (default: the config's)")
    args = ap.parse_args()
    if args.base_pretrain_steps is not None:
        TASK["base_pretrain_steps"] = args.base_pretrain_steps
    torch.set_num_threads(1)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-federated-"))
    out.mkdir(parents=True, exist_ok=True)
    R, K, S = args.rounds, TASK["num_clients"], TASK["local_steps"]
    report: dict = {"bench": "federated", "rounds": R, "clients": K, "local_steps": S,
                    "base_pretrain_steps": config(out).task.base_pretrain_steps}
    t0 = time.perf_counter()

    parts = set(args.only.split(","))
    # (5) aggregators (and (1), (2) at α = 1 from the svd run)
    aggregators = {}
    for name in ("fedit", "ffa", "flora", "svd", "hetlora", "fedex") if parts & {"aggregators", "gap"} else ():
        rows = run_local(out / f"agg-{name}", strategy=name, rounds=R, alpha=1.0)
        aggregators[name] = {"accuracy": rows[-1]["accuracy"],
                             "exactness_error": statistics.mean(r["aggregation_error"] for r in rows),
                             "bytes_per_round": statistics.mean(r["bytes_up"] + r["bytes_down"] for r in rows)}
        print(f"aggregator {name}: {aggregators[name]}", file=sys.stderr, flush=True)
    mixed = {}
    for name in ("svd", "hetlora", "flora") if "aggregators" in parts else ():  # heterogeneous ranks
        rows = run_local(out / f"mixed-{name}", strategy=name, rounds=R, alpha=1.0, client_ranks=MIXED_RANKS)
        mixed[name] = {"accuracy": rows[-1]["accuracy"],
                       "exactness_error": statistics.mean(r["aggregation_error"] for r in rows),
                       "bytes_per_round": statistics.mean(r["bytes_up"] + r["bytes_down"] for r in rows)}
    if mixed:
        report["aggregators_mixed_ranks"] = {"ranks": MIXED_RANKS, **mixed}
    if aggregators:
        report.update(aggregators_and_bytes(aggregators, K))
        from federated.plots import plot_curves

        curves = {n: [json.loads(line)["accuracy"] for line in (out / f"agg-{n}" / "metrics.jsonl").read_text().splitlines()]
                  for n in aggregators}
        report["aggregators_png"] = str(plot_curves(out / "aggregators.png", curves, f"{K} clients, Dirichlet α=1"))
    if "gap" in parts:
        report.update(gap(out, aggregators, R, K, S))
    if "planner" in parts:
        report.update(planner(out, R, K, [int(x) for x in args.planner_seeds.split(",")]))
    if "overhead" in parts:
        report.update(overhead(out, R))
    report["seconds"] = time.perf_counter() - t0
    report["out"] = str(out)
    print(json.dumps(report), flush=True)


def aggregators_and_bytes(aggregators: dict, K: int) -> dict:
    report = {"aggregators": aggregators}
    full = full_finetune_bytes(K)
    report["bytes_ratio"] = aggregators["svd"]["bytes_per_round"] / full
    report["bytes"] = {"lora_per_round": aggregators["svd"]["bytes_per_round"], "full_per_round": full,
                       "flora_ratio": aggregators["flora"]["bytes_per_round"] / full}
    return report


def gap(out: Path, aggregators: dict, R: int, K: int, S: int) -> dict:
    """(2) centralized LoRA: one client with all the data, the same total steps."""
    report = {}
    central = run_local(out / "central", num_clients=1, partitioner="iid", rounds=R, local_steps=K * S)
    fed01 = run_local(out / "fed-alpha0.1", strategy="svd", rounds=R, alpha=0.1)
    c_acc = central[-1]["accuracy"]
    report["central_accuracy"] = c_acc
    report["gap_alpha1"] = 100 * (c_acc - aggregators["svd"]["accuracy"])
    report["gap_alpha0_1"] = 100 * (c_acc - fed01[-1]["accuracy"])
    report["fed_accuracy"] = {"alpha1": aggregators["svd"]["accuracy"], "alpha0_1": fed01[-1]["accuracy"]}
    return report


PLANNER_SPEEDS = [1.0, 2.0, 4.0, 4.0]  # (3): 1×, 2×, 4× relative speed (and 4× again: 4 clients)
PLANNER_TEST_SAMPLES = 4096  # (3): a larger held-out set, so one point is 41 examples, not 5
PLANNER_CHOICES = {"rank_choices": [2, 4, 8], "batch_choices": [8, 16], "bits_choices": [8, 32]}


def planner(out: Path, R: int, K: int, seeds: list[int]) -> dict:
    """(3) the planner against uniform ranks on clients of 1×, 2×, 4× speed, each arm at every seed.

    Time: the slowest client's round time (measured compute ÷ speed + bytes ÷ bandwidth), mean over
    rounds 2..R (round 1 carries this process's one-time costs, whichever arm runs first), then over
    seeds; a 1-round warm-up run goes first. Accuracy: the final round's on PLANNER_TEST_SAMPLES
    held-out samples, mean over seeds (one run's final accuracy moves by about a point with the seed)."""
    clients = [{"speed": s, "bandwidth_mbps": 100.0, "memory_mib": 512.0} for s in PLANNER_SPEEDS]
    common = {"clients": clients, "rounds": R, "strategy": "svd", "test_samples": PLANNER_TEST_SAMPLES}
    arms = {"uniform": {"planner": "uniform"},  # task.rank on wq, wv at task.batch_size, 8-bit base, for all
            # FedPipe: modules by importance (up to task.max_modules = 8), ranks, batch, bits (the defaults)
            "planner": {"planner": "milp", **PLANNER_CHOICES},
            "target": {"planner": "milp", "plan_modules": "target", **PLANNER_CHOICES},  # on the user's wq, wv
            # uniform on a float base: how much of the cut is the bits' and how much the batch's
            "uniform_float": {"planner": "uniform", "bits": 32}}
    run_local(out / "planner-warmup", **{**common, "rounds": 1})

    def slowest(rows):
        return statistics.mean(max(r[f"client{k}/round_s"] for k in range(K) if f"client{k}/round_s" in r)
                               for r in rows[1:])

    time_s, acc = {a: [] for a in arms}, {a: [] for a in arms}
    for seed in seeds:
        for arm, task in arms.items():
            rows = run_local(out / f"{arm}-seed{seed}", seed, **common, **task)
            time_s[arm].append(slowest(rows))
            acc[arm].append(rows[-1]["accuracy"])
            print(f"planner {arm} seed {seed}: slowest {time_s[arm][-1]:.3f} s, accuracy {acc[arm][-1]:.4f}",
                  file=sys.stderr, flush=True)
    mean = {a: statistics.mean(time_s[a]) for a in arms}
    macc = {a: statistics.mean(acc[a]) for a in arms}
    report = {"planner_time_cut": 1 - mean["planner"] / mean["uniform"],
              "planner_acc_delta": 100 * (macc["planner"] - macc["uniform"])}
    report["planner"] = {
        "seeds": seeds, "test_samples": PLANNER_TEST_SAMPLES,
        "slowest_round_s": mean["planner"], "uniform_slowest_round_s": mean["uniform"],
        "uniform_float_slowest_round_s": mean["uniform_float"],
        "time_cut_vs_uniform_float": 1 - mean["planner"] / mean["uniform_float"],
        "uniform_float_acc_delta": 100 * (macc["uniform_float"] - macc["uniform"]),
        "accuracy": macc["planner"], "uniform_accuracy": macc["uniform"],
        "accuracy_per_seed": acc["planner"], "uniform_accuracy_per_seed": acc["uniform"],
        "acc_delta_per_seed": [100 * (a - b) for a, b in zip(acc["planner"], acc["uniform"])],
        "target_modules_time_cut": 1 - mean["target"] / mean["uniform"],
        "target_modules_acc_delta": 100 * (macc["target"] - macc["uniform"]),
        "target_accuracy_per_seed": acc["target"],
        "plan_png": str(out / "planner-seed0" / "plan.png")}
    from federated.plots import plot_plan
    from federated.run import make_plan

    for arm in ("planner", "target"):
        cfg = config(out / f"{arm}-seed0", **common, **arms[arm])
        plans, pb, sol = make_plan(cfg, lambda s: None)
        plot_plan(out / f"{arm}-seed0" / "plan.png", pb, sol)
        report["planner"][f"{arm}_plan"] = [{"batch": p.batch_size, "bits": p.bits,
                                             "ranks": sorted(set(p.ranks.values())),
                                             "modules": sorted({m.rsplit(".", 1)[-1] for m in p.ranks})}
                                            for p in plans]
    return report


def overhead(out: Path, R: int) -> dict:
    """(4) Plait's simulated round against a bare Flower FedAvg simulation (equal client work)."""
    report = {}
    with contextlib.redirect_stdout(sys.stderr):
        marks = flower_fedavg(R, out)
    plait_rows = run_cli(out / "sim", ["task.mode=simulation", f"task.rounds={R}", "task.planner=uniform",
                                       "task.strategy=fedit", "task.rank=4", "task.target_modules=[wq,wv]",
                                       "task.batch_size=16", "task.bits=8", "task.plots=false"])
    plait_period = periods([r["time"] for r in plait_rows])
    flower_period = periods(marks)
    report["overhead_ratio"] = plait_period / flower_period
    report["overhead"] = {"plait_round_s": plait_period, "flower_fedavg_round_s": flower_period}
    return report


if __name__ == "__main__":
    main()
