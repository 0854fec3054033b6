"""3D-HybridEngine resharding (HybridFlow §5, Table 2): the actor's train → generate → train
transition in Plait's engine (parallel/hybrid_engine.py) against (a) the naive path — every rank
gathers the whole model (`full_tensor()` per weight, pipeline stages broadcast), then slices its
generation shard — and (b) HybridFlow-V — generation tensor groups of consecutive ranks, so a
rank's generation shard does not contain its training shard: it gathers the whole model over the
model-parallel group with the engine's own collectives, then slices — on forked gloo CPU ranks.

Per layout (training pp=p, tp=t, dp=d → generation tp_g, pp_g), per rank and transition:
- time: the slowest rank's train → generate → train (the transition, then back to training),
  median over --rounds, methods alternating inside each round;
- bytes: received on the wire, read from the kernel (`ss -ti` bytes_received over the rank's TCP
  sockets, gloo's transport), against the paper's (t·p − t_g·p_g)/(t_g·p_g·t·p)·M (Plait) and
  (t·p − 1)/(t·p)·M (naive, HybridFlow-V: the d replicas each hold the model, so the gather runs
  inside a replica; the paper's (t·p·d − 1)/(t·p·d)·M assumes weights sharded over all ranks);
- peak extra memory: bytes resident beyond the training shard, read from the kernel: glibc is
  set to mmap every allocation of 64 KiB or more (and so to return it on free), the peak RSS
  (VmHWM, reset through /proc/self/clear_refs) during the transition minus the RSS before it,
  plus what the method holds between transitions (its first transition's growth of anonymous
  RSS, RssAnon: Plait's resident generation buffer M/t_g − M/(t·p)); against the paper's bound
  M/(t_g·p_g). Every method's first transition is its warm-up (code pages, gloo's buffers).
M = the actor's parameter bytes (norms included). tp_gen = 1 needs the whole model on every rank,
so nothing can be saved there: reported under `apart`, not in the worst-case fields. Then one
GRPO iteration end to end (`plait task=rlhf task.algorithm=grpo`, actor tp=2 × dp_shard=2 on 4
ranks, the default llama_arith model) with task.rollout_tp=1 (resharded) and without (generation
in the training layout). FSDP2-sharded training (`fsdp`): Plait's GatheredGenerationShards
against the naive whole-model gather, peak against its own prediction.

    .venv/bin/python bench/reshard.py [--dim 1024] [--layers 2] [--rounds 3] [--grpo-iterations 5] [--no-grpo]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor, Shard  # noqa: E402

from parallel.hybrid_engine import (GenerationCopy, GenerationShards, HybridLayout, StagedGenerationShards,  # noqa: E402
                                    _allocated, _local, _shard_dim, coords, gather_into, generation_chunks,
                                    generation_network, hybrid_peak_extra_bytes, hybrid_transition_bytes,
                                    pipeline_owner, rank_of)
from parallel.mesh import ParallelDims, build_mesh  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.launch.forked import run_ranks  # noqa: E402
from trainer.models import build_model  # noqa: E402

LAYOUTS = [(1, 4, 1, 2, 1), (1, 8, 1, 2, 1), (1, 8, 1, 4, 1), (2, 4, 1, 2, 1), (1, 4, 2, 2, 1),
           (2, 4, 1, 2, 2)]  # (p, t, d, t_g, p_g)
APART = [(1, 4, 1, 1, 1)]  # tp_gen = 1: the whole model on every rank, nothing to save
FSDP = [(4, 2), (8, 2)]  # (dp_shard, t_g): FSDP2-sharded training, generation on consecutive ranks


# --- measuring: the kernel's counters ------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def exact_allocations() -> None:
    """glibc: mmap (and unmap on free) every allocation of 64 KiB or more, so RSS follows tensors."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns that RSS."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def wire_bytes() -> dict[int, int]:
    """Bytes received so far on each of this process's TCP sockets (gloo's transport), by inode,
    from `ss -tie` (the kernel's tcp_info)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            mine.add(int(link[8:-1]))
    out = subprocess.run(["ss", "-tineH"], capture_output=True, text=True, check=True).stdout
    counts, inode = {}, None
    for line in out.splitlines():
        if not line[:1].isspace():
            m = re.search(r"ino:(\d+)", line)
            inode = int(m.group(1)) if m else None
        elif inode in mine and (m := re.search(r"bytes_received:(\d+)", line)):
            counts[inode] = int(m.group(1))
    return counts


def received_since(before: dict[int, int]) -> int:
    """Bytes received on this process's sockets since `before` (sockets opened since: all theirs)."""
    return sum(n - before.get(inode, 0) for inode, n in wire_bytes().items())


