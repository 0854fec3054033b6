"""`accelerate launch`'s choices, applied to a config before it is validated.

accelerate records them in ACCELERATE_* variables (its ranks come through the torchrun ones): its
CPU choice replaces device=auto and its bf16 choice replaces trainer.precision=fp32. Applied to
the raw config, so validation judges what will run: bf16 from accelerate is refused where bf16
from the command line is (ZeRO-3).
"""

from __future__ import annotations

import copy
import os
import sys
from functools import lru_cache
from typing import Any, Mapping

from trainer.config import PlaitConfig, TrainerConfig

SUPPORTED_PRECISION = ("no", "bf16")


def accelerate_overrides(cfg_dict: Mapping[str, Any]) -> dict:
    """A copy of a raw config dict (or DictConfig) with accelerate's choices applied; the input is
    left alone. Call it before `validate`."""
    if hasattr(cfg_dict, "_metadata"):  # a DictConfig: keep interpolations for validation to resolve
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg_dict, resolve=False)
    else:
        cfg = copy.deepcopy(dict(cfg_dict))
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        if cfg.get("device", PlaitConfig.device) == "auto":
            cfg["device"] = "cpu"
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict):  # a task without an LM trainer section: nothing to choose
        return cfg
    current = trainer.get("precision", TrainerConfig().precision)
    if precision == "bf16" and current == "fp32":
        trainer["precision"] = "bf16"
    elif precision not in SUPPORTED_PRECISION:
        _note(f"plait: ACCELERATE_MIXED_PRECISION={precision} is not supported; training in "
              f"trainer.precision={current} (allowed: {', '.join(SUPPORTED_PRECISION)})")
    return cfg


@lru_cache(maxsize=None)
def _note(message: str) -> None:
    """Once per process, on rank 0 (the CLI and run_rank both apply the overrides)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)
