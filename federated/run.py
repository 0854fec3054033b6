"""Task runner of `task=federated` (FedPipe-style federated LoRA): `task.mode=simulation` runs the
rounds through `flwr.simulation.run_simulation` (Ray), `deploy` through a SuperLink and SuperNodes,
`local` in this process without Flower. All three run one server loop, `serve`, which plans,
checkpoints every round, resumes at the saved round, and logs accuracy, bytes and times per client.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from federated.config import ClientProfile, FederatedConfig
from trainer.config import PlaitConfig, as_dict
from trainer.errors import ConfigError
from trainer.launch.distributed import DistEnv

STARTUP_S = 300.0  # Ray or Flower start, node discovery: what the watchdog allows besides the rounds


def spec_json(cfg: PlaitConfig) -> str:
    """What every client needs to rebuild its model and data: task options, model config, seed."""
    return json.dumps({"task": asdict(cfg.task), "model": asdict(cfg.model), "seed": cfg.seed}, sort_keys=True)


def profiles(c: FederatedConfig) -> list[ClientProfile]:
    return list(c.clients) if c.clients else [ClientProfile() for _ in range(c.num_clients)]


def make_plan(cfg: PlaitConfig, log: Callable[[str], None]):
    """(plans, Problem, Solution or None): the MILP's plan, or task.rank on task.target_modules for all."""
    from federated import model as fm
    from federated import planner as pl
    from federated.aggregation import STRATEGIES
    from federated.client import Plan, client_data
    from federated.data import TaskSpec, generate

    from federated.pretrain import of as pretraining

    c: FederatedConfig = cfg.task
    base = fm.build_base(cfg.model, cfg.seed, kind=c.base, pretrain=pretraining(c, cfg.model))
    spec = TaskSpec(c.num_classes, c.seq_len, cfg.model.vocab_size, c.keyword_prob)
    tokens, labels = generate(spec, c.calibration_samples, seed=cfg.seed + 3, task_seed=cfg.seed)
    imp = pl.importance(base, tokens, labels, spec.label_tokens)
    costs = pl.costs_of(base, c.seq_len, c.local_steps)
    sizes = [len(lab) for _, lab in client_data(c, cfg.model, cfg.seed)]
    shares = [n / sum(sizes) for n in sizes]
    uniform_modules = fm.select(base, list(c.target_modules))
    ranks = list(c.client_ranks) or [c.rank] * c.num_clients
    if len(ranks) != c.num_clients or min(ranks) < 1:
        raise ConfigError(f"task.client_ranks={list(c.client_ranks)} needs one positive rank per client "
                          f"(task.num_clients={c.num_clients}), or [] for task.rank everywhere")
    if len(set(ranks)) > 1 and not STRATEGIES.get(c.strategy).mixed_ranks:
        allowed = ", ".join(n for n in STRATEGIES.names() if STRATEGIES.get(n).mixed_ranks)
        raise ConfigError(f"task.client_ranks={ranks} mixes ranks, which task.strategy={c.strategy!r} cannot "
                          f"aggregate; use one of: {allowed}")
    uniform = [Plan({m: r for m in uniform_modules}, c.batch_size, c.bits) for r in ranks]
    max_modules, min_modules = c.max_modules, 1
    if c.plan_modules == "target":  # the MILP plans ranks, batch and bits on task.target_modules only
        imp = {m: imp[m] for m in uniform_modules}
        total = sum(imp.values()) or 1.0
        imp = {m: v / total for m, v in imp.items()}
        max_modules = min_modules = len(uniform_modules)
    pb = pl.Problem(imp, costs, profiles(c), shares, sorted(c.rank_choices), sorted(c.batch_choices),
                    sorted(c.bits_choices), max_modules, c.balance_weight,
                    same_ranks=not STRATEGIES.get(c.strategy).mixed_ranks, min_modules=min_modules)
    pb.t_ref = max(pb.time(k, p.batch_size, p.bits, p.ranks) for k, p in enumerate(uniform))
    if c.planner == "uniform":
        return uniform, pb, pl.finish(pb, uniform)
    start = time.perf_counter()
    sol = pl.solve(pb)
    log(f"planner: MILP solved in {time.perf_counter() - start:.2f} s")
    return sol.plans, pb, sol