# --- the two baselines ----------------------------------------------------------------------------


class FullModelGather(GenerationCopy):
    """Gather every weight whole on every rank of the model-parallel group (the other stages'
    weights broadcast from their holders), then slice this rank's generation shard under generation
    tensor groups of consecutive ranks. `engine=False`: the naive path (`full_tensor()`);
    `engine=True`: HybridFlow-V (the engine's collective, `gather_into`, over the tensor group)."""

    def __init__(self, train_model, lay: HybridLayout, build, owner, tp_group, pp_group, engine: bool, shapes: dict):
        self.train_model, self.lay, self.owner, self.engine = train_model, lay, owner, engine
        self.tp_group, self.pp_group, self.rank = tp_group, pp_group, dist.get_rank()
        self.pp_i, _, self.tp_i = coords(self.rank, lay)
        self.shapes = shapes  # the whole model's weights: (name, shape), every one gathered
        mesh = None
        if lay.t_g > 1:
            from torch.distributed.device_mesh import DeviceMesh
            mesh = DeviceMesh("cpu", torch.arange(lay.world).reshape(-1, lay.t_g), mesh_dim_names=("dp", "tp"))["tp"]
        self.model = build(mesh, generation_chunks(lay, 1, self.pp_i))  # this rank's generation stage
        self.release()

    def _whole(self, param) -> torch.Tensor:
        if not isinstance(param, DTensor) or not any(isinstance(q, Shard) for q in param.placements):
            return _local(param.detach())
        if not self.engine:  # sharded over any mesh dimension (tp, FSDP's)
            return param.detach().full_tensor()
        dim = _shard_dim(param)
        local = _local(param.detach())
        full = torch.empty(param.shape, dtype=local.dtype)
        gather_into(full, local, dim, self.tp_group, self.lay.t)
        return full

    @torch.no_grad()
    def to_generation(self) -> None:
        mine = dict(self.train_model.named_parameters())
        whole = {}
        for name, shape in self.shapes.items():  # the whole model, every weight of it
            stage = self.owner(name)
            if stage == self.pp_i:
                whole[name] = self._whole(mine[name])
            else:
                whole[name] = torch.empty(shape)
            if self.lay.p > 1:
                dist.broadcast(whole[name], src=rank_of(stage, 0, self.tp_i, self.lay), group=self.pp_group)
        k = self.rank % self.lay.t_g  # consecutive generation tensor groups
        for name, gen in self.model.named_parameters():
            dim = _shard_dim(gen)
            full = whole.pop(name)
            _allocated(gen).copy_(full.chunk(self.lay.t_g, dim)[k] if dim is not None else full)
            del full


# --- one rank -------------------------------------------------------------------------------------


def whole_shapes(cfg: ModelConfig) -> dict:
    """Every weight of the whole model: name → shape (what the naive path gathers)."""
    return {name: q.shape for name, q in build_model(cfg, device="meta").named_parameters()}


def network(cfg: ModelConfig, n_chunks: int = 1):
    def build(mesh, chunks=None):  # the whole model, or training pipeline chunks `chunks` of n_chunks
        model = build_model(cfg, device="meta")
        return generation_network(model, mesh, chunks, n_chunks, torch.device("cpu"), seed=0).requires_grad_(False)
    return build


