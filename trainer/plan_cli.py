"""`plait-plan`: rank (tp, pp, dp) layouts of a model on N devices by estimated memory per device,
pipeline bubble and a step-time proxy (parallel/planner/), printed as a table or JSON.

Layouts are checked with the same rules `plait` applies at start (trainer/config.py's
`check_combinations`), so every layout printed is one `plait task=pretrain parallel.*=...` accepts.
Exit status 2 for bad input, as `plait`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import configs
from parallel.planner import GiB, Hardware, Layout, Plan, Workload, candidate_layouts, rank_layouts, total_params
from trainer.config import (ConfigError, DataConfig, ModelConfig, ParallelConfig, PlaitConfig, TrainerConfig,
                            check_combinations)
from trainer.errors import EXIT_BAD_INPUT

MODEL_DIR = Path(configs.__file__).parent / "model"


class PlanError(ValueError):
    """Bad input: the message says what is wrong and what is allowed."""


def model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def load_model(name: Optional[str], path: Optional[str]) -> ModelConfig:
    """A ModelConfig from configs/model/<name>.yaml or from a YAML file, type-checked by the schema."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise PlanError(f"--model-config {path}: no such file")
    else:
        file = MODEL_DIR / f"{name}.yaml"
        if not file.is_file():
            raise PlanError(f"--model {name}: unknown model; allowed: {', '.join(model_names())} "
                            "(or --model-config path.yaml)")
    try:
        raw = OmegaConf.load(file)
        if OmegaConf.is_dict(raw.get("model")):  # a whole Plait config: its model section
            raw = raw.model
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
    except (OmegaConfBaseException, ValueError) as err:
        raise PlanError(f"{file}: {str(err).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def plait_config(model: ModelConfig, layout: Layout, work: Workload) -> PlaitConfig:
    """The config `plait` would run this layout with (what check_combinations validates)."""
    fields = {f.name for f in dataclasses.fields(ParallelConfig)}
    parallel = ParallelConfig(**{k: v for k, v in dataclasses.asdict(layout).items() if k in fields})
    return PlaitConfig(model=model, data=DataConfig(seq_len=work.seq_len), parallel=parallel,
                       trainer=TrainerConfig(batch_size=work.batch_size, grad_accum=layout.grad_accum,
                                             precision=work.precision))


def layout_checker(model: ModelConfig, work: Workload, devices: int, rejected: Counter):
    """problem(layout) -> the ConfigError message `plait` would give, or None; recomputation does
    not change validity, so each layout is checked once for all three modes."""
    seen: dict[Layout, Optional[str]] = {}

    def problem(layout: Layout) -> Optional[str]:
        key = dataclasses.replace(layout, activation_checkpoint="none")
        if key not in seen:
            try:
                check_combinations(plait_config(model, key, work), devices)
                seen[key] = None
            except ConfigError as err:
                seen[key] = str(err)
        if seen[key] is not None:
            rejected[seen[key]] += 1
        return seen[key]

    return problem


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="plait-plan",
        description="Rank tensor x pipeline x data-parallel layouts of a model on N devices by the "
                    "Megatron-LM analytical model: memory per device, pipeline bubble, step-time proxy.",
        epilog="example: plait-plan --model llama_8b --devices 64 --gpus-per-node 8 --memory-gb 80 "
               "--seq-len 8192 --batch-size 512 --precision bf16")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="llama_tiny",
                     help=f"a config in configs/model ({', '.join(model_names())}); default llama_tiny")
    src.add_argument("--model-config", metavar="PATH", help="a model YAML (ModelConfig's fields)")
    p.add_argument("--devices", type=int, required=True, help="devices in all (world size)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="devices per node; TP stays inside one (8)")
    p.add_argument("--memory-gb", type=float, default=80.0, help="memory per device, GiB (80)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, help="global batch in sequences (default: --devices)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of memory kept free for the allocator, CUDA context, NCCL (0.1)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per device (989, H100)")
    p.add_argument("--efficiency", type=float, default=0.5, help="fraction of peak the matmuls reach (0.5)")
    p.add_argument("--intra-node-gbps", type=float, default=300.0, help="collective GB/s per device in a node")
    p.add_argument("--inter-node-gbps", type=float, default=45.0, help="GB/s per device across nodes")
    p.add_argument("--microbatch-sizes", default="1,2,4,8", help="sequences per microbatch to try (1,2,4,8)")
    p.add_argument("--cpu", action="store_true", help="CPU runs: AdamW steps one tensor at a time")
    p.add_argument("--top", type=int, default=10, help="layouts to print (0: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.devices < 1:
        raise PlanError(f"--devices {args.devices}: must be >= 1")
    if args.gpus_per_node < 1:
        raise PlanError(f"--gpus-per-node {args.gpus_per_node}: must be >= 1")
    if args.devices > args.gpus_per_node and args.devices % args.gpus_per_node:
        raise PlanError(f"--devices {args.devices} is not divisible by --gpus-per-node {args.gpus_per_node}: "
                        "nodes are whole; allowed: a multiple of it, or at most one node")
    for name in ("memory_gb", "peak_tflops", "efficiency", "intra_node_gbps", "inter_node_gbps"):
        if getattr(args, name) <= 0:
            raise PlanError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    if not 0 <= args.headroom < 1:
        raise PlanError(f"--headroom {args.headroom}: must be in [0, 1)")
    for name in ("seq_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    try:
        sizes = [int(x) for x in args.microbatch_sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise PlanError(f"--microbatch-sizes {args.microbatch_sizes!r}: comma-separated integers >= 1")
    args.microbatch_sizes = sizes


def plan(args: argparse.Namespace) -> tuple[ModelConfig, Workload, Hardware, list[Plan], int, Counter]:
    check_args(args)
    model = load_model(args.model, args.model_config)
    work = Workload(seq_len=args.seq_len or model.max_seq_len, batch_size=args.batch_size or args.devices,
                    precision=args.precision)
    hw = Hardware(gpus_per_node=args.gpus_per_node, memory_bytes=args.memory_gb * GiB,
                  peak_flops=args.peak_tflops * 1e12, flops_efficiency=args.efficiency,
                  intra_node_bw=args.intra_node_gbps * 1e9, inter_node_bw=args.inter_node_gbps * 1e9,
                  headroom=args.headroom, optimizer_foreach=not args.cpu)
    try:  # what no layout can fix (sequence too long, heads vs dim, ...): the single-device config
        check_combinations(plait_config(model, Layout(), dataclasses.replace(work, batch_size=1)), 1)
    except ConfigError as err:
        raise PlanError(str(err)) from None
    from trainer.models.llama import flops_per_token

    candidates = list(candidate_layouts(model.n_layers, args.devices, hw.gpus_per_node, work.batch_size,
                                        args.microbatch_sizes))
    rejected: Counter = Counter()
    plans = rank_layouts(model, args.devices, work, hw, flops_per_token(model, work.seq_len),
                         layout_checker(model, work, args.devices, rejected), candidates)
    if not plans:
        reasons = "; ".join(msg for msg, _ in rejected.most_common(3)) or \
            f"the global batch {work.batch_size} divides by no data-parallel size of {args.devices} devices " \
            f"into microbatches of {args.microbatch_sizes}"
        raise PlanError(f"no valid layout of {model.name} on {args.devices} devices: {reasons}")
    return model, work, hw, plans, len(candidates), rejected


def _gib(x: float) -> str:
    return f"{x / GiB:.3g}" if x < 10 * GiB else f"{x / GiB:.1f}"


def table(model: ModelConfig, work: Workload, hw: Hardware, plans: list[Plan], considered: int,
          top: int) -> str:
    fit = sum(p.fits for p in plans)
    lines = [
        f"plait-plan: {model.name} ({total_params(model) / 1e9:.3g}B params) on {hw.gpus_per_node}-device "
        f"nodes, {hw.memory_bytes / GiB:g} GiB each ({hw.headroom:.0%} kept free); seq {work.seq_len}, "
        f"global batch {work.batch_size}, {work.precision}",
        f"{considered} layouts considered, {len(plans)} valid, {fit} fit"
        + (f"; the best {min(top, len(plans))}:" if top and top < len(plans) else ":"),
        "memory per device in GiB at its peak (phase: act = last loss backward starts, bwd = end of "
        "backward, opt = optimizer step); start = the start-up peak (the rank's shards + one whole parameter)",
    ]
    head = ("#", "layout", "mb", "params", "grads", "optim", "acts", "other", "peak", "phase", "start", "fits",
            "bubble", "step s", "notes")
    rows = []
    for i, p in enumerate(plans[:top or None], 1):
        m = p.memory
        rows.append((str(i), p.layout.describe(), str(m.microbatch_size), _gib(m.params), _gib(m.grads),
                     _gib(m.optimizer), _gib(m.activations), _gib(m.other), _gib(m.peak),
                     {"activations": "act", "end of backward": "bwd", "optimizer step": "opt"}[m.phase],
                     _gib(m.startup), "yes" if p.fits else "NO", f"{p.bubble:.1%}", f"{p.time.total:.3g}", ", ".join(p.notes)))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    left = {1, 9, 14}
    for r in [head] + rows:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
    if not fit:
        lines.append("none fits: more devices, activation_checkpoint=full, a shorter sequence or a smaller "
                     "microbatch; the closest are listed first")
    return "\n".join(lines)


def as_json(model: ModelConfig, work: Workload, hw: Hardware, plans: list[Plan], considered: int,
            rejected: Counter, top: int) -> str:
    def plan_dict(p: Plan) -> dict:
        return {"layout": dataclasses.asdict(p.layout), "describe": p.layout.describe(), "fits": p.fits,
                "memory_gib": {k: v / GiB for k, v in dataclasses.asdict(p.memory).items()
                               if isinstance(v, float)},
                "phase": p.memory.phase, "pp_rank": p.memory.pp_rank,
                "microbatch_size": p.memory.microbatch_size, "in_flight": p.memory.in_flight,
                "bubble": p.bubble, "step_time_s": dataclasses.asdict(p.time), "notes": p.notes}
    return json.dumps({
        "model": dataclasses.asdict(model), "params": total_params(model),
        "workload": dataclasses.asdict(work), "hardware": dataclasses.asdict(hw),
        "considered": considered, "valid": len(plans), "fit": sum(p.fits for p in plans),
        "rejected": dict(rejected.most_common(10)),
        "plans": [plan_dict(p) for p in plans[:top or None]],
    }, indent=1)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        model, work, hw, plans, considered, rejected = plan(args)
    except PlanError as err:
        print(f"plait-plan: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    print(as_json(model, work, hw, plans, considered, rejected, args.top) if args.json
          else table(model, work, hw, plans, considered, args.top))


if __name__ == "__main__":
    main()