def serve(cfg: PlaitConfig, make_transport) -> dict:
    """Plait's server loop (in this process or inside a Flower ServerApp): plan, resume, rounds,
    a checkpoint per round, metrics. `make_transport(spec_json, log)` gives the round transport."""
    from federated import model as fm
    from federated import planner as pl
    from federated.aggregation import build_strategy
    from federated.client import Plan
    from federated.data import TaskSpec, test_set
    from federated.pretrain import of as pretraining
    from federated.server import FederationStopped, Server, plans_json
    from trainer.checkpoint import Checkpointer
    from trainer.checkpoint.state import Progress, TensorDict
    from trainer.launch.preemption import PreemptionHandler
    from trainer.metrics import MetricLogger

    c: FederatedConfig = cfg.task
    torch.set_num_threads(c.threads)
    log = MetricLogger(cfg.run_dir, cfg.logger, as_dict(cfg), c.rounds, is_main=True)
    checkpointer = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last,
                                meta={"task": c.name, "config": as_dict(cfg), "world_size": 1})
    progress = Progress()
    resume = checkpointer.resolve(cfg.checkpoint.resume)
    if resume is not None:
        checkpointer.load(resume, {"progress": progress})
        plans = [Plan.from_json(p) for p in json.loads(progress.extra["plan"])]
        _, pb, _ = make_plan(cfg, lambda s: None)
        sol = pl.finish(pb, plans)
    else:
        plans, pb, sol = make_plan(cfg, log.text)
    log.text(pl.table(pb, sol))
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "plan.json").write_text(json.dumps(
        {"plans": json.loads(plans_json(plans)), "importance": pb.importance, "modelled_round_s": sol.times,
         "modelled_memory_bytes": sol.memories, "objective": sol.objective}, indent=1, sort_keys=True))
    spec = TaskSpec(c.num_classes, c.seq_len, cfg.model.vocab_size, c.keyword_prob)
    test_tokens, test_labels = test_set(spec, c.test_samples, cfg.seed)
    pretrain = pretraining(c, cfg.model)

    def evaluate(delta):
        return fm.accuracy(fm.merged(cfg.model, cfg.seed, delta, c.base, pretrain), test_tokens, test_labels,
                           spec.label_tokens)

    shapes = fm.weight_shapes(fm.build_base(cfg.model, cfg.seed, kind=c.base))
    strategy = build_strategy(c.strategy)
    server = Server(strategy, plans, {m: shapes[m] for m in plans[0].ranks}, cfg.seed, c.lora_alpha_ratio,
                    str(Path(cfg.run_dir) / "clients"), c.min_clients, evaluate)
    # the server's randomness is its own generator (in ServerState); the process's global streams are
    # not checkpointed: in task.mode=local the clients draw from them in this process
    components = {"server": server.state, "strategy": strategy, "progress": progress}
    if resume is not None:
        checkpointer.load(resume, components)
        log.text(f"resumed from {resume} at round {int(server.state.round)}")
        log.advance(int(server.state.round))
    else:
        progress.extra = {"plan": plans_json(plans), "clients": {}}
    full_bytes = sum(p.numel() * 4 for p in fm.build_base(cfg.model, cfg.seed).parameters())
    preemption = PreemptionHandler()
    transport = make_transport(spec_json(cfg), log.text)
    history = list(progress.extra.get("accuracy", []))
    stopped = None
    try:
        for rnd in range(int(server.state.round) + 1, c.rounds + 1):
            try:
                result = server.round(rnd, transport, c.round_timeout_s)
            except FederationStopped as err:
                stopped = str(err)
                break
            m = result.metrics
            for k, why in sorted(result.dropped.items()):
                log.text(f"round {rnd}: client {k} dropped ({why})")
            stats = progress.extra["clients"]
            for k in range(c.num_clients):
                s = stats.setdefault(str(k), {"rounds": 0, "dropped": 0, "bytes_up": 0, "bytes_down": 0})
                s["bytes_down"] += m[f"client{k}/bytes_down"]
                if k in result.replies:
                    s["rounds"] += 1
                    s["bytes_up"] += m[f"client{k}/bytes_up"]
                    # the modelled round time of the client: its measured compute at its relative speed
                    prof = pb.profiles[k]
                    m[f"client{k}/round_s"] = (m[f"client{k}/compute_s"] / prof.speed
                                               + (m[f"client{k}/bytes_up"] + m[f"client{k}/bytes_down"]) * 8
                                               / (prof.bandwidth_mbps * 1e6))
                else:
                    s["dropped"] += 1
            m["bytes_ratio"] = (m["bytes_up"] + m["bytes_down"]) / (2 * full_bytes * c.num_clients)
            if c.dp:
                m["dp_epsilon"] = dp_epsilon(c, rnd)
            history.append(m["accuracy"])
            progress.step = rnd
            progress.extra["accuracy"] = history
            log.log(rnd, m)
            log.advance(1)
            if log.bar is not None:
                log.bar.set_postfix({"acc": f"{m['accuracy']:.3f}", "clients": m["participants"]}, refresh=False)
            else:
                log.text(f"round {rnd:>4}  accuracy {m['accuracy']:.4f}  loss {m['train_loss']:.4f}  clients "
                         f"{m['participants']}/{c.num_clients}  up {m['bytes_up']:,} B  down {m['bytes_down']:,} B")
            final = rnd == c.rounds
            every = cfg.checkpoint.every
            if (every and rnd % every == 0) or (final and cfg.checkpoint.save_final) or preemption.received:
                saved = dict(components)
                if final:
                    merged = fm.merged(cfg.model, cfg.seed, server.state.global_delta(), c.base, pretrain)
                    saved["model"] = TensorDict(fm.plait_state_dict(merged))  # Plait's names: plait-ckpt export
                path = checkpointer.save(rnd, saved, counters={"round": rnd})
                log.text(f"checkpoint: {path}")
            if preemption.received:
                log.text(f"{preemption.received}: stopped after round {rnd} (its checkpoint is saved)")
                break
    finally:
        preemption.restore()
        checkpointer.close()
        log.close()
    summary = {"rounds": int(server.state.round), "accuracy": history[-1] if history else None,
               "accuracy_per_round": history, "plan": json.loads(plans_json(plans)),
               "clients": progress.extra.get("clients", {}), "stopped": stopped}
    if c.plots and history:
        from federated.plots import plot_run

        plot_run(Path(cfg.run_dir), history, pb, sol)
    return summary


