"""The RLHF demo on two CPU cores: SFT a tiny model on the generated arithmetic task, then raise its
held-out exact-match accuracy with GRPO and PPO (and RLOO, ReMax, REINFORCE++), each through the
`plait` CLI exactly as a user runs it, on Ray by default.

    plait task=sft name=rlhf-demo-sft                                   # ~40% held-out exact match
    plait task=rlhf task.algorithm=grpo task.init_from=runs/rlhf-demo-sft/checkpoints name=rlhf-demo-grpo

Prints a table and one JSON line: per algorithm the held-out accuracy before (the SFT policy,
iteration 0) and after, the gain in points and the wall time; `grpo_gain` and `ppo_gain` (goal
≥ 20 points within 20 minutes); and writes runs/rlhf-demo.png with the curves.

    .venv/bin/python bench/rlhf_demo.py [--algorithms grpo ppo rloo remax reinforce_pp] [--iterations 150]
        [--backend ray|local] [--sft-steps 800]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plait(*overrides: str) -> float:
    """Run `plait` with the overrides; returns its wall time (a failure stops the demo with its output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer", *overrides, "logger.progress=false"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"plait {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("plait: "):
            print("   ", line, flush=True)
    return time.perf_counter() - start


def accuracies(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]


def plot(curves: dict[str, list[tuple[int, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", markersize=2.5, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out exact match (greedy)")
    ax.set_title("RLHF on 2-digit addition, tiny Llama, 2 CPU cores", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algorithms", nargs="+", default=["grpo", "ppo", "rloo", "remax", "reinforce_pp"])
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--backend", default="ray", choices=["ray", "local"])
    p.add_argument("--sft-steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    runs = ROOT / "runs"
    for old in runs.glob("rlhf-demo-*"):  # the demo's own runs: start each afresh
        shutil.rmtree(old)
    print(f"1. SFT ({a.sft_steps} steps)", flush=True)
    sft_seconds = plait("task=sft", "name=rlhf-demo-sft", f"trainer.max_steps={a.sft_steps}", f"seed={a.seed}",
                        )
    sft = runs / "rlhf-demo-sft" / "checkpoints"
    results, curves = {}, {}
    for i, algorithm in enumerate(a.algorithms, start=2):
        name = f"rlhf-demo-{algorithm}"
        print(f"{i}. {algorithm} ({a.iterations} iterations, task.backend={a.backend})", flush=True)
        seconds = plait("task=rlhf", f"name={name}", f"task.algorithm={algorithm}", f"task.init_from={sft}",
                        f"task.iterations={a.iterations}", f"task.backend={a.backend}", f"seed={a.seed}")
        acc = accuracies(runs / name)
        curves[algorithm] = acc
        results[algorithm] = {"before": acc[0][1], "after": acc[-1][1], "best": max(v for _, v in acc),
                              "gain_points": round(100 * (acc[-1][1] - acc[0][1]), 1), "seconds": round(seconds, 1)}
    print(f"\n{'algorithm':<14}{'before':>8}{'after':>8}{'gain':>8}{'wall s':>9}")
    for algorithm, r in results.items():
        print(f"{algorithm:<14}{r['before']:>8.3f}{r['after']:>8.3f}{r['gain_points']:>7.1f}p{r['seconds']:>9.0f}")
    out = runs / "rlhf-demo.png"
    plot(curves, out)
    summary = {f"{k}_gain": v["gain_points"] for k, v in results.items()}
    summary.update(sft_seconds=round(sft_seconds, 1), backend=a.backend, iterations=a.iterations, results=results,
                   plot=str(out))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
