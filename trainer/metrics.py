"""Run metrics: a live progress bar, `metrics.jsonl` in the run directory, and W&B (rank 0 only).

Also the throughput arithmetic: MFU = achieved model FLOP/s over the device's peak (on CPU, a
measured fp32 matmul peak, since there is no datasheet figure for "2 shared cores"; for a GPU not
in the table, unknown unless trainer.peak_flops gives it: no guessed peak, no made-up MFU).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import psutil
import torch
import torch.distributed as dist

from trainer.config import LoggerConfig

# Dense bf16 peak FLOP/s per GPU (datasheet, without sparsity).
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                 "L4": 121e12, "V100": 125e12, "4090": 165e12}


@lru_cache(maxsize=None)
def measured_cpu_peak(n: int = 1024, reps: int = 8) -> float:
    """fp32 matmul FLOP/s this process reaches with its current thread count (2·n³ per matmul)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def gpu_peak(name: str) -> Optional[float]:
    """The table's peak for a GPU named `name` (torch.cuda.get_device_name), or None if not in it."""
    for key, value in GPU_PEAK_BF16.items():
        if re.search(rf"\b{key}\b", name):  # whole words: L4 is not L40S, H200 is not GH200
            return value
    return None


def peak_flops(device: torch.device, override: float = 0.0) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: `override` (trainer.peak_flops) if set, the datasheet
    figure of a known GPU, a measured matmul peak on CPU; None (MFU unknown) for another GPU."""
    if override > 0:
        return override
    if device.type != "cuda":
        return measured_cpu_peak()
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak(name)
    if peak is None:
        _note_unknown_gpu(name)
    return peak


@lru_cache(maxsize=None)
def _note_unknown_gpu(name: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        known = ", ".join(GPU_PEAK_BF16)
        print(f"plait: note: no peak FLOP/s known for GPU {name!r} (known: {known}); MFU is not reported. "
              "Set trainer.peak_flops=<dense bf16 FLOP/s per device from its datasheet> to report it",
              file=sys.stderr, flush=True)


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


class MetricLogger:
    """Writes each step's metrics to the sinks; everything is a no-op off rank 0."""

    def __init__(self, run_dir: str, cfg: LoggerConfig, config: dict, total_steps: int,
                 start_step: int = 0, is_main: bool = True):
        self.is_main = is_main
        self.cfg = cfg
        self.bar = None
        self.wandb_run = None
        self.file = None
        if not is_main:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
        if cfg.progress and total_steps > 0 and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=config.get("name", "train"),
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        if cfg.name == "wandb" and cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", run_dir)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                mode=cfg.mode, name=config.get("name"), config=config, dir=run_dir,
                resume="allow", id=_wandb_id(run_dir),
            )
            where = self.wandb_run.dir.rsplit("/files", 1)[0]
            hint = f"; upload it with `wandb sync {where}`" if cfg.mode == "offline" else ""
            self.text(f"wandb: {cfg.mode} run {self.wandb_run.id} in {where}{hint}")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)
        shown = {k: _short(v) for k, v in clean.items() if k in ("loss", "lr", "tok/s", "mfu", "eval/loss")}
        if self.bar is not None and shown:
            self.bar.set_postfix(shown, refresh=False)
        elif "loss" in shown:  # no terminal (a log file, Slurm): one line per logged step instead
            print(f"step {step:>6}  " + "  ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def text(self, message: str) -> None:
        """A line of output that does not break the progress bar."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(run_dir: str) -> str:
    """One W&B run per run directory, so a resumed run continues the same W&B run."""
    path = Path(run_dir) / ".wandb_id"
    if not path.exists():
        path.write_text(secrets.token_hex(4))
    return path.read_text().strip()


def _short(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or math.isnan(v):
            return f"{v:.3g}"
        return f"{v:.3e}" if abs(v) < 1e-3 else f"{v:.4g}"
    return str(v)