def training_model(lay: HybridLayout, cfg: ModelConfig):
    """This rank's training shard (and the groups the baselines gather over)."""
    if lay.p == 1:
        mesh = build_mesh(ParallelDims(dp_replicate=lay.d, tp=lay.t), "cpu")
        return network(cfg)(mesh["tp"]), mesh["tp"].get_group(), None, lambda name: 0
    from parallel.parallelize import parallelize
    from trainer.config import ParallelConfig
    from trainer.models.loss import cross_entropy_loss

    mesh = build_mesh(ParallelDims(pp=lay.p, tp=lay.t), "cpu")
    _, parts, _ = parallelize(build_model(cfg, device="meta"), mesh,
                              ParallelConfig(pp=lay.p, tp=lay.t, microbatches=lay.p, schedule="1f1b"),
                              loss_fn=cross_entropy_loss, device="cpu", seed=0)
    return parts[0], mesh["tp"].get_group(), mesh["pp"].get_group(), pipeline_owner(cfg.n_layers, lay.p, 1)


def engines(lay: HybridLayout, cfg: ModelConfig) -> tuple[dict, int]:
    train, tp_group, pp_group, owner = training_model(lay, cfg)
    build = network(cfg, lay.p)
    if lay.p == 1:
        plait = GenerationShards(train, lay, build, torch.device("cpu"), resident=True)
    else:
        plait = StagedGenerationShards(train, lay, build, torch.device("cpu"), owner, resident=True)
    shapes = whole_shapes(cfg)
    return {"plait": plait,
            "naive": FullModelGather(train, lay, build, owner, tp_group, pp_group, False, shapes),
            "hybridflow_v": FullModelGather(train, lay, build, owner, tp_group, pp_group, True, shapes)}, train


def transition(engine) -> tuple[float, int, int]:
    """train → generate → train once: seconds, bytes received, peak RSS above the start."""
    dist.barrier()
    start_rss, start_wire = reset_peak(), wire_bytes()
    dist.barrier()
    start = time.perf_counter()
    engine.to_generation()
    engine.release()  # back to training (resident shards: nothing to do)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - start_rss
    received = received_since(start_wire)
    return seconds, received, peak


def measure(p: int, t: int, d: int, t_g: int, p_g: int, cfg: ModelConfig, rounds: int) -> dict:
    torch.set_num_threads(1)
    exact_allocations()
    lay = HybridLayout(p=p, t=t, d=d, p_g=p_g, t_g=t_g)
    methods, train = engines(lay, cfg)
    out = {m: {"seconds": [], "bytes": [], "peak": [], "held": 0} for m in methods}
    for m, engine in methods.items():  # first transitions: what each method keeps between transitions
        before = reset_peak() and _status("RssAnon")
        _, received, peak = transition(engine)
        out[m]["held"] = _status("RssAnon") - before
        out[m]["first_peak"], out[m]["first_bytes"] = peak, received
    for r in range(rounds):
        names = list(methods)[r % 3:] + list(methods)[:r % 3]
        for m in names:
            seconds, received, peak = transition(methods[m])
            out[m]["seconds"].append(seconds)
            out[m]["bytes"].append(received)
            out[m]["peak"].append(peak + out[m]["held"])
    return out