def dp_epsilon(c: FederatedConfig, rounds: int) -> float:
    """ε after `rounds` of the Gaussian mechanism on every client's update (sampling rate 1), at δ."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    if c.dp_noise_multiplier == 0:
        return float("inf")
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(c.dp_noise_multiplier), rounds))
    return float(acc.get_epsilon(c.dp_delta))


def _finish(cfg: PlaitConfig, summary: dict) -> dict:
    c: FederatedConfig = cfg.task
    if summary.get("stopped"):
        print(f"plait: error: {summary['stopped']}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    acc = summary.get("accuracy")
    print(f"plait: federated {c.strategy} done at round {summary['rounds']} of {c.rounds}: accuracy "
          f"{acc if acc is None else round(acc, 4)}; run dir {cfg.run_dir}", flush=True)
    return summary


def _watchdog(seconds: float, what: str) -> threading.Timer:
    """Plait's own deadline around Flower (which can wait forever on a lost client): exit 1 with a message."""
    def fire():
        print(f"plait: error: {what} did not finish within {seconds:.0f} s (task.rounds × task.round_timeout_s "
              f"+ {STARTUP_S:.0f} s); stopping", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def run(cfg: PlaitConfig, env: DistEnv) -> Optional[dict]:
    c: FederatedConfig = cfg.task
    torch.set_num_threads(c.threads)
    if c.mode == "local":
        from federated.server import local_transport

        return _finish(cfg, serve(cfg, lambda spec, log: local_transport(c, cfg.model, cfg.seed)))
    deadline = c.rounds * (c.round_timeout_s + 30) + STARTUP_S
    timer = _watchdog(deadline, f"the federation ({c.mode})")
    try:
        if c.mode == "simulation":
            return _finish(cfg, simulate(cfg))
        if env.world_size > 1:  # a Slurm job of several nodes: SuperLink on task 0, SuperNodes on every task
            from federated.cluster import on_flower_cluster

            summary = on_flower_cluster(cfg, env)
            return _finish(cfg, summary) if summary is not None else None
        from federated.deploy import deploy

        return _finish(cfg, deploy(cfg))
    finally:
        timer.cancel()


def simulate(cfg: PlaitConfig) -> dict:
    """flwr.simulation.run_simulation on Ray: num_clients virtual SuperNodes, partition-id = client."""
    import logging

    from flwr.simulation import run_simulation

    from federated.flower_app import client_app, simulation_server

    c: FederatedConfig = cfg.task
    for name in ("flwr", "alembic"):  # Flower's per-round INFO lines, its link-state database's migrations
        logging.getLogger(name).setLevel(logging.WARNING)
    result: dict = {}
    cpus = max(1, os.cpu_count() or 1)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(server_app=simulation_server(cfg, result), client_app=client_app, num_supernodes=c.num_clients,
                   backend_config={"client_resources": {"num_cpus": c.sim_cpus_per_client},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "log_to_driver": False}})
    if "error" in result:
        raise result["error"]
    if not result:
        raise RuntimeError("the Flower simulation ended without a result from Plait's server loop (see the log above)")
    return result