def measure_fsdp(n: int, t_g: int, cfg: ModelConfig, rounds: int) -> dict:
    """FSDP2 over n ranks → tp_g: Plait's GatheredGenerationShards (each rank receives only the
    parts of its generation shard others hold) against the naive whole-model gather."""
    from parallel.hybrid_fsdp import GatheredGenerationShards
    from parallel.parallelize import parallelize
    from trainer.config import ParallelConfig

    torch.set_num_threads(1)
    exact_allocations()
    mesh = build_mesh(ParallelDims(dp_shard=n), "cpu")
    _, parts, _ = parallelize(build_model(cfg, device="meta"), mesh, ParallelConfig(dp_shard=n), device="cpu", seed=0)
    build = network(cfg)
    plait = GatheredGenerationShards(parts[0], n, t_g, build, torch.device("cpu"))
    naive = FullModelGather(parts[0], HybridLayout(p=1, t=n, d=1, t_g=t_g), build, lambda name: 0, None, None, False,
                            whole_shapes(cfg))
    methods = {"plait": plait, "naive": naive}
    out = {m: {"seconds": [], "bytes": [], "peak": [], "held": 0} for m in methods}
    for m, engine in methods.items():
        before = reset_peak() and _status("RssAnon")
        _, received, peak = transition(engine)
        out[m]["held"], out[m]["first_peak"], out[m]["first_bytes"] = _status("RssAnon") - before, peak, received
    for r in range(rounds):
        for m in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            seconds, received, peak = transition(methods[m])
            out[m]["seconds"].append(seconds)
            out[m]["bytes"].append(received)
            out[m]["peak"].append(peak + out[m]["held"])
    out["plait"]["predicted_peak"] = plait.predicted_peak_bytes()
    return out


def summarize_fsdp(n: int, t_g: int, ranks: list, m_bytes: int) -> dict:
    out = {}
    for m in ("plait", "naive"):
        seconds = statistics.median(max(r[m]["seconds"][i] for r in ranks) for i in range(len(ranks[0][m]["seconds"])))
        out[m] = {"seconds": round(seconds, 4), "bytes": max(b for r in ranks for b in r[m]["bytes"]),
                  "peak_extra": max(max(r[m]["peak"]) for r in ranks)}
    out["naive"]["bytes_formula"] = round((n - 1) / n * m_bytes)
    out["plait"]["predicted_peak"] = max(r["plait"]["predicted_peak"] for r in ranks)
    out["plait"]["peak_over_predicted"] = round(out["plait"]["peak_extra"] / out["plait"]["predicted_peak"], 3)
    out["time_ratio"] = round(out["plait"]["seconds"] / out["naive"]["seconds"], 3)
    out["bytes_ratio"] = round(out["plait"]["bytes"] / out["naive"]["bytes"], 3)
    out["bound"] = round(m_bytes / t_g)
    return out


# --- the layouts, side by side ---------------------------------------------------------------------


def model_bytes(cfg: ModelConfig) -> int:
    return sum(q.numel() * q.element_size() for q in build_model(cfg, device="meta").parameters())


def summarize(lay: HybridLayout, ranks: list, m_bytes: int) -> dict:
    """The slowest rank per round (median over rounds), the worst rank's bytes and peak."""
    bound = m_bytes / (lay.t_g * lay.p_g)
    formula = {"plait": hybrid_transition_bytes(lay, m_bytes),
               "naive": (lay.t * lay.p - 1) / (lay.t * lay.p) * m_bytes}
    formula["hybridflow_v"] = formula["naive"]
    out = {}
    for m in ranks[0]:
        seconds = statistics.median(max(r[m]["seconds"][i] for r in ranks) for i in range(len(ranks[0][m]["seconds"])))
        received = [b for r in ranks for b in r[m]["bytes"]]
        peak = max(max(r[m]["peak"]) for r in ranks)
        out[m] = {"seconds": round(seconds, 4), "bytes": max(received), "bytes_formula": round(formula[m]),
                  "bytes_err": round(max(abs(b / formula[m] - 1) for b in received), 5) if formula[m] else None,
                  "peak_extra": peak, "extra_over_bound": round(peak / bound, 3),
                  "held": max(r[m]["held"] for r in ranks),
                  "first_peak": max(r[m]["first_peak"] for r in ranks)}
    out["time_ratio"] = round(out["plait"]["seconds"] / out["naive"]["seconds"], 3)
    out["v_time_ratio"] = round(out["plait"]["seconds"] / out["hybridflow_v"]["seconds"], 3)
    out["bound"] = round(bound)
    out["peak_formula"] = round(hybrid_peak_extra_bytes(lay, m_bytes))
    return out


def name_of(p: int, t: int, d: int, t_g: int, p_g: int) -> str:
    train = "x".join(f"{k}{v}" for k, v in (("pp", p), ("tp", t), ("dp", d)) if v > 1)
    return f"{train}_to_{f'pp{p_g}x' if p_g > 1 else ''}tp{t_g}"


def grpo_seconds(rollout_tp: int, iterations: int) -> dict:
    """`plait task=rlhf task.algorithm=grpo` with the actor at tp=2 × dp_shard=2 (4 ranks; rollout_tp
    takes FSDP-sharded or pure tensor-parallel actors, not dp_replicate): the median
    iteration's seconds (the driver's stage times summed) and its generation stage's, after the
    first (warm-up) iteration, from the run's metrics.jsonl. A Ray of its own (RAY_ADDRESS=local)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [os.path.join(os.path.dirname(sys.executable), "plait"), "task=rlhf", "task.algorithm=grpo",
               "task.actor.tp=2", "task.actor.dp_shard=2", f"task.rollout_tp={rollout_tp}",
               f"task.iterations={iterations}", "task.eval_every=0", f"run_dir={tmp}/run", "checkpoint.every=1000"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "RAY_ADDRESS": "local"})
        rows = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
    stages = [{k: v for k, v in r.items() if k.startswith("time/")} for r in rows if "time/generate" in r][1:]
    return {"iteration": statistics.median(sum(s.values()) for s in stages),
            "generate": statistics.median(s["time/generate"] for s in stages)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--grpo-iterations", type=int, default=5)
    p.add_argument("--no-grpo", action="store_true")
    a = p.parse_args()
    cfg = ModelConfig(name="llama_bench_reshard", vocab_size=2048, dim=a.dim, n_layers=a.layers, n_heads=16,
                      n_kv_heads=8, ffn_dim=a.dim * 11 // 4 // 8 * 8, max_seq_len=64)
    m_bytes = model_bytes(cfg)
    layouts, apart = {}, {}
    for lay_args in LAYOUTS + APART:
        lay = HybridLayout(p=lay_args[0], t=lay_args[1], d=lay_args[2], t_g=lay_args[3], p_g=lay_args[4])
        figures = summarize(lay, run_ranks(lay.world, measure, *lay_args, cfg, a.rounds), m_bytes)
        (layouts if lay_args in LAYOUTS else apart)[name_of(*lay_args)] = figures
        print(name_of(*lay_args), json.dumps(figures), file=sys.stderr, flush=True)
    fsdp = {}
    for n, t_g in FSDP:
        fsdp[f"fsdp{n}_to_tp{t_g}"] = summarize_fsdp(n, t_g, run_ranks(n, measure_fsdp, n, t_g, cfg, a.rounds), m_bytes)
        print(f"fsdp{n}_to_tp{t_g}", json.dumps(fsdp[f"fsdp{n}_to_tp{t_g}"]), file=sys.stderr, flush=True)
    out = {"time_ratio": max(v["time_ratio"] for v in layouts.values()),
           "bytes_err": max(v["plait"]["bytes_err"] for v in layouts.values()),
           "extra_mem_over_bound": max(v["plait"]["extra_over_bound"] for v in layouts.values()),
           "v_time_ratio": max(v["v_time_ratio"] for v in layouts.values()),
           "model_bytes": m_bytes, "rounds": a.rounds, "layouts": layouts, "apart": apart, "fsdp": fsdp}
    if not a.no_grpo:
        reshard, plain = grpo_seconds(1, a.grpo_iterations), grpo_seconds(0, a.grpo_iterations)
        out.update(grpo_iter_s_reshard=round(reshard["iteration"], 3), grpo_iter_s_plain=round(plain["iteration"], 3),
                   grpo_generate_s_reshard=round(reshard["generate"], 3),
                   grpo_generate_s_plain=round(plain["generate"], 3))
    out["device"] = "cpu/gloo"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
